"""What a run trains: the static :class:`Task` (modules, spec, objective) and the :class:`TrainState`.

With GPD the only trainable tree is the dynamic teacher's ``params``; the student is read out of it by
``student_view`` inside the loss and keeps only its own BatchNorm statistics (``student_batch_stats``).
Without GPD (plain CE / KD / DKD / DIST baselines) the trainable tree is the student's own.
The static teacher's variables never enter the state: they are not trained and not checkpointed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gpd_jax import models
from gpd_jax.objective import make_objective
from gpd_jax.transforms import ExpansionSpec, derive_spec, expand
from gpd_jax.transforms.spec import check_ratio

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything static about a run (hashable, so jitted functions can close over it).

  Attributes:
    student: the plain student module (ratio 1, no branches): the architecture that is exported.
    model: the trained network: the DT (``student.clone(ratio=r, branches=...)``) with GPD, else
      ``student``.
    view_spec: the spec ``student_view`` follows (GPD only).
    teacher: the static teacher module, or None.
    teacher_train_mode: apply the teacher with batch statistics (the reference code's behaviour).
    objective: ``objective(logits, labels, *, step) -> (total, terms)``.
    sample_shape: [1, S, S, C] of one input.
    num_classes: K.
    dropout_seed: seed of the ``'dropout'`` rng stream (drop-path), folded with the step.
  """
  student: nn.Module
  model: nn.Module
  view_spec: ExpansionSpec | None
  teacher: nn.Module | None
  teacher_train_mode: bool
  objective: Callable
  sample_shape: tuple[int, ...]
  num_classes: int
  dropout_seed: int = 0

  @property
  def gpd(self) -> bool:
    return self.view_spec is not None


@flax.struct.dataclass
class TrainState:
  """The checkpointed training state (a pytree).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the trainable ``params`` collection (DT with GPD, else the student).
    consts: the model's ``consts`` collection (OREPA priors; never trained), or None.
    batch_stats: BN running statistics of ``model``.
    student_batch_stats: the student's own BN statistics (GPD only, else None).
    opt_state: the optax state of ``params``.
    ema: EMA of ``{'params', 'batch_stats', 'student_batch_stats'}``, or None when disabled.
  """
  step: jax.Array
  params: Any
  consts: Any
  batch_stats: Any
  student_batch_stats: Any
  opt_state: Any
  ema: Any

  def variables(self, source: str = "raw"):
    """``{'params', ['consts'], 'batch_stats'}`` of ``model`` and the student's BN stats."""
    tree = self.ema if source == "ema" else {
        "params": self.params, "batch_stats": self.batch_stats,
        "student_batch_stats": self.student_batch_stats}
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    if self.consts is not None:
      variables["consts"] = self.consts
    return variables, tree["student_batch_stats"]


def model_kwargs(model_config, field: str = "config.model") -> dict:
  """Module overrides from ``config.model.kwargs`` and the compute dtype ``config.model.dtype``."""
  kwargs = dict(model_config.get("kwargs", {}) or {})
  dtype = model_config.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"{field}.dtype={dtype!r} is unknown; choose one of {tuple(DTYPES)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return {**kwargs, "dtype": DTYPES[dtype]}


def build_task(config, *, num_classes: int, sample_shape: tuple[int, ...],
               teacher: nn.Module | None = None, steps_per_epoch: int | None = None) -> Task:
  """Modules, student-view spec and objective of ``config`` (no arrays are created).

  ``teacher``: the static teacher's module (built from its export), or None.
  ``steps_per_epoch``: the run's train steps per epoch (turns ``loss.dkd.warmup_epochs`` into steps).
  """
  try:
    student = models.create(config.model.name, num_classes, **model_kwargs(config.model))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from None
  gpd = config.gpd.enabled
  if gpd:
    try:
      ratio = check_ratio(config.gpd.ratio)
    except ValueError as e:
      raise ValueError(f"config.gpd.ratio: {e}") from None
    dt_fields = {"ratio": ratio}
    if config.gpd.branches:  # a model without OREPA blocks needs no `branches` field
      if not hasattr(student, "branches"):
        raise ValueError(f"config.gpd.branches=True, but model {config.model.name!r} has no 'branches' "
                         "field (OREPA blocks, docs/custom_models.md §1 item 7); set config.gpd.branches=False")
      dt_fields["branches"] = True
    model = student.clone(**dt_fields)
    view_spec = derive_spec(model.clone(ratio=1), ratio, tuple(sample_shape))
  else:
    model, view_spec = student, None
  return Task(student=student, model=model, view_spec=view_spec, teacher=teacher,
              teacher_train_mode=bool(config.teacher.get("train_mode", False)),
              objective=make_objective(config.loss, config.gpd if gpd else None,
                                       steps_per_epoch=steps_per_epoch),
              sample_shape=tuple(sample_shape), num_classes=num_classes,
              dropout_seed=int(config.get("seed", 0)))


def init_state(task: Task, config, tx: optax.GradientTransformation, rng: jax.Array,
               student_variables=None) -> TrainState:
  """A fresh state: student init (or the given pre-trained one), IR to the DT, optimizer, EMA.

  Pure and traceable: call it under ``jax.jit(..., out_shardings=...)`` so big states are born
  sharded. ``student_variables``: a pre-trained plain student (fine-tuning), else random init.
  """
  init_rng, ir_rng = jax.random.split(rng)
  sample = jnp.zeros(task.sample_shape, jnp.float32)
  if student_variables is None:
    student_variables = task.student.init(init_rng, sample, train=False)
  student_batch_stats = None
  variables = student_variables
  if task.gpd:
    _, variables = expand(task.student, student_variables, ratio=config.gpd.ratio, rng=ir_rng,
                          noise_std=config.gpd.noise_std, branches=bool(config.gpd.branches),
                          pretrained=bool(config.gpd.pretrained_branches), sample_input=sample)
    student_batch_stats = student_variables.get("batch_stats", {})
  params = variables["params"]
  # Models without BatchNorm (DeiT) have no statistics: an empty collection keeps one code path.
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, consts=variables.get("consts"),
                     batch_stats=variables.get("batch_stats", {}),
                     student_batch_stats=student_batch_stats,
                     opt_state=tx.init(params), ema=None)
  if config.ema_decay:
    state = state.replace(ema={"params": params, "batch_stats": state.batch_stats,
                               "student_batch_stats": student_batch_stats})
  return state
