"""The train and eval steps: pure functions of (state, batch, teacher variables), jitted by the caller.

One train step (``docs/method.md`` §8.3): the static teacher's logits outside the gradient; inside the
loss the DT forward (train-mode BN), the student read out of the DT's params by ``student_view`` and
its forward with its own BN statistics, the objective; one gradient w.r.t. the DT params; optax
update; EMA of the params and both BN collections.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpd_jax import losses
from gpd_jax.state import Task, TrainState
from gpd_jax.transforms import student_view


def teacher_logits(task: Task, teacher_variables, images: jax.Array, *, train: bool = False):
  """The static teacher's float32 logits [B, K], never differentiated."""
  if train:  # batch statistics, as the reference code did; the running-stat update is dropped
    logits, _ = task.teacher.apply(teacher_variables, images, train=True, mutable=["batch_stats"])
  else:
    logits = task.teacher.apply(teacher_variables, images, train=False)
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def forward(task: Task, params, consts, batch_stats, student_batch_stats, images, *, train: bool,
            rngs=None):
  """Logits of the trained network and of the student.

  ``rngs``: train-mode rng streams (``{'dropout': key}`` for drop-path). The DT and the student get
  the same key, so stochastic depth drops the same blocks in both (matched drop-path).

  Returns:
    (logits, new_stats): ``logits['student']`` [B, K] always and ``logits['dt']`` with GPD;
    ``new_stats = (batch_stats, student_batch_stats)`` updated in train mode (unchanged in eval).
  """
  def apply(model, variables):
    if train:
      out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                 rngs=rngs or {})
      return out, updates.get("batch_stats", {})
    return model.apply(variables, images, train=False), variables["batch_stats"]

  model_params = {"params": params} if consts is None else {"params": params, "consts": consts}
  main_logits, batch_stats = apply(task.model, {**model_params, "batch_stats": batch_stats})
  if not task.gpd:
    return {"student": main_logits}, (batch_stats, None)
  view_model, view_params = student_view(task.model, model_params, spec=task.view_spec)
  student_logits, student_batch_stats = apply(
      view_model, {**view_params, "batch_stats": student_batch_stats})
  return {"student": student_logits, "dt": main_logits}, (batch_stats, student_batch_stats)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float):
  """``train_step(state, batch, teacher_variables) -> (state, metrics)``.

  ``batch``: ``{'image': [B, H, W, C], 'label': int [B]}``; ``teacher_variables``: None without a
  static teacher. ``metrics``: the objective's terms plus ``lr``, ``grad_norm`` and ``finite``.
  """
  def train_step(state: TrainState, batch, teacher_variables):
    images, labels = batch["image"], batch["label"]
    # A per-step key (a function of the step, so resumed runs draw the same masks).
    rngs = {"dropout": jax.random.fold_in(jax.random.key(task.dropout_seed), state.step)}
    teacher = {}
    if task.teacher is not None:
      teacher["teacher"] = teacher_logits(task, teacher_variables, images,
                                          train=task.teacher_train_mode)

    def loss_fn(params):
      logits, new_stats = forward(task, params, state.consts, state.batch_stats,
                                  state.student_batch_stats, images, train=True, rngs=rngs)
      total, terms = task.objective({**logits, **teacher}, labels, step=state.step)
      return total, (terms, new_stats)

    (total, (terms, (batch_stats, student_batch_stats))), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      current = {"params": params, "batch_stats": batch_stats,
                 "student_batch_stats": student_batch_stats}
      ema = optax.incremental_update(current, ema, step_size=1.0 - ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              student_batch_stats=student_batch_stats, opt_state=opt_state, ema=ema)
    metrics = {**terms, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "finite": jnp.isfinite(total)}
    return new_state, metrics

  return train_step


def make_eval_step(task: Task):
  """``eval_step(state, batch, teacher_variables) -> sums`` over the real (mask 1) examples.

  ``sums``: ``count``; for the student (``S``), the DT (``D``, GPD only) and the teacher (``T``):
  ``top1_*``, ``top5_*``, ``ce_*``; agreements ``agree_S_D`` and ``agree_S_T``; and, when the state
  has an EMA, the same student/DT sums of the EMA weights with the suffix ``_ema``.
  """
  def net_sums(logits, labels, mask, name):
    return losses.classification_sums(logits, labels, mask, f"_{name}")

  def agree(a, b, mask):
    return jnp.sum(mask * losses.agreement(a, b))

  def eval_step(state: TrainState, batch, teacher_variables):
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    sums = {"count": jnp.sum(mask)}
    z_t = None
    if task.teacher is not None:
      z_t = teacher_logits(task, teacher_variables, images)
      sums.update(net_sums(z_t, labels, mask, "T"))
    sources = ["raw"] + (["ema"] if state.ema is not None else [])
    for source in sources:
      suffix = "" if source == "raw" else "_ema"
      variables, student_batch_stats = state.variables(source)
      logits, _ = forward(task, variables["params"], variables.get("consts"),
                          variables["batch_stats"], student_batch_stats, images, train=False)
      sums.update(net_sums(logits["student"], labels, mask, "S" + suffix))
      if "dt" in logits:
        sums.update(net_sums(logits["dt"], labels, mask, "D" + suffix))
        sums["agree_S_D" + suffix] = agree(logits["student"], logits["dt"], mask)
      if z_t is not None:
        sums["agree_S_T" + suffix] = agree(logits["student"], z_t, mask)
    return sums

  return eval_step
