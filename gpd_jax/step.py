"""The train and eval steps: pure functions of (state, batch, teacher variables), jitted by the caller.

One train step, top to bottom (``docs/method.md`` §8.3 for GPD):

1. the frozen teachers' logits, outside the gradient;
2. inside the loss, every trained network's forward (train-mode BN): with GPD the DT, then the
   student read out of the DT's params by ``student_view`` and run with its own BN statistics;
3. one objective: the base loss of ``config.loss``/``config.gpd`` on ``student``/``dt``/``teacher``,
   plus the named terms between networks of ``config.online.terms`` (their sources behind
   ``stop_gradient``, so each network gets exactly the gradient of its own terms);
4. one gradient w.r.t. every network's trainable params, then per network: optax update and EMA;
5. SwitOKD: in expert mode the paused peer keeps its previous state.

Feature distillation (``task.needs_features``, i.e. ``task.feature_objective`` is set): steps 1 and 2
run the modules with ``return_features=True`` and collect ``features: {name: Features}`` under the
logits' names (``'student'``, ``'dt'``, ``'teacher'``, peers); the objective is then also
``task.feature_objective(features, labels, step=, connectors=, feature_state=, batch=)``
(``gpd_jax.feature_kd``), whose trainable connectors are differentiated with the main network's params
and updated by the same optax chain (``state.connectors``), and whose non-trainable state
(``state.feature_state``) is replaced by the one it returns. Without a feature objective the step is
the logits-only step, unchanged.

``teacher_variables`` is the static teacher's variables (or None); when the run has extra frozen
teachers (``config.online.teachers``) it is ``{name: variables}`` over all of them, ``'teacher'``
included when there is a static teacher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpd_jax import losses, mixup, online_losses, phases
from gpd_jax.state import Network, NetworkState, Task, TrainState
from gpd_jax.transforms import student_view

# The key of the feature connectors' params in the differentiated tree (next to the networks' names).
CONNECTORS = "__connectors__"


def _apply_frozen(module, variables, images, train: bool, with_features: bool = False):
  """Float32 logits [B, K] (and, ``with_features``, the ``Features``) of a frozen network, both
  behind ``stop_gradient``."""
  if with_features:
    module = module.clone(return_features=True)
  if train:  # batch statistics, as the reference code did; the running-stat update is dropped
    out, _ = module.apply(variables, images, train=True, mutable=["batch_stats"])
  else:
    out = module.apply(variables, images, train=False)
  if with_features:
    logits, features = out
    return jax.lax.stop_gradient(logits.astype(jnp.float32)), jax.lax.stop_gradient(features)
  return jax.lax.stop_gradient(out.astype(jnp.float32))


def teacher_logits(task: Task, teacher_variables, images: jax.Array, *, train: bool = False):
  """The static teacher's float32 logits [B, K], never differentiated."""
  return _apply_frozen(task.teacher, teacher_variables, images, train)


def frozen_logits(task: Task, teacher_variables, images: jax.Array, *, train: bool):
  """``{name: [B, K]}`` of every frozen teacher (``'teacher'`` and ``config.online.teachers``).

  ``train``: use the config's ``train_mode`` (batch statistics) where it asks for it; eval-mode BN
  otherwise.
  """
  return frozen_outputs(task, teacher_variables, images, train=train)[0]


def frozen_outputs(task: Task, teacher_variables, images: jax.Array, *, train: bool,
                   with_features: bool = False):
  """``(logits, features)``: ``{name: [B, K]}`` of every frozen teacher as :func:`frozen_logits`,
  and, ``with_features``, ``{name: Features}`` of the same teachers (else ``{}``)."""
  by_name = teacher_variables if task.extra_teachers else {"teacher": teacher_variables}
  entries = []
  if task.teacher is not None:
    entries.append(("teacher", task.teacher, train and task.teacher_train_mode))
  entries += [(t.name, t.module, train and t.train_mode) for t in task.extra_teachers]
  logits, features = {}, {}
  for name, module, train_mode in entries:
    out = _apply_frozen(module, by_name[name], images, train_mode, with_features)
    if with_features:
      logits[name], features[name] = out
    else:
      logits[name] = out
  return logits, features


