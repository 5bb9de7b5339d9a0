"""``train_and_evaluate(config, workdir)``: the library entry point (launch/train.py, Colab, tests).

Sections, top to bottom: config checks → mesh → data → task (modules, spec, objective) → static
teacher → optimizer → state (restored from ``<workdir>/checkpoints`` if there is one, else initialised
sharded) → jitted steps → loop (log, evaluate, checkpoint) → export of the plain student.

Scenarios (``docs/method.md`` §8.2) are config choices: GPD with a static teacher (``loss.base`` kd,
dkd or dist and ``gpd.enabled``); GPD from scratch (``loss.base='ce'``, no teacher); GPD fine-tuning
(``init.student`` names an export); the baselines with ``gpd.enabled=False``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gpd_jax import checkpoint, data, feature_kd, interop, losses, mixup, optim, phases, report, sharding, validate
from gpd_jax.metric_writer import MetricWriter
from gpd_jax.progress import Progress
from gpd_jax.state import Task, TrainState, build_task, init_state, model_kwargs
from gpd_jax.step import make_eval_step, make_phase_loss_step, make_train_step
from gpd_jax.transforms import export_student

CONFIG_FILE = "config.json"  # the run's config, saved in its workdir


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last checkpoint (all finite) is kept."""


# ----------------------------------------------------------------------------------------------
# Config helpers.


