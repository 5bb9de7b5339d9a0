"""``train_and_evaluate(config, workdir)``: the library entry point (launch/train.py, Colab, tests).

Sections, top to bottom: config checks → mesh → data → task (modules, spec, objective) → static
teacher → optimizer → state (restored from ``<workdir>/checkpoints`` if there is one, else initialised
sharded) → jitted steps → loop (log, evaluate, checkpoint) → export of the plain student.

Scenarios (``gpd_method.md`` §8.2) are config choices: GPD with a static teacher (``loss.base`` kd,
dkd or dist and ``gpd.enabled``); GPD from scratch (``loss.base='ce'``, no teacher); GPD fine-tuning
(``init.student`` names an export); the baselines with ``gpd.enabled=False``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from gpd_jax import checkpoint, data, interop, losses, optim, sharding
from gpd_jax.metric_writer import MetricWriter
from gpd_jax.state import Task, TrainState, build_task, init_state, model_kwargs
from gpd_jax.step import make_eval_step, make_train_step
from gpd_jax.transforms import export_student

class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last checkpoint (all finite) is kept."""


# ----------------------------------------------------------------------------------------------
# Config helpers.


def load_config_file(spec: str):
  """``'path/to/config.py[:arg]'`` -> ``get_config(arg)`` (the same syntax as ``--config``)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_gpd_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def run_identity(config, num_classes: int) -> dict:
  """What a checkpoint must agree on with the config that resumes it."""
  return {"model": config.model.name, "num_classes": num_classes, "gpd": bool(config.gpd.enabled),
          "ratio": int(config.gpd.ratio) if config.gpd.enabled else 1,
          "branches": bool(config.gpd.enabled and config.gpd.branches),
          "ema": bool(config.ema_decay)}


def _check_config(config, num_devices: int, batch_shards: int) -> None:
  if config.batch_size % batch_shards:
    raise ValueError(f"config.batch_size={config.batch_size} (global) is not divisible by the "
                     f"{batch_shards} devices on the batch axes of the mesh ({num_devices} devices in "
                     "all); pick a multiple, or set config.mesh.shape")
  eval_batch = config.get("eval_batch_size") or config.batch_size
  if eval_batch % batch_shards:
    raise ValueError(f"config.eval_batch_size={eval_batch} is not divisible by the {batch_shards} "
                     "devices on the batch axes of the mesh; pick a multiple")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1) (0 = no EMA), got {config.ema_decay}")
  has_teacher = bool(config.teacher.get("name"))
  if config.loss.base != "ce" and not has_teacher:
    raise ValueError(f"config.loss.base={config.loss.base!r} distils from a static teacher, but "
                     "config.teacher.name is empty; name a teacher or use loss.base='ce'")


def _sample_shape(config, info) -> tuple[int, int, int, int]:
  size = config.dataset.get("image_size") or info.image_shape[0]
  return (1, int(size), int(size), int(info.image_shape[-1]))


def _export_info(model_config, num_classes: int, sample_shape) -> dict:
  kwargs = {k: list(v) if isinstance(v, tuple) else v
            for k, v in dict(model_config.get("kwargs", {}) or {}).items()}
  return {"name": model_config.name, "num_classes": num_classes, "kwargs": kwargs,
          "input_shape": list(sample_shape)}


# ----------------------------------------------------------------------------------------------
# Static teacher and pre-trained student.


def load_teacher(config, workdir: str, num_classes: int, mesh):
  """``(module, variables)`` of the static teacher (replicated), or (None, None) without one.

  The module is built from the export's ``model.json``; it must be ``config.teacher.name``.

  ``config.teacher.checkpoint``: a PyTorch weight file (``.pth``, ``.pth.tar``, ``.safetensors``,
  ``.npz``; e.g. torchvision's ``resnet34-333f7ec4.pth``) in the layout of ``config.teacher.name``;
  when set it is used instead of ``config.teacher.workdir``.

  ``config.teacher.workdir``: a teacher run's workdir or an export directory. When it holds no
  export and ``config.teacher.config`` names a config file (``path.py[:arg]``), that run is trained
  there first (and resumes if cut off). Relative paths (both fields) are taken relative to this
  run's ``workdir``.
  """
  if not config.teacher.get("name"):
    return None, None
  teacher_kwargs = model_kwargs(config.teacher.get("model", {}) or {}, field="config.teacher.model")
  dtype = teacher_kwargs["dtype"]
  if config.teacher.get("checkpoint"):
    return _load_torch_teacher(config, workdir, num_classes, mesh, teacher_kwargs)
  teacher_dir = config.teacher.get("workdir") or ""
  if not teacher_dir:
    raise ValueError("config.teacher.workdir is empty: point it to a trained teacher's workdir or "
                     "export (e.g. a run of configs/imagenet_ce.py with model.name="
                     f"{config.teacher.name!r})")
  teacher_dir = os.path.join(workdir, teacher_dir)
  try:
    checkpoint.resolve_export_dir(teacher_dir)
  except FileNotFoundError:
    teacher_config = config.teacher.get("config") or ""
    if not teacher_config:
      raise FileNotFoundError(
          f"config.teacher.workdir: no trained teacher at {teacher_dir!r}. Train one first, e.g. "
          f"`python launch/train.py --config=<teacher config> --workdir={teacher_dir}`, or set "
          "config.teacher.config to have it trained there automatically") from None
    if jax.process_index() == 0:
      print(f"gpd_jax: no teacher at {teacher_dir}; training it first with {teacher_config}", flush=True)
    train_and_evaluate(load_config_file(teacher_config), teacher_dir)
  module, variables, info = checkpoint.load_export(teacher_dir, mesh, dtype=dtype)
  if info["name"] != config.teacher.name:
    raise ValueError(f"config.teacher.name={config.teacher.name!r}, but the teacher at {teacher_dir!r} "
                     f"is a {info['name']!r}")
  if info["num_classes"] != num_classes:
    raise ValueError(f"config.teacher: the teacher at {teacher_dir!r} has {info['num_classes']} classes "
                     f"but the dataset {config.dataset.name!r} has {num_classes}; the teacher "
                     "and the student must share the label space")
  return module, variables


def _load_torch_teacher(config, workdir: str, num_classes: int, mesh, teacher_kwargs: dict):
  """The static teacher from the PyTorch file ``config.teacher.checkpoint`` (replicated), built as
  ``models.create(config.teacher.name, num_classes, **config.teacher.model.kwargs, dtype=...)``."""
  path = os.path.join(workdir, config.teacher.checkpoint)
  module, variables, _ = interop.load_torch_model(
      path, config.teacher.name, num_classes=num_classes, field="config.teacher.checkpoint",
      **teacher_kwargs)
  return module, jax.device_put(variables, NamedSharding(mesh, P()))


def load_pretrained_student(config, workdir: str, task: Task, mesh):
  """The plain student variables to fine-tune from, or None.

  ``config.init.student``: an export, a workdir holding one, or a PyTorch weight file (``.pth``,
  ``.safetensors``, ``.npz``) of ``config.model.name``; relative to this run's workdir.
  """
  path = config.get("init", {}).get("student") or ""
  if not path:
    return None
  path = os.path.join(workdir, path)
  if interop.is_weight_file(path):
    variables = interop.load_torch_variables(path, config.model.name, task.student,
                                             task.sample_shape, num_classes=task.num_classes,
                                             field="config.init.student")
    return jax.device_put(variables, NamedSharding(mesh, P()))
  try:
    _, variables, info = checkpoint.load_export(path, mesh)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.init.student: {e}") from None
  if info["name"] != config.model.name or info["num_classes"] != task.num_classes:
    raise ValueError(f"config.init.student: {path!r} holds a {info['name']!r} with "
                     f"{info['num_classes']} classes, but config.model.name={config.model.name!r} "
                     f"with {task.num_classes} classes")
  return variables


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _mean_over_split(config, split: str, sums_fn, batch_sharding) -> dict:
  """Means of ``sums_fn(batch)`` over one pass of eval split ``split`` (padding masked out):
  percentages for accuracies and agreements, plain means for ``ce*``."""
  totals = None
  iterator = data.create_eval_iterator(config, split, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  for batch in iterator:
    sums = sums_fn(sharding.shard_batch(batch, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {k: float(v) / count * (1.0 if k.startswith("ce") else 100.0) for k, v in totals.items()}


def evaluate(config, split: str, eval_step, state, teacher_variables, batch_sharding) -> dict:
  """Student / DT / teacher / EMA metrics of ``state`` over eval split ``split``."""
  return _mean_over_split(config, split, lambda b: eval_step(state, b, teacher_variables),
                          batch_sharding)


# ----------------------------------------------------------------------------------------------
# The loop.


def _flush(pending: list, first_step: int) -> dict:
  """Means of the buffered per-step metrics; raises at the first non-finite loss."""
  fetched = jax.device_get(pending)
  for i, metrics in enumerate(fetched):
    if not metrics["finite"]:
      raise NonFiniteLossError(
          f"the loss became {metrics['total']} at step {first_step + i + 1}; stopping. The last "
          "checkpoint holds only finite values: lower config.schedule.base_lr, check the data, or "
          "enable config.optim.clip_norm, then run again to resume from it")
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}


def setup(config, workdir: str, *, training: bool = True) -> types.SimpleNamespace:
  """Everything a run needs, with the state restored from ``workdir`` or freshly initialised.

  Returns a namespace with ``mesh``, ``batch_sharding``, ``task``, ``teacher_variables``,
  ``schedule``, ``tx``, ``state`` (None when ``training`` is False and there is no checkpoint),
  ``state_shardings``, ``ckpt``, ``identity``, ``best``, ``train_iter`` (training only),
  ``steps_per_epoch``, ``total_steps``, ``sample_shape`` and ``num_classes``.
  """
  run = types.SimpleNamespace()
  # Mesh and batch layout.
  run.mesh = mesh = sharding.make_mesh(config.mesh)
  run.batch_sharding = sharding.batch_sharding(mesh, config.mesh)
  _check_config(config, jax.device_count(), sharding.num_batch_shards(mesh, config.mesh))

  # Data.
  info = data.get_dataset_info(config)
  run.num_classes = info.num_classes
  run.sample_shape = _sample_shape(config, info)
  run.steps_per_epoch = data.steps_per_epoch(config)
  run.total_steps = config.get("num_train_steps") or int(round(config.num_epochs * run.steps_per_epoch))
  run.train_iter = None
  if training:
    run.train_iter = data.create_train_iterator(config, process_index=jax.process_index(),
                                                process_count=jax.process_count())

  # Modules, teacher, optimizer.
  teacher, run.teacher_variables = load_teacher(config, workdir, info.num_classes, mesh)
  run.task = task = build_task(config, num_classes=info.num_classes, sample_shape=run.sample_shape,
                               teacher=teacher)
  run.schedule = optim.make_schedule(config.schedule, steps_per_epoch=run.steps_per_epoch,
                                     total_steps=run.total_steps)
  run.tx = optim.make_optimizer(config.optim, run.schedule)

  # State: restored into sharded abstract targets, or born sharded.
  pretrained = load_pretrained_student(config, workdir, task, mesh) if training else None
  init_fn = lambda rng, student: init_state(task, config, run.tx, rng, student)
  # RBG keys: XLA:CPU compiles threefry-based initialisers of a whole network very slowly (a tiny
  # GPD init: ~60 s with threefry vs ~10 s with RBG); the init is deterministic either way.
  rng = jax.random.key(config.seed, impl="rbg")
  abstract = jax.eval_shape(init_fn, rng, pretrained)
  run.state_shardings = sharding.tree_shardings(mesh, abstract, config.mesh.get("param_rules", ()))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, run.state_shardings)
  run.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.get("keep_checkpoints", 3))
  run.identity = run_identity(config, info.num_classes)
  restored = run.ckpt.restore_latest(abstract, run.identity)
  run.best = {}
  if restored is not None:
    run.state, data_state, ckpt_info = restored
    if training:
      run.train_iter.set_state(data_state)
    run.best = ckpt_info.get("best", {})
    if jax.process_index() == 0:
      print(f"gpd_jax: resuming from step {int(run.state.step)} in {run.ckpt.directory}", flush=True)
  elif training:
    run.state = jax.jit(init_fn, out_shardings=run.state_shardings)(rng, pretrained)
  else:
    run.state = None
  return run


def _jit_steps(config, run):
  replicated = NamedSharding(run.mesh, P())
  teacher_shardings = (None if run.teacher_variables is None else
                       jax.tree.map(lambda _: replicated, run.teacher_variables))
  train_step = jax.jit(make_train_step(run.task, run.tx, run.schedule, config.ema_decay),
                       in_shardings=(run.state_shardings, run.batch_sharding, teacher_shardings),
                       out_shardings=(run.state_shardings, replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(run.task),
                      in_shardings=(run.state_shardings, run.batch_sharding, teacher_shardings),
                      out_shardings=replicated)
  return train_step, eval_step


def evaluate_checkpoint(config, workdir: str, splits: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in ``workdir`` (student, DT, teacher, EMA) on ``splits``
  (default: the config's eval and test splits)."""
  workdir = os.path.abspath(workdir)
  run = setup(config, workdir, training=False)
  try:
    if run.state is None:
      raise FileNotFoundError(f"no checkpoint in {run.ckpt.directory}")
    _, eval_step = _jit_steps(config, run)
    splits = splits or {**dict(config.dataset.get("eval_splits", {}) or {}),
                        **dict(config.dataset.get("test_splits", {}) or {})}
    return {name: evaluate(config, split, eval_step, run.state, run.teacher_variables,
                           run.batch_sharding) for name, split in splits.items()}
  finally:
    run.ckpt.close()


def evaluate_export(config, path: str, splits: dict | None = None) -> dict:
  """Top-1/top-5 (%) and CE of an exported plain model on ``splits`` (default: eval + test)."""
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh)
  module, variables, _ = checkpoint.load_export(path, mesh)

  @jax.jit
  def eval_step(variables, batch):
    logits = module.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask, labels = batch["mask"], batch["label"]
    k = min(5, logits.shape[-1])
    return {"count": jnp.sum(mask),
            "top1": jnp.sum(mask * losses.top_k_correct(logits, labels, 1)),
            "top5": jnp.sum(mask * losses.top_k_correct(logits, labels, k)),
            "ce": jnp.sum(mask * losses.cross_entropy(logits, labels))}

  splits = splits or {**dict(config.dataset.get("eval_splits", {}) or {}),
                      **dict(config.dataset.get("test_splits", {}) or {})}
  return {name: _mean_over_split(config, split, lambda b: eval_step(variables, b), batch_sharding)
          for name, split in splits.items()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final metrics.

  Writes ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and, at the end, ``export/`` (the plain
  student, from the raw weights) and ``export_ema/`` (from the EMA weights, when enabled).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  run = setup(config, workdir)
  mesh, batch_sharding, task, ckpt = run.mesh, run.batch_sharding, run.task, run.ckpt
  teacher_variables, state, best, train_iter = (run.teacher_variables, run.state, run.best,
                                                run.train_iter)
  steps_per_epoch, total_steps, identity = run.steps_per_epoch, run.total_steps, run.identity
  train_step, eval_step = _jit_steps(config, run)

  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main)
  eval_splits = dict(config.dataset.get("eval_splits", {}) or {})
  test_splits = dict(config.dataset.get("test_splits", {}) or {})
  eval_every = int(config.get("eval_every_epochs", 1) * steps_per_epoch) or steps_per_epoch
  log_every = max(1, int(config.get("log_every_steps", 50)))
  ckpt_every = max(1, int(config.get("checkpoint_every_steps") or steps_per_epoch))
  select_key = config.get("select_metric", "top1_S")
  if is_main:
    print(f"gpd_jax: {config.model.name} on {config.dataset.name}, {total_steps} steps "
          f"({steps_per_epoch}/epoch), global batch {config.batch_size} on {mesh.size} "
          f"devices ({config.batch_size // sharding.num_batch_shards(mesh, config.mesh)} per device), "
          f"GPD={'on r=%d' % config.gpd.ratio if config.gpd.enabled else 'off'}, "
          f"teacher={config.teacher.get('name') or 'none'}, workdir={workdir}", flush=True)

  def run_evals(step: int, splits: dict, kind: str) -> dict:
    results = {}
    for name, split in splits.items():
      metrics = evaluate(config, split, eval_step, state, teacher_variables, batch_sharding)
      metrics["epoch"] = step / steps_per_epoch
      writer.write(step, f"{kind}/{name}", metrics)
      results[name] = metrics
    return results

  def save(step: int) -> None:
    ckpt.save(step, state, train_iter.get_state(),
              {"run": identity, "best": best, "epoch": step / steps_per_epoch})

  step = int(state.step)
  pending, window_start, window_time = [], step, time.perf_counter()
  progress = tqdm.tqdm(total=total_steps, initial=step, disable=not is_main, desc="train",
                       dynamic_ncols=True)
  last_evals = {}
  try:
    while step < total_steps:
      batch = sharding.shard_batch(next(train_iter), batch_sharding)
      state, metrics = train_step(state, batch, teacher_variables)
      pending.append(metrics)
      step += 1
      progress.update(1)
      at_end = step == total_steps
      if step % log_every == 0 or at_end or step % ckpt_every == 0:
        means = _flush(pending, window_start)  # also guards the checkpoint below against NaNs
        elapsed = time.perf_counter() - window_time
        means["images_per_sec"] = len(pending) * config.batch_size / max(elapsed, 1e-9)
        means["epoch"] = step / steps_per_epoch
        writer.write(step, "train", means)
        progress.set_postfix(loss=f"{means['total']:.3f}", lr=f"{means['lr']:.3g}")
        pending, window_start, window_time = [], step, time.perf_counter()
      if step % eval_every == 0 or at_end:
        last_evals = run_evals(step, eval_splits, "eval")
        if eval_splits:
          first = last_evals[next(iter(eval_splits))]
          for key, value in first.items():
            if key.startswith(("top1", "top5", "agree")) and value > best.get(key, -1.0):
              best[key] = value
          writer.write(step, "best", best)
          progress.write(f"step {step} epoch {step / steps_per_epoch:.2f}: " + ", ".join(
              f"{k}={v:.2f}" for k, v in first.items() if k.startswith("top1")))
      if step % ckpt_every == 0 or at_end:
        save(step)
    progress.close()
    ckpt.wait()
    final = {"eval": last_evals, "best": best, "step": step}
    if test_splits:
      final["test"] = run_evals(step, test_splits, "test")
    _export(config, task, state, workdir, run.sample_shape, run.num_classes)
    if is_main:
      print(f"gpd_jax: done at step {step}; best {select_key}="
            f"{best.get(select_key, float('nan')):.2f}; exported to {workdir}/export", flush=True)
    return final
  finally:
    progress.close()
    ckpt.wait()
    ckpt.close()
    writer.close()


def _export(config, task: Task, state: TrainState, workdir: str, sample_shape, num_classes) -> None:
  """CBR: the plain student from the raw (``export/``) and EMA (``export_ema/``) weights."""
  model_info = _export_info(config.model, num_classes, sample_shape)
  sources = ["raw"] + (["ema"] if state.ema is not None else [])
  for source in sources:
    variables, student_batch_stats = state.variables(source)
    if task.gpd:
      _, plain = export_student(task.model, variables, student_batch_stats, spec=task.view_spec)
    else:
      plain = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    plain = jax.device_get(plain)
    directory = os.path.join(workdir, "export" if source == "raw" else "export_ema")
    if jax.process_index() == 0:
      checkpoint.save_export(directory, plain, model_info)