def forward_network(net: Network, params, consts, batch_stats, student_batch_stats, images, *,
                    train: bool, rngs=None, with_features: bool = False):
  """Logits of one trained network and, with GPD, of its student view.

  ``rngs``: train-mode rng streams (``{'dropout': key}`` for drop-path). The DT and the student get
  the same key, so stochastic depth drops the same blocks in both (matched drop-path).
  ``with_features``: run the modules with ``return_features=True`` and return their taps too.

  Returns:
    (logits, new_stats): ``logits[net.name]`` [B, K] always (the student view with GPD) and
    ``logits[net.dt_name]`` with GPD; ``new_stats = (batch_stats, student_batch_stats)`` updated in
    train mode (unchanged in eval). ``with_features``: (logits, new_stats, features), ``features``
    keyed like ``logits`` (``models.layers.Features``; the DT's ×r wide, the view's the student's).
  """
  def apply(model, variables):
    if with_features:
      model = model.clone(return_features=True)
    if train:
      out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                 rngs=rngs or {})
      return out, updates.get("batch_stats", {})
    return model.apply(variables, images, train=False), variables["batch_stats"]

  def split(out):
    return out if with_features else (out, None)

  model_params = {"params": params} if consts is None else {"params": params, "consts": consts}
  main_out, batch_stats = apply(net.model, {**model_params, "batch_stats": batch_stats})
  main_logits, main_features = split(main_out)
  if not net.gpd:
    logits, features = {net.name: main_logits}, {net.name: main_features}
    return (logits, (batch_stats, None), features) if with_features else (logits, (batch_stats, None))
  view_model, view_params = student_view(net.model, model_params, spec=net.view_spec)
  student_out, student_batch_stats = apply(
      view_model, {**view_params, "batch_stats": student_batch_stats})
  student_logits, student_features = split(student_out)
  logits = {net.name: student_logits, net.dt_name: main_logits}
  new_stats = (batch_stats, student_batch_stats)
  if with_features:
    return logits, new_stats, {net.name: student_features, net.dt_name: main_features}
  return logits, new_stats


def forward(task: Task, params, consts, batch_stats, student_batch_stats, images, *, train: bool,
            rngs=None):
  """``forward_network`` of the main network: ``logits['student']`` and, with GPD, ``logits['dt']``."""
  return forward_network(task.networks[0], params, consts, batch_stats, student_batch_stats, images,
                         train=train, rngs=rngs)