def load_config_file(spec: str):
  """``'path/to/config.py[:arg]'`` -> ``get_config(arg)`` (the same syntax as ``--config``)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise validate.ConfigError(f"config file {path!r} does not exist; check the path")
  module_spec = importlib.util.spec_from_file_location("_gpd_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise validate.ConfigError(f"config file {path!r} does not load ({type(e).__name__}: {e}); fix "
                               "the file") from None
  if not hasattr(module, "get_config"):
    raise validate.ConfigError(f"config file {path!r} defines no get_config(arg=None); add one")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise validate.ConfigError(f"config file {path!r}: {e}") from None


def run_identity(config, num_classes: int, steps_per_epoch: int, total_steps: int) -> dict:
  """What a checkpoint must agree on with the config that resumes it (see
  :func:`gpd_jax.validate.resume_identity`)."""
  return validate.resume_identity(config, num_classes, steps_per_epoch, total_steps)


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


def load_teacher(config, workdir: str, num_classes: int, mesh, teacher_config=None,
                 field: str = "config.teacher"):
  """``(module, variables)`` of the static teacher (replicated), or (None, None) without one.

  The module is built from the export's ``model.json``; it must be ``config.teacher.name``.

  ``config.teacher.checkpoint``: a PyTorch weight file (``.pth``, ``.pth.tar``, ``.safetensors``,
  ``.npz``; e.g. torchvision's ``resnet34-333f7ec4.pth``) in the layout of ``config.teacher.name``;
  when set it is used instead of ``config.teacher.workdir``.

  ``config.teacher.workdir``: a teacher run's workdir or an export directory. When it holds no
  export and ``config.teacher.config`` names a config file (``path.py[:arg]``), that run is trained
  there first (and resumes if cut off). Relative paths (both fields) are taken relative to this
  run's ``workdir``.

  ``teacher_config``/``field``: another frozen teacher's entry, read the same way from its export
  (``config.online.teachers.<name>``), instead of ``config.teacher``.
  """
  teacher = config.teacher if teacher_config is None else teacher_config
  if not teacher.get("name"):
    return None, None
  teacher_kwargs = model_kwargs(teacher.get("model", {}) or {}, field=f"{field}.model")
  dtype = teacher_kwargs["dtype"]
  if teacher_config is None and config.teacher.get("checkpoint"):
    return _load_torch_teacher(config, workdir, num_classes, mesh, teacher_kwargs)
  teacher_dir = teacher.get("workdir") or ""
  if not teacher_dir:
    raise ValueError(f"{field}.workdir is empty: point it to a trained teacher's workdir or "
                     "export (e.g. a run of configs/imagenet_ce.py with model.name="
                     f"{teacher.name!r})")
  teacher_dir = os.path.join(workdir, teacher_dir)
  try:
    checkpoint.resolve_export_dir(teacher_dir)
  except FileNotFoundError:
    run_config = teacher.get("config") or ""
    if not run_config:
      raise FileNotFoundError(
          f"{field}.workdir: no trained teacher at {teacher_dir!r}. Train one first, e.g. "
          f"`python launch/train.py --config=<teacher config> --workdir={teacher_dir}`, or set "
          f"{field}.config to have it trained there automatically") from None
    if jax.process_index() == 0:
      print(f"gpd_jax: no teacher at {teacher_dir}; training it first with {run_config}", flush=True)
    train_and_evaluate(load_config_file(run_config), teacher_dir)
  module, variables, info = checkpoint.load_export(teacher_dir, mesh, dtype=dtype)
  if info["name"] != teacher.name:
    raise ValueError(f"{field}.name={teacher.name!r}, but the teacher at {teacher_dir!r} "
                     f"is a {info['name']!r}")
  if info["num_classes"] != num_classes:
    raise ValueError(f"{field}: the teacher at {teacher_dir!r} has {info['num_classes']} classes "
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


def load_pretrained_peers(config, workdir: str, task: Task, mesh) -> dict:
  """``{name: plain variables}`` of the peers whose ``config.online.peers.<name>.init`` names an
  export (or a workdir holding one; relative to this run's workdir)."""
  out = {}
  for name, peer in ((config.get("online") or {}).get("peers") or {}).items():
    if not peer.get("init"):
      continue
    field, path = f"config.online.peers.{name}.init", os.path.join(workdir, peer.init)
    try:
      _, out[name], info = checkpoint.load_export(path, mesh)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{field}: {e}") from None
    if info["name"] != peer.model.name or info["num_classes"] != task.num_classes:
      raise ValueError(f"{field}: {path!r} holds a {info['name']!r} with {info['num_classes']} "
                       f"classes, but the peer is a {peer.model.name!r} with {task.num_classes}")
  return out


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _mean_over_split(config, split: str, sums_fn, batch_sharding, wrap=None) -> dict:
  """Means of ``sums_fn(batch)`` over one pass of eval split ``split`` (padding masked out):
  percentages for accuracies and agreements, plain means for ``ce*``. ``wrap``: an optional
  wrapper of the batch iterator (progress display)."""
  totals = None
  iterator = data.create_eval_iterator(config, split, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  for batch in (wrap(iterator) if wrap else iterator):
    sums = sums_fn(sharding.shard_batch(batch, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {k: float(v) / count * (1.0 if k.startswith("ce") else 100.0) for k, v in totals.items()}


def evaluate(config, split: str, eval_step, state, teacher_variables, batch_sharding,
             wrap=None) -> dict:
  """Student / DT / teacher / EMA metrics of ``state`` over eval split ``split``."""
  return _mean_over_split(config, split, lambda b: eval_step(state, b, teacher_variables),
                          batch_sharding, wrap)


# ----------------------------------------------------------------------------------------------
# The loop.


def _flush(pending: list, first_step: int) -> dict:
  """Means of the buffered per-step metrics; raises at the first non-finite loss."""
  fetched = jax.device_get(pending)
  for i, metrics in enumerate(fetched):
    if not metrics["finite"]:
      raise NonFiniteLossError(
          f"the loss became {metrics['total']} at step {first_step + i + 1}; stopping. The last "
          "checkpoint holds only finite values: lower config.schedule.base_lr or check the data, "
          "then run again to resume from it (turning on config.optim.clip_norm changes the "
          "optimizer state, so it needs a new --workdir)")
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}


@dataclasses.dataclass
class Run:
  """Everything a run needs, built by :func:`setup` (the state restored or freshly initialised).

  Attributes:
    mesh, batch_sharding: the device mesh and the sharding of a batch's leading axis.
    num_classes, sample_shape: K and [1, S, S, C] of one input.
    steps_per_epoch, total_steps: the loop's length.
    train_iter: the resumable training iterator (None when only evaluating).
    task: modules, student-view spec and objective (static).
    teacher_variables: the static teacher's variables (replicated), or None.
    schedule, tx: the learning-rate schedule and the optax optimizer.
    state: the :class:`TrainState` (None when evaluating a workdir without checkpoint).
    state_shardings: the state's shardings (jit in/out shardings).
    ckpt: the workdir's :class:`~gpd_jax.checkpoint.Checkpointer`.
    identity: what a checkpoint must agree on to be resumed by this config.
    best: best value so far of each top-1/top-5/agreement metric (first eval split).
    best_step: the step at which ``config.select_metric`` was best, or None.
    last_evals: the latest ``{split: metrics}`` of the eval splits.
    plan: a multi-phase run's phases (``gpd_jax/phases.py``), else ().
    phase_txs, phase_schedules: each phase's optimizer and schedule (``tx``/``schedule`` are the
      current phase's; ``state_shardings`` too).
    phase_targets: ``phase_targets(k) -> (abstract state, shardings)`` of phase k's state.
  """
  mesh: Any
  batch_sharding: Any
  num_classes: int
  sample_shape: tuple
  steps_per_epoch: int
  total_steps: int
  train_iter: Any
  task: Task
  teacher_variables: Any
  schedule: Callable
  tx: Any
  state: TrainState | None
  state_shardings: Any
  ckpt: checkpoint.Checkpointer
  identity: dict
  best: dict
  best_step: int | None = None
  last_evals: dict = dataclasses.field(default_factory=dict)
  plan: tuple = ()
  phase_txs: tuple = ()
  phase_schedules: tuple = ()
  phase_targets: Callable | None = None


def setup(config, workdir: str, *, training: bool = True) -> Run:
  """Everything a run needs, with the state restored from ``workdir`` or freshly initialised
  (see :class:`Run`)."""
  # Mesh and batch layout.
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh)

  # Data.
  info = data.get_dataset_info(config)
  sample_shape = _sample_shape(config, info)
  steps_per_epoch = data.steps_per_epoch(config)
  total_steps = validate.run_steps(config, steps_per_epoch)
  train_iter = None
  if training:
    train_iter = data.create_train_iterator(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())

  # Modules, teacher, optimizer.
  teacher, teacher_variables = load_teacher(config, workdir, info.num_classes, mesh)
  extra_modules, extra_variables = {}, {}
  for name, entry in ((config.get("online") or {}).get("teachers") or {}).items():
    extra_modules[name], extra_variables[name] = load_teacher(
        config, workdir, info.num_classes, mesh, entry, field=f"config.online.teachers.{name}")
  if extra_variables:  # several frozen teachers: the steps take {name: variables}
    teacher_variables = {**({"teacher": teacher_variables} if teacher else {}), **extra_variables}
  labels = None  # CRD's memory bank: one row per training example, negatives from the labels
  if data.pipeline.needs_example_index(config):
    labels = data.pipeline.cached_train_labels(  # one process writes the cache
        config, os.path.join(workdir, "train_labels.npz"), write=training and jax.process_index() == 0)
  task = build_task(config, num_classes=info.num_classes, sample_shape=sample_shape,
                    teacher=teacher, steps_per_epoch=steps_per_epoch, extra_teachers=extra_modules,
                    train_labels=labels)
  plan = phases.make_plan(config, steps_per_epoch)
  phases.check_taps(plan, task.student, teacher, sample_shape)
  if plan:  # one optimizer (and schedule) per phase, each on the phase's own steps
    phase_txs = tuple(phases.make_optimizer(p, steps_per_epoch) for p in plan)
    phase_schedules = tuple(phases.make_schedule(p, steps_per_epoch) for p in plan)
    schedule, tx = phase_schedules[0], phase_txs[0]
  else:
    phase_txs, phase_schedules = (), ()
    schedule = optim.make_schedule(config.schedule, steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps)
    tx = optim.make_optimizer(config.optim, schedule)

  # State: restored into sharded abstract targets, or born sharded.
  pretrained = None  # (plain student, {peer: plain variables}) to start from
  if training:
    pretrained = (load_pretrained_student(config, workdir, task, mesh),
                  load_pretrained_peers(config, workdir, task, mesh))

  def init_fn(rng, start, phase_index=0):
    if not plan:
      return init_state(task, config, tx, rng, *(start or (None, None)))
    # Phase k's state has phase k's optimizer structure; a fresh run is in phase 0.
    state = init_state(task, config, phase_txs[phase_index], rng, *(start or (None, None)))
    return state.replace(phase=phases.initial_phase_state(state, phase_index,
                                                          plan[phase_index].start_step))

  # RBG keys: XLA:CPU compiles threefry-based initialisers of a whole network very slowly (a tiny
  # GPD init: ~60 s with threefry vs ~10 s with RBG); the init is deterministic either way.
  rng = jax.random.key(config.seed, impl="rbg")

  def targets(phase_index=0):
    abstract = jax.eval_shape(functools.partial(init_fn, phase_index=phase_index), rng, pretrained)
    rules = (*config.mesh.get("param_rules", ()), *feature_kd.state_sharding_rules(
        config.get("features", {}), tuple(config.mesh.get("batch_axes", ("data",))),
        sharding.num_batch_shards(mesh, config.mesh)))
    shardings = sharding.tree_shardings(mesh, abstract, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings

  abstract, state_shardings = targets()
  if plan:
    phases.check_patterns(plan, abstract.params)
  # Evaluation only reads: it never moves a damaged step aside, and needs the same model only.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.get("keep_checkpoints", 3), read_only=not training)
  identity = run_identity(config, info.num_classes, steps_per_epoch, total_steps)
  # A phased checkpoint holds its phase's optimizer structure: read the phase first.
  target = (lambda ckpt_info: targets(int(ckpt_info.get("phase", 0)))[0]) if plan else abstract
  restored = ckpt.restore_latest(
      target, identity, identity_fields=None if training else checkpoint.MODEL_IDENTITY_FIELDS)
  best, best_step, state = {}, None, None
  if restored is not None:
    state, data_state, ckpt_info = restored
    if training:
      train_iter.set_state(data_state)
    best, best_step = ckpt_info.get("best", {}), ckpt_info.get("best_step")
    if plan:
      phase_index = int(state.phase["index"])
      schedule, tx = phase_schedules[phase_index], phase_txs[phase_index]
      state_shardings = targets(phase_index)[1]
    if jax.process_index() == 0:
      print(f"gpd_jax: {'resuming from' if training else 'evaluating'} step {int(state.step)} in "
            f"{ckpt.directory}", flush=True)
  elif training:
    state = jax.jit(init_fn, out_shardings=state_shardings)(rng, pretrained)
  return Run(mesh=mesh, batch_sharding=batch_sharding, num_classes=info.num_classes,
             sample_shape=sample_shape, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
             train_iter=train_iter, task=task, teacher_variables=teacher_variables,
             schedule=schedule, tx=tx, state=state, state_shardings=state_shardings, ckpt=ckpt,
             identity=identity, best=best, best_step=best_step, plan=plan, phase_txs=phase_txs,
             phase_schedules=phase_schedules, phase_targets=targets if plan else None)


def _jit_steps(config, run: Run):
  """``(train_step, eval_step)``; a multi-phase run's ``train_step`` is the current phase's."""
  replicated = NamedSharding(run.mesh, P())
  teacher_shardings = _teacher_shardings(run)
  if run.plan:
    train_step = _jit_phase_step(config, run, int(run.state.phase["index"]))
  else:
    mix = mixup.mixup_spec(config, run.num_classes)
    train_step = jax.jit(make_train_step(run.task, run.tx, run.schedule, config.ema_decay, mix=mix),
                         in_shardings=(run.state_shardings, run.batch_sharding, teacher_shardings),
                         out_shardings=(run.state_shardings, replicated), donate_argnums=(0,))
  # A phased state changes its optimizer structure between phases: its eval step takes the state's
  # shardings as they come (it reads the weights only).
  eval_step = jax.jit(make_eval_step(run.task),
                      in_shardings=(None if run.plan else run.state_shardings, run.batch_sharding,
                                    teacher_shardings),
                      out_shardings=replicated)
  return train_step, eval_step


def _teacher_shardings(run: Run):
  replicated = NamedSharding(run.mesh, P())
  return (None if run.teacher_variables is None else
          jax.tree.map(lambda _: replicated, run.teacher_variables))


def _jit_phase_step(config, run: Run, index: int):
  """Phase ``index``'s jitted train step (its objective, optimizer and state structure)."""
  phase = run.plan[index]
  shardings = run.phase_targets(index)[1]
  step = make_train_step(phases.phase_task(run.task, phase, config), run.phase_txs[index],
                         run.phase_schedules[index], config.ema_decay, phase=phase)
  return jax.jit(step, in_shardings=(shardings, run.batch_sharding, _teacher_shardings(run)),
                 out_shardings=(shardings, NamedSharding(run.mesh, P())), donate_argnums=(0,))


def _enter_phase(run: Run, state, index: int):
  """``state`` moved into phase ``index`` (:func:`gpd_jax.phases.enter`), sharded for it."""
  shardings = run.phase_targets(index)[1]
  enter = functools.partial(phases.enter, phase=run.plan[index], tx=run.phase_txs[index])
  return jax.jit(enter, out_shardings=shardings, donate_argnums=(0,))(state)


def _phase_validation_loss(loop: "LoopContext", state, index: int) -> float:
  """Phase ``index``'s mean per-example loss on the first eval split (eval-mode BatchNorm)."""
  run = loop.run
  eval_splits = dict(loop.config.dataset.get("eval_splits", {}) or {})
  split = next(iter(eval_splits.values()))
  if index not in loop.phase_loss_steps:
    loss_step = make_phase_loss_step(phases.phase_task(run.task, run.plan[index], loop.config),
                                     run.plan[index])
    loop.phase_loss_steps[index] = jax.jit(
        loss_step, in_shardings=(run.phase_targets(index)[1], run.batch_sharding,
                                 _teacher_shardings(run)),
        out_shardings=NamedSharding(run.mesh, P()))
  loss_step = loop.phase_loss_steps[index]
  totals = None
  for batch in data.create_eval_iterator(loop.config, split, process_index=jax.process_index(),
                                         process_count=jax.process_count()):
    sums = loss_step(state, sharding.shard_batch(batch, run.batch_sharding), run.teacher_variables)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return float(totals["loss"]) / float(totals["count"])


def evaluate_checkpoint(config, workdir: str, splits: dict | None = None) -> dict:
  """Evaluates the latest checkpoint in ``workdir`` (student, DT, teacher, EMA) on ``splits``
  (default: the config's eval and test splits)."""
  workdir = os.path.abspath(workdir)
  validate.check_run(config, workdir, training=False, splits=splits)
  run = setup(config, workdir, training=False)
  try:
    if run.state is None:
      raise validate.ConfigError(f"--workdir={workdir}: no checkpoint in {run.ckpt.directory}; give "
                                 "the workdir of a training run, or evaluate an export with --export")
    _, eval_step = _jit_steps(config, run)
    splits = splits or {**dict(config.dataset.get("eval_splits", {}) or {}),
                        **dict(config.dataset.get("test_splits", {}) or {})}
    return {name: evaluate(config, split, eval_step, run.state, run.teacher_variables,
                           run.batch_sharding) for name, split in splits.items()}
  finally:
    run.ckpt.close()


def evaluate_export(config, path: str, splits: dict | None = None) -> dict:
  """Top-1/top-5 (%) and CE of an exported plain model on ``splits`` (default: eval + test)."""
  validate.check_config(config)
  try:
    checkpoint.read_model_info(path)
  except FileNotFoundError as e:
    raise validate.ConfigError(f"--export: {e}") from None
  validate.check_data(config, splits, training=False)
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh)
  module, variables, _ = checkpoint.load_export(path, mesh)

  @jax.jit
  def eval_step(variables, batch):
    logits = module.apply(variables, batch["image"], train=False).astype(jnp.float32)
    return {"count": jnp.sum(batch["mask"]),
            **losses.classification_sums(logits, batch["label"], batch["mask"])}

  splits = splits or {**dict(config.dataset.get("eval_splits", {}) or {}),
                      **dict(config.dataset.get("test_splits", {}) or {})}
  return {name: _mean_over_split(config, split, lambda b: eval_step(variables, b), batch_sharding)
          for name, split in splits.items()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final metrics.

  Writes ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``export_best/``
  (the plain student at the best ``config.select_metric``, updated at each evaluation that
  improves it) and, at the end, ``export/`` (the last raw weights) and ``export_ema/`` (the last EMA
  weights, when enabled). Returns ``{'eval': {split: metrics}, 'test': {...}, 'best': {...},
  'best_step': int, 'step': int}``.
  """
  workdir = os.path.abspath(workdir)
  validate.check_run(config, workdir)  # seconds; before anything is created or compiled
  os.makedirs(workdir, exist_ok=True)
  run = setup(config, workdir)  # (trains a missing static teacher first when configured to)
  started = time.perf_counter()
  if int(run.state.step) >= run.total_steps and _exports_intact(workdir, run.state):
    # A finished run: change nothing on disk (no metrics, no events, no new export).
    run.ckpt.close()
    if jax.process_index() == 0:
      print(f"gpd_jax: {workdir} already finished at step {int(run.state.step)} (of "
            f"{run.total_steps}); its exports are intact, nothing to do. Raise config.num_epochs "
            "to train longer.", flush=True)
    return {"eval": {}, "best": run.best, "step": int(run.state.step), "already_finished": True}
  is_main = jax.process_index() == 0
  if is_main:
    save_config(config, workdir)
    save_train_subset(config, workdir)
  train_step, eval_step = _jit_steps(config, run)
  writer = MetricWriter(workdir, enabled=is_main)
  progress = Progress(run.total_steps, int(run.state.step), enabled=is_main)
  loop = LoopContext(config=config, run=run, workdir=workdir, train_step=train_step,
                     eval_step=eval_step, writer=writer, progress=progress,
                     cadence=Cadence.from_config(config, run.steps_per_epoch, run.total_steps,
                                                 run.plan))
  if is_main:
    print(_run_header(config, run, workdir), flush=True)
  try:
    state = _train_loop(loop)
    return _finish(loop, state, seconds_since=started)
  finally:
    progress.close()
    run.ckpt.wait()
    run.ckpt.close()
    writer.close()


def _run_header(config, run: Run, workdir: str) -> str:
  per_device = config.batch_size // sharding.num_batch_shards(run.mesh, config.mesh)
  gpd = f"on, r={config.gpd.ratio}" if config.gpd.enabled else "off"
  return (f"gpd_jax: {config.model.name} on {config.dataset.name}, {run.total_steps} steps "
          f"({run.steps_per_epoch}/epoch), global batch {config.batch_size} on {run.mesh.size} "
          f"devices ({per_device} per device), GPD {gpd}, teacher "
          f"{config.teacher.get('name') or 'none'}, workdir {workdir}")


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and checkpoints; every count is in steps."""
  log_every: int
  eval_every: int
  checkpoint_every: int
  total_steps: int
  phase_ends: tuple[int, ...] = ()  # a multi-phase run also checkpoints at the end of each phase

  @classmethod
  def from_config(cls, config, steps_per_epoch: int, total_steps: int, plan=()) -> "Cadence":
    eval_every = int(config.get("eval_every_epochs", 1) * steps_per_epoch) or steps_per_epoch
    return cls(log_every=max(1, int(config.get("log_every_steps", 50))),
               eval_every=max(1, eval_every),
               checkpoint_every=max(1, int(config.get("checkpoint_every_steps") or steps_per_epoch)),
               total_steps=total_steps, phase_ends=tuple(p.end_step for p in plan))

  def checkpoint_due(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.total_steps or step in self.phase_ends

  def eval_due(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def log_due(self, step: int) -> bool:
    # A checkpoint is only written after the steps before it were checked for NaNs (logged).
    return step % self.log_every == 0 or self.checkpoint_due(step)


@dataclasses.dataclass
class LoopContext:
  """What the training loop reads: the run, its jitted steps and its outputs."""
  config: Any
  run: Run
  workdir: str
  train_step: Callable
  eval_step: Callable
  writer: MetricWriter
  progress: Progress
  cadence: Cadence
  phase_loss_steps: dict = dataclasses.field(default_factory=dict)  # phase -> jitted val-loss sums


def _train_loop(loop: LoopContext):
  """Steps from the state's step to ``total_steps``: logs, evaluates (exporting the best student)
  and checkpoints on the loop's cadence. A multi-phase run enters each phase at its first step (see
  :func:`gpd_jax.phases.enter`), tracks the phase's best weights by validation loss, and checkpoints
  at each phase's end. Returns the final state."""
  config, run, progress, cadence = loop.config, loop.run, loop.progress, loop.cadence
  state = run.state
  step = first_step = int(state.step)
  train_step = loop.train_step
  phase_index = int(state.phase["index"]) if run.plan else None
  pending = []  # per-step metrics not yet fetched: fetching every step would stall dispatch
  window_first_step, untimed_steps = step, 0
  while step < cadence.total_steps:
    if run.plan and step == run.plan[phase_index].end_step:
      # A phase boundary (also right after a resume from the previous phase's last checkpoint).
      phase_index += 1
      state = _enter_phase(run, state, phase_index)
      train_step = _jit_phase_step(config, run, phase_index)
      first_step = step  # the new step compiles: time it apart
      progress.write(f"step {step}: phase {phase_index} ({run.plan[phase_index].name}) starts from "
                     f"the {run.plan[phase_index].start} weights of the previous phase")
    batch = sharding.shard_batch(next(run.train_iter), run.batch_sharding)
    if step == first_step:
      # The first call compiles; time it apart so throughput counts training alone.
      with progress.timed("compiling the train step (the first step waits for it)"):
        state, metrics = train_step(state, batch, run.teacher_variables)
        jax.block_until_ready(metrics)
      untimed_steps += 1
    else:
      state, metrics = train_step(state, batch, run.teacher_variables)
    pending.append(metrics)
    progress.dispatched(metrics)
    step += 1
    if cadence.log_due(step):
      progress.wait_all()
      means = _flush(pending, window_first_step)  # also guards the checkpoint below against NaNs
      timed_steps = len(pending) - untimed_steps
      seconds = progress.window_seconds()
      if timed_steps > 0:
        means["images_per_sec"] = timed_steps * config.batch_size / seconds
        means["seconds_per_step"] = seconds / timed_steps
      means["epoch"] = step / run.steps_per_epoch
      if run.plan:
        means["phase"] = phase_index
      loop.writer.write(step, "train", means)
      progress.log(step, means, epoch=means["epoch"])
      pending, window_first_step, untimed_steps = [], step, 0
    if cadence.eval_due(step):
      progress.wait_all()
      _evaluate_and_select(loop, state, step)
    if run.plan and _phase_best_due(run, phase_index, step, cadence):
      progress.wait_all()
      state = _select_phase_best(loop, state, phase_index, step)
    if cadence.checkpoint_due(step):
      with progress.paused():
        info = {"run": run.identity, "best": run.best, "best_step": run.best_step,
                "epoch": step / run.steps_per_epoch}
        if run.plan:
          info["phase"] = phase_index  # read before the state: it fixes the optimizer's structure
        run.ckpt.save(step, state, run.train_iter.get_state(), info)
  return state


def _phase_best_due(run: Run, index: int, step: int, cadence: Cadence) -> bool:
  """Whether to measure phase ``index``'s validation loss at ``step``: when the next phase starts
  from the best weights, at each evaluation and at the phase's last step."""
  following = run.plan[index + 1] if index + 1 < len(run.plan) else None
  if following is None or following.start != "best":
    return False
  return cadence.eval_due(step) or step == run.plan[index].end_step


def _select_phase_best(loop: LoopContext, state, index: int, step: int):
  """Records the current weights as the phase's best when its validation loss improved."""
  loss = _phase_validation_loss(loop, state, index)
  best = float(jax.device_get(state.phase["best_loss"]))
  improved = loss < best
  loop.writer.write(step, "phase", {"index": index, "val_loss": loss, "best_val_loss": min(loss, best)})
  loop.progress.write(f"step {step} phase {index} ({loop.run.plan[index].name}): validation loss "
                      f"{loss:.5f}" + (" (best so far: kept)" if improved else f" (best {best:.5f})"))
  if not improved:
    return state
  shardings = loop.run.phase_targets(index)[1]
  return jax.jit(phases.remember_best, out_shardings=shardings, donate_argnums=(0,))(
      state, jnp.float32(loss))


def _evaluate_splits(loop: LoopContext, state, step: int, splits: dict, kind: str) -> dict:
  """``{name: metrics}`` of ``state`` on ``splits``, written as ``<kind>/<name>`` records."""
  results = {}
  if loop.run.plan:  # the weights only: one eval step for every phase's optimizer structure
    state = state.replace(opt_state=None, phase=None)
  for name, split in splits.items():
    metrics = evaluate(loop.config, split, loop.eval_step, state, loop.run.teacher_variables,
                       loop.run.batch_sharding,
                       wrap=lambda batches, n=name: loop.progress.eval_batches(
                           batches, desc=f"eval {n}", total=data.eval_steps(loop.config, split)))
    metrics["epoch"] = step / loop.run.steps_per_epoch
    loop.writer.write(step, f"{kind}/{name}", metrics)
    results[name] = metrics
  return results


def _evaluate_and_select(loop: LoopContext, state, step: int) -> None:
  """Evaluates the eval splits, updates the best metrics of the first one, and exports the student
  to ``export_best/`` when ``config.select_metric`` improved."""
  config, run = loop.config, loop.run
  eval_splits = dict(config.dataset.get("eval_splits", {}) or {})
  run.last_evals = _evaluate_splits(loop, state, step, eval_splits, "eval")
  if not eval_splits:
    return
  first_name = next(iter(eval_splits))
  first = run.last_evals[first_name]
  select_key = config.get("select_metric", "top1_S")
  improved = select_key in first and first[select_key] > run.best.get(select_key, -1.0)
  for key, value in first.items():
    if key.startswith(("top1", "top5", "agree")) and value > run.best.get(key, -1.0):
      run.best[key] = value
  if improved:
    run.best_step = step
    with loop.progress.paused():
      _export(config, run.task, state, loop.workdir, run.sample_shape, run.num_classes,
              sources=(("ema" if select_key.endswith("_ema") else "raw", "export_best"),))
  loop.writer.write(step, "best", run.best)
  loop.progress.write(f"step {step} epoch {step / run.steps_per_epoch:.2f} {first_name}: " + ", ".join(
      f"{k}={v:.2f}" for k, v in first.items() if k.startswith("top1"))
      + (f"  (best {select_key}: exported)" if improved else ""))


def _finish(loop: LoopContext, state, *, seconds_since: float) -> dict:
  """Waits for the last checkpoint, evaluates the test splits, exports the last weights and
  prints the end-of-run report."""
  config, run = loop.config, loop.run
  loop.progress.close()
  run.ckpt.wait()
  step = int(state.step)
  test_splits = dict(config.dataset.get("test_splits", {}) or {})
  final = {"eval": run.last_evals, "best": run.best, "best_step": run.best_step, "step": step}
  if test_splits:
    final["test"] = _evaluate_splits(loop, state, step, test_splits, "test")
  exports = _export(config, run.task, state, loop.workdir, run.sample_shape, run.num_classes)
  if os.path.isdir(os.path.join(loop.workdir, "export_best")):
    exports["best"] = os.path.join(loop.workdir, "export_best")
  if jax.process_index() == 0:
    select_key = config.get("select_metric", "top1_S")
    results = {name: metrics for name, metrics in final["eval"].items()}
    for name, metrics in final.get("test", {}).items():
      results[name if name not in results else f"{name} (test)"] = metrics
    best = ((select_key, run.best[select_key], run.best_step)
            if select_key in run.best and run.best_step is not None else None)
    print(report.end_of_run(step=step, epoch=step / run.steps_per_epoch,
                            seconds=time.perf_counter() - seconds_since, results=results,
                            best=best, exports=exports), flush=True)
  return final


def _exports_intact(workdir: str, state: TrainState) -> bool:
  """Whether ``export/`` (and ``export_ema/`` with EMA) load and hold finite weights."""
  names = ["export"] + (["export_ema"] if state.ema is not None else [])
  for name in names:
    try:
      checkpoint.load_export(os.path.join(workdir, name))
    except (FileNotFoundError, checkpoint.ExportError) as e:
      if jax.process_index() == 0:
        print(f"gpd_jax: {os.path.join(workdir, name)} is missing or damaged ({e}); exporting "
              "again", flush=True)
      return False
  return True


def _export(config, task: Task, state: TrainState, workdir: str, sample_shape, num_classes, *,
            sources=None) -> dict[str, str]:
  """CBR: the plain student exported from ``state``; returns ``{what: directory}``.

  ``sources``: ``((weights, directory name), ...)`` with weights 'raw' or 'ema'; default: the raw
  weights to ``export/`` ('last') and, with EMA, the EMA weights to ``export_ema/`` ('ema'), and
  each peer's likewise to ``export_<peer>/`` and ``export_ema_<peer>/``.
  """
  written = {}
  if sources is None:
    sources = (("raw", "export"),) + ((("ema", "export_ema"),) if state.ema is not None else ())
    written = _export_peers(config, task, state, workdir, sample_shape, num_classes)
  model_info = _export_info(config.model, num_classes, sample_shape)
  for source, name in sources:
    variables, student_batch_stats = state.variables(source)
    if task.gpd:
      _, plain = export_student(task.model, variables, student_batch_stats, spec=task.view_spec)
    else:
      plain = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    plain = jax.device_get(plain)
    directory = os.path.join(workdir, name)
    if jax.process_index() == 0:
      checkpoint.save_export(directory, plain, model_info)
    written[{"export": "last", "export_ema": "ema", "export_best": "best"}.get(name, name)] = directory
  return written


def _export_peers(config, task: Task, state: TrainState, workdir: str, sample_shape,
                  num_classes) -> dict[str, str]:
  """Each peer's plain network (its GPD view exported, for a GPD peer) from its raw weights to
  ``export_<peer>/`` and, with EMA, its EMA weights to ``export_ema_<peer>/``."""
  written = {}
  for net in task.peers:
    model_info = _export_info(config.online.peers[net.name].model, num_classes, sample_shape)
    net_state = state.network(net.name)
    for source in ["raw"] + (["ema"] if net_state.ema is not None else []):
      variables, student_batch_stats = net_state.variables(source)
      if net.gpd:
        _, plain = export_student(net.model, variables, student_batch_stats, spec=net.view_spec)
      else:
        plain = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
      name = f"export_{net.name}" if source == "raw" else f"export_ema_{net.name}"
      directory = os.path.join(workdir, name)
      if jax.process_index() == 0:
        checkpoint.save_export(directory, jax.device_get(plain), model_info)
      written[name.removeprefix("export_")] = directory
  return written


def save_config(config, workdir: str) -> None:
  """Writes ``<workdir>/config.json`` (what ``launch/eval.py --workdir`` reads), atomically, and
  only when its content changes (a resumed run with the same config leaves the file alone)."""
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


SUBSET_FILE = "train_subset.json"  # a reduced-data run's training examples


def save_train_subset(config, workdir: str) -> None:
  """Writes ``<workdir>/train_subset.json`` for a reduced-data run (``config.dataset.train_fraction``
  < 1): the fraction, seed, the split it indexes and the sorted indices of the examples trained on."""
  indices = data.train_subset_indices(config)
  if indices is None:
    return
  d = config.dataset
  record = {"train_split": d.get("train_split", "train"),
            "num_train_examples": d.get("num_train_examples"),
            "train_fraction": float(d.train_fraction), "subset_seed": int(d.get("subset_seed", 0)),
            "count": int(len(indices)), "indices": [int(i) for i in indices]}
  path = os.path.join(workdir, SUBSET_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, path)


def _tuples(value):
  """JSON lists back to the tuples the configs use (mesh shapes, boundaries, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_saved_config(directory: str):
  """The ``ConfigDict`` a run saved in ``<directory>/config.json``.

  Raises:
    FileNotFoundError: there is no config.json there.
    validate.ConfigError: it does not parse.
  """
  path = os.path.join(directory, CONFIG_FILE)
  with open(path) as f:
    text = f.read()
  try:
    values = json.loads(text)
  except ValueError as e:
    raise validate.ConfigError(f"{path} is not valid JSON ({e}); pass --config instead") from None
  return ml_collections.ConfigDict(_tuples(values))