def _update_network(tx, ema_decay: float, net: NetworkState, grads, new_stats,
                    connector_grads=None, connector_batch_stats=None) -> NetworkState:
  """One optax update of a network's params, its new BN statistics, and its EMA.

  With feature connectors (``net.connectors``), one optax update covers
  ``{'model': params, 'connectors': connector params}`` (one clip over both, as the reference's
  single optimizer); ``connector_grads`` and ``connector_batch_stats`` are their gradient and new
  BN statistics.
  """
  batch_stats, student_batch_stats = new_stats
  connectors = net.connectors
  if connectors is None:
    updates, opt_state = tx.update(grads, net.opt_state, net.params)
    params = optax.apply_updates(net.params, updates)
  else:
    joint = {"model": net.params, "connectors": connectors["params"]}
    updates, opt_state = tx.update({"model": grads, "connectors": connector_grads},
                                   net.opt_state, joint)
    joint = optax.apply_updates(joint, updates)
    params = joint["model"]
    connectors = {"params": joint["connectors"], "batch_stats": connector_batch_stats}
  ema = net.ema
  if ema is not None:
    current = {"params": params, "batch_stats": batch_stats,
               "student_batch_stats": student_batch_stats}
    if connectors is not None:
      current["connectors"] = connectors
    ema = optax.incremental_update(current, ema, step_size=1.0 - ema_decay)
  return net.replace(params=params, batch_stats=batch_stats,
                     student_batch_stats=student_batch_stats, opt_state=opt_state, ema=ema,
                     connectors=connectors)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float, *, mix: mixup.MixupSpec | None = None, phase=None):
  """``train_step(state, batch, teacher_variables) -> (state, metrics)``.

  ``phase``: a multi-phase run's current :class:`gpd_jax.phases.Phase`; the BatchNorm statistics of
  the modules it freezes then keep their values (``tx`` zeroes their parameters' updates).

  ``batch``: ``{'image': [B, H, W, C], 'label': int [B]}``; ``teacher_variables``: see the module
  docstring. ``mix``: mixup/cutmix of the global batch (``gpd_jax/mixup.py``) before any forward,
  from a key that is a function of the step; the objective then gets the soft targets. None: off.
  ``metrics``: the objective's terms plus ``lr``, ``grad_norm`` (the main network's),
  ``grad_norm_<peer>``, ``finite``, with mixing ``mix_lam`` and ``mix_cutmix`` (1.0 = CutMix), and,
  with SwitOKD, ``switch_gap``, ``switch_threshold``, ``switch_expert``.
  """
  networks = task.networks

  def train_step(state: TrainState, batch, teacher_variables):
    images, labels = batch["image"], batch["label"]
    # A per-step key (a function of the step, so resumed runs draw the same masks); peers fold in
    # their index so that their drop-path masks differ from the main network's.
    dropout_key = jax.random.fold_in(jax.random.key(task.dropout_seed), state.step)
    targets = None
    if mix is not None:
      images, targets, mix_info = mixup.mix_batch(
          jax.random.fold_in(dropout_key, mixup.MIX_STREAM), images, labels, mix)
    with_features = task.needs_features
    frozen, frozen_features = frozen_outputs(task, teacher_variables, images, train=True,
                                             with_features=with_features)

    def loss_fn(trained_params):
      logits, new_stats, features = dict(frozen), {}, dict(frozen_features)
      for i, net in enumerate(networks):
        key = dropout_key if i == 0 else jax.random.fold_in(dropout_key, i)
        net_state = state.network(net.name)
        out = forward_network(
            net, trained_params[net.name], net_state.consts, net_state.batch_stats,
            net_state.student_batch_stats, images, train=True, rngs={"dropout": key},
            with_features=with_features)
        logits.update(out[0])
        new_stats[net.name] = out[1]
        if with_features:
          features.update(out[2])
      base = {k: v for k, v in logits.items() if k in ("student", "dt", "teacher")}
      if targets is None:  # the call the CNN recipes have always made
        total, terms = task.objective(base, labels, step=state.step)
      else:
        total, terms = task.objective(base, labels, step=state.step, targets=targets)
      if task.terms is not None:
        online_total, online_terms = task.terms(logits, labels)
        total = total + online_total
        terms = {**terms, **online_terms, "total": total}
      feature_out = None
      if with_features:
        connectors = None
        if state.connectors is not None:
          connectors = {"params": trained_params[CONNECTORS],
                        "batch_stats": state.connectors["batch_stats"]}
        feature_total, feature_terms, connector_stats, feature_state = task.feature_objective(
            features, labels, step=state.step, connectors=connectors,
            feature_state=state.feature_state, batch=batch)
        total = total + feature_total
        terms = {**terms, **feature_terms, "total": total}
        feature_out = (connector_stats, feature_state)
      return total, (terms, new_stats, logits, feature_out)

    trained_params = {net.name: state.network(net.name).params for net in networks}
    if state.connectors is not None:
      trained_params[CONNECTORS] = state.connectors["params"]
    (total, (terms, new_stats, logits, feature_out)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trained_params)

    metrics = {**terms, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads["student"]),
               "finite": jnp.isfinite(total)}
    if mix is not None:
      metrics.update(mix_lam=mix_info["lam"], mix_cutmix=mix_info["cutmix"].astype(jnp.float32))
    new_state = state.replace(step=state.step + 1)
    if phase is not None:
      main = state.network("student")
      batch_stats, student_batch_stats = new_stats["student"]
      new_stats["student"] = (phases.keep_frozen(phase, main.batch_stats, batch_stats),
                              phases.keep_frozen(phase, main.student_batch_stats, student_batch_stats))
    if feature_out is not None:
      new_state = new_state.replace(feature_state=feature_out[1])
      if state.connectors is not None:
        metrics["grad_norm_connectors"] = optax.tree.norm(grads[CONNECTORS])
    for net in networks:
      old = state.network(net.name)
      if old.connectors is None:
        new = _update_network(tx, ema_decay, old, grads[net.name], new_stats[net.name])
      else:
        new = _update_network(tx, ema_decay, old, grads[net.name], new_stats[net.name],
                              grads[CONNECTORS], feature_out[0])
      if net.name != "student":
        metrics[f"grad_norm_{net.name}"] = optax.tree.norm(grads[net.name])
      if task.switch is not None and net.name == task.switch[1]:
        # SwitOKD: the teacher pauses (keeps params, statistics, optimizer state and EMA) in expert
        # mode, decided from this batch's logits before the update.
        stats = online_losses.switch_statistics(logits[task.switch[0]], logits[net.name], labels)
        new = jax.tree.map(lambda kept, moved: jnp.where(stats["expert"], kept, moved), old, new)
        new_state = new_state.replace(switch={
            "expert": stats["expert"],
            "expert_steps": state.switch["expert_steps"] + stats["expert"].astype(jnp.int32)})
        metrics.update(switch_gap=stats["gap"], switch_threshold=stats["threshold"],
                       switch_expert=stats["expert"].astype(jnp.float32))
      new_state = new_state.with_network(net.name, new)
    return new_state, metrics

  return train_step


def make_phase_loss_step(task: Task, phase):
  """``loss_step(state, batch, teacher_variables) -> {'count', 'loss'}``: the sum over the real
  (mask 1) examples of ``phase``'s per-example loss, eval-mode BatchNorm (the phase's validation
  loss, :func:`gpd_jax.phases.validation_loss_sums`)."""
  with_features = phase.needs_features

  def loss_step(state: TrainState, batch, teacher_variables):
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    variables, student_batch_stats = state.variables("raw")
    _, teacher_features = frozen_outputs(task, teacher_variables, images, train=False,
                                         with_features=with_features)
    out = forward_network(task.networks[0], variables["params"], variables.get("consts"),
                          variables["batch_stats"], student_batch_stats, images, train=False,
                          with_features=with_features)
    features = {**teacher_features, **out[2]} if with_features else None
    return {"count": jnp.sum(mask),
            "loss": phases.validation_loss_sums(phase, out[0], labels, mask, features)}

  return loss_step


def make_eval_step(task: Task):
  """``eval_step(state, batch, teacher_variables) -> sums`` over the real (mask 1) examples.

  ``sums``: ``count``; for the student (``S``), the DT (``D``, GPD only) and the teacher (``T``):
  ``top1_*``, ``top5_*``, ``ce_*``; agreements ``agree_S_D`` and ``agree_S_T``; for each peer ``p``
  the same sums under ``P_<p>`` (and ``P_<p>_dt`` for a GPD peer) and ``agree_S_P_<p>``; and, when
  the state has an EMA, the same student/DT/peer sums of the EMA weights with the suffix ``_ema``.
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
      z_t = frozen_logits(task, teacher_variables, images, train=False)["teacher"]
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
      for peer in task.peers:
        variables, student_batch_stats = state.network(peer.name).variables(source)
        peer_logits, _ = forward_network(peer, variables["params"], variables.get("consts"),
                                         variables["batch_stats"], student_batch_stats, images,
                                         train=False)
        sums.update(net_sums(peer_logits[peer.name], labels, mask, f"P_{peer.name}{suffix}"))
        sums[f"agree_S_P_{peer.name}{suffix}"] = agree(logits["student"], peer_logits[peer.name], mask)
        if peer.gpd:
          sums.update(net_sums(peer_logits[peer.dt_name], labels, mask, f"P_{peer.dt_name}{suffix}"))
    return sums

  return eval_step
