"""What a run trains: the static :class:`Task` (networks, spec, objective) and the :class:`TrainState`.

A run trains one main network (named ``student``) and any number of peers (``config.online.peers``),
each a :class:`Network` with its own params, BN statistics, optimizer state and EMA
(:class:`NetworkState`). With GPD a network's trainable tree is its dynamic teacher's ``params``; its
student is read out of it by ``student_view`` inside the loss and keeps only its own BatchNorm
statistics (``student_batch_stats``): the view is a derived network, not a trained one. Without GPD
(CE / KD / DKD / DIST baselines) the trainable tree is the network's own.
Frozen teachers (``config.teacher``, ``config.online.teachers``) never enter the state: they are not
trained and not checkpointed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gpd_jax import feature_kd, models, terms as terms_lib
from gpd_jax.objective import make_objective
from gpd_jax.transforms import ExpansionSpec, derive_spec, expand
from gpd_jax.transforms.spec import check_ratio

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Network:
  """One trained network of a run: its plain architecture, the module trained and, with GPD, its view.

  Attributes:
    name: its logits' name: ``'student'`` for the run's main network, else its key in
      ``config.online.peers``. With GPD the DT's logits are ``dt_name`` and ``name`` is the view's.
    student: the plain module (ratio 1): what is exported.
    model: the trained module: the DT with GPD, else ``student``.
    view_spec: the spec ``student_view`` follows (GPD only), else None.
  """
  name: str
  student: nn.Module
  model: nn.Module
  view_spec: ExpansionSpec | None

  @property
  def gpd(self) -> bool:
    return self.view_spec is not None

  @property
  def dt_name(self) -> str:
    return "dt" if self.name == "student" else f"{self.name}_dt"


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
  """An extra frozen teacher (``config.online.teachers``): its logits' name and module."""
  name: str
  module: nn.Module
  train_mode: bool


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
    peers: the networks trained alongside the main one (``config.online.peers``).
    extra_teachers: frozen teachers beyond ``teacher`` (``config.online.teachers``).
    terms: ``terms(logits, labels) -> (total, metrics)`` between the named networks, or None.
    switch: SwitOKD's ``(student, teacher)`` logits names; ``teacher``, a peer, pauses in expert mode.
    feature_objective: the feature-distillation objective (``gpd_jax.feature_kd.FeatureObjective``),
      or None. When set, the step runs the trained networks and the static teacher with
      ``return_features=True`` and calls it with ``features: {name: Features}``.
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
  peers: tuple[Network, ...] = ()
  extra_teachers: tuple[FrozenTeacher, ...] = ()
  terms: Callable | None = None
  switch: tuple[str, str] | None = None
  feature_objective: Any = None

  @property
  def gpd(self) -> bool:
    return self.view_spec is not None

  @property
  def needs_features(self) -> bool:
    """Whether the train step needs the networks' feature taps (a static property of the run)."""
    return self.feature_objective is not None

  @property
  def networks(self) -> tuple[Network, ...]:
    """Every trained network, the main one (``'student'``) first."""
    return (Network("student", self.student, self.model, self.view_spec), *self.peers)


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
    peers: ``{name: NetworkState}`` of the peers, or None without peers.
    switch: SwitOKD's ``{'expert': bool, 'expert_steps': int32}`` (the last step's mode and how many
      steps the teacher has paused), or None without a switch.
    connectors: the main network's feature connectors ``{'params', 'batch_stats'}`` (trained with
      ``params`` by one optax chain over ``{'model': params, 'connectors': connectors['params']}``,
      EMA'd under ``ema['connectors']``, never exported), or None.
    feature_state: the feature objective's non-trainable state (CRD's memory banks), or None.
    phase: a multi-phase run's ``{'index': int32, 'start': int32 (its first step), 'best_loss':
      float32, 'best': {'params', 'batch_stats', 'student_batch_stats'}}`` (the current phase and its
      weights with the lowest validation loss so far; ``gpd_jax/phases.py``), or None.
  """
  step: jax.Array
  params: Any
  consts: Any
  batch_stats: Any
  student_batch_stats: Any
  opt_state: Any
  ema: Any
  peers: Any = None
  switch: Any = None
  connectors: Any = None
  feature_state: Any = None
  phase: Any = None

  def network(self, name: str) -> "NetworkState":
    """The state of trained network ``name`` (``'student'``: the main network's fields above)."""
    if name != "student":
      return self.peers[name]
    return NetworkState(params=self.params, consts=self.consts, batch_stats=self.batch_stats,
                        student_batch_stats=self.student_batch_stats, opt_state=self.opt_state,
                        ema=self.ema, connectors=self.connectors)

  def with_network(self, name: str, net: "NetworkState") -> "TrainState":
    """This state with network ``name``'s state replaced by ``net``."""
    if name != "student":
      return self.replace(peers={**self.peers, name: net})
    return self.replace(params=net.params, consts=net.consts, batch_stats=net.batch_stats,
                        student_batch_stats=net.student_batch_stats, opt_state=net.opt_state,
                        ema=net.ema, connectors=net.connectors)

  def variables(self, source: str = "raw"):
    """``{'params', ['consts'], 'batch_stats'}`` of ``model`` and the student's BN stats."""
    tree = self.ema if source == "ema" else {
        "params": self.params, "batch_stats": self.batch_stats,
        "student_batch_stats": self.student_batch_stats}
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    if self.consts is not None:
      variables["consts"] = self.consts
    return variables, tree["student_batch_stats"]


@flax.struct.dataclass
class NetworkState:
  """One trained network's share of the state; the fields mean what :class:`TrainState`'s do."""
  params: Any
  consts: Any
  batch_stats: Any
  student_batch_stats: Any
  opt_state: Any
  ema: Any
  connectors: Any = None

  def variables(self, source: str = "raw"):
    """``({'params', ['consts'], 'batch_stats'}, student_batch_stats)`` of the raw or EMA weights."""
    return TrainState.variables(self, source)


def model_kwargs(model_config, field: str = "config.model") -> dict:
  """Module overrides from ``config.model.kwargs`` and the compute dtype ``config.model.dtype``."""
  kwargs = dict(model_config.get("kwargs", {}) or {})
  dtype = model_config.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"{field}.dtype={dtype!r} is unknown; choose one of {tuple(DTYPES)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return {**kwargs, "dtype": DTYPES[dtype]}


def _build_network(name: str, model_config, gpd_ratio: int, branches: bool, num_classes: int,
                   sample_shape, field: str) -> Network:
  """The :class:`Network` ``name`` of ``model_config``; GPD when ``gpd_ratio`` > 1."""
  try:
    student = models.create(model_config.name, num_classes, **model_kwargs(model_config, field))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{field}: {e}") from None
  if not gpd_ratio:
    return Network(name, student, student, None)
  dt_fields = {"ratio": gpd_ratio}
  if branches:  # a model without OREPA blocks needs no `branches` field
    if not hasattr(student, "branches"):
      raise ValueError(f"config.gpd.branches=True, but model {model_config.name!r} has no 'branches' "
                       "field (OREPA blocks, docs/custom_models.md §1 item 7); set config.gpd.branches=False")
    dt_fields["branches"] = True
  model = student.clone(**dt_fields)
  return Network(name, student, model, derive_spec(model.clone(ratio=1), gpd_ratio, tuple(sample_shape)))


def build_task(config, *, num_classes: int, sample_shape: tuple[int, ...],
               teacher: nn.Module | None = None, steps_per_epoch: int | None = None,
               extra_teachers: dict | None = None, train_labels=None) -> Task:
  """Networks, student-view specs and objective of ``config`` (no arrays are created).

  ``teacher``: the static teacher's module (built from its export), or None.
  ``steps_per_epoch``: the run's train steps per epoch (turns ``loss.dkd.warmup_epochs`` into steps).
  ``extra_teachers``: ``{name: module}`` of the frozen teachers in ``config.online.teachers``.
  ``train_labels``: [N] labels of the training split in dataset-index order (CRD's memory bank only).
  """
  gpd = bool(config.gpd.enabled)
  ratio = 0
  if gpd:
    try:
      ratio = check_ratio(config.gpd.ratio)
    except ValueError as e:
      raise ValueError(f"config.gpd.ratio: {e}") from None
  branches = bool(config.gpd.branches)
  main = _build_network("student", config.model, ratio, branches, num_classes, sample_shape,
                        "config.model")
  online = config.get("online") or {}
  peers = []
  for name, peer in (online.get("peers") or {}).items():
    field = f"config.online.peers.{name}"
    if name in ("student", "dt", "teacher") or name.endswith("_dt"):
      raise ValueError(f"{field}: the name {name!r} is taken; name the peer otherwise")
    peer_ratio = int(peer.get("gpd_ratio", 0) or 0)
    if peer_ratio:
      try:
        peer_ratio = check_ratio(peer_ratio)
      except ValueError as e:
        raise ValueError(f"{field}.gpd_ratio: {e}") from None
    peers.append(_build_network(name, peer.model, peer_ratio, branches, num_classes, sample_shape,
                                f"{field}.model"))
  extra = tuple(FrozenTeacher(name, module, bool(online.teachers[name].get("train_mode", False)))
                for name, module in (extra_teachers or {}).items())
  logit_names = [n for net in (main, *peers) for n in ((net.name, net.dt_name) if net.gpd else (net.name,))]
  logit_names += (["teacher"] if teacher is not None else []) + [t.name for t in extra]
  overlap = sorted({n for n in logit_names if logit_names.count(n) > 1})
  if overlap:
    raise ValueError(f"config.online: the names {overlap} are used twice; rename the peer or teacher")
  terms = None
  if online.get("terms"):
    parsed = terms_lib.parse_terms(list(online.terms), logit_names)
    terms = terms_lib.make_terms_objective(
        parsed, online, sce_smoothing=float(config.gpd.sce_smoothing),
        label_smoothing=float(config.loss.label_smoothing))
  switch = None
  switch_config = online.get("switch") or {}
  if switch_config.get("teacher"):
    student_name, teacher_name = switch_config.get("student", "student"), switch_config.teacher
    if teacher_name not in [p.name for p in peers]:
      raise ValueError(f"config.online.switch.teacher={teacher_name!r} must name a peer (the network "
                       f"that pauses), one of {[p.name for p in peers]}")
    if student_name not in logit_names or student_name == teacher_name:
      raise ValueError(f"config.online.switch.student={student_name!r} must name another network "
                       f"of this run, one of {logit_names}")
    switch = (student_name, teacher_name)
  feature_objective = _build_feature_objective(config, main, teacher, sample_shape, num_classes,
                                               steps_per_epoch, train_labels)
  return Task(student=main.student, model=main.model, view_spec=main.view_spec, teacher=teacher,
              teacher_train_mode=bool(config.teacher.get("train_mode", False)),
              objective=make_objective(config.loss, config.gpd if gpd else None,
                                       steps_per_epoch=steps_per_epoch),
              sample_shape=tuple(sample_shape), num_classes=num_classes,
              dropout_seed=int(config.get("seed", 0)), peers=tuple(peers), extra_teachers=extra,
              terms=terms, switch=switch, feature_objective=feature_objective)


def _build_feature_objective(config, main: Network, teacher, sample_shape, num_classes,
                             steps_per_epoch, train_labels):
  """``config.features``' objective (``gpd_jax.feature_kd``), or None when no method is set."""
  features_config = config.get("features") or {}
  if not features_config.get("method"):
    return None
  if teacher is None:
    raise ValueError(f"config.features.method={features_config.method!r} distils the static "
                     "teacher's features, but there is no teacher; set config.teacher.name and "
                     "config.teacher.workdir (or config.features.method='')")
  targets = []
  gpd = config.gpd if main.gpd else None
  if gpd is None or bool(gpd.student_uses_static_kd):
    targets.append("student")
  if gpd is not None and bool(gpd.train_dt_loss) and bool(gpd.dt_uses_static_kd):
    targets.append("dt")
  if not targets:
    raise ValueError("config.features: no network gets the feature term (config.gpd."
                     "student_uses_static_kd and dt_uses_static_kd are both False); turn one on or "
                     "set config.features.method=''")
  shapes = {"teacher": feature_kd.feature_shapes(teacher, sample_shape),
            "student": feature_kd.feature_shapes(main.student, sample_shape)}
  if "dt" in targets:
    shapes["dt"] = feature_kd.feature_shapes(main.model, sample_shape)
  return feature_kd.make_feature_objective(
      features_config, targets=tuple(targets), shapes=shapes, steps_per_epoch=steps_per_epoch,
      train_labels=train_labels, num_classes=num_classes, seed=int(config.get("seed", 0)))


def _init_network(net: Network, config, tx: optax.GradientTransformation, rng: jax.Array,
                  sample: jax.Array, student_variables=None) -> NetworkState:
  """A fresh network: student init (or the given one), IR to the DT (GPD), optimizer, EMA."""
  init_rng, ir_rng = jax.random.split(rng)
  if student_variables is None:
    student_variables = net.student.init(init_rng, sample, train=False)
  student_batch_stats = None
  variables = student_variables
  if net.gpd:
    _, variables = expand(net.student, student_variables, ratio=net.model.ratio, rng=ir_rng,
                          noise_std=config.gpd.noise_std, branches=bool(config.gpd.branches),
                          pretrained=bool(config.gpd.pretrained_branches), sample_input=sample)
    student_batch_stats = student_variables.get("batch_stats", {})
  params = variables["params"]
  # Models without BatchNorm (DeiT) have no statistics: an empty collection keeps one code path.
  batch_stats = variables.get("batch_stats", {})
  ema = None
  if config.ema_decay:
    ema = {"params": params, "batch_stats": batch_stats, "student_batch_stats": student_batch_stats}
  return NetworkState(params=params, consts=variables.get("consts"), batch_stats=batch_stats,
                      student_batch_stats=student_batch_stats, opt_state=tx.init(params), ema=ema)


def init_state(task: Task, config, tx: optax.GradientTransformation, rng: jax.Array,
               student_variables=None, peer_variables=None) -> TrainState:
  """A fresh state: every network initialised (``_init_network``), step 0, SwitOKD in learning mode.

  Pure and traceable: call it under ``jax.jit(..., out_shardings=...)`` so big states are born
  sharded. ``student_variables``: a pre-trained plain student (fine-tuning), else random init;
  ``peer_variables``: ``{name: plain variables}`` for peers that start from an export. The main
  network draws from ``rng`` itself, peer ``i`` (1-based) from ``fold_in(rng, i)``.
  """
  sample = jnp.zeros(task.sample_shape, jnp.float32)
  main, *peers = task.networks
  state = TrainState(step=jnp.zeros((), jnp.int32), params=None, consts=None, batch_stats=None,
                     student_batch_stats=None, opt_state=None, ema=None)
  state = state.with_network("student", _init_network(main, config, tx, rng, sample, student_variables))
  if peers:
    peer_variables = peer_variables or {}
    state = state.replace(peers={
        peer.name: _init_network(peer, config, tx, jax.random.fold_in(rng, i), sample,
                                 peer_variables.get(peer.name))
        for i, peer in enumerate(peers, start=1)})
  if task.switch is not None:
    state = state.replace(switch={"expert": jnp.zeros((), jnp.bool_),
                                  "expert_steps": jnp.zeros((), jnp.int32)})
  if task.feature_objective is not None:
    state = _init_features(task, tx, state, jax.random.fold_in(rng, FEATURE_RNG_FOLD))
  return state


# Folded into the run's key for the feature connectors (peers fold in 1, 2, ...).
FEATURE_RNG_FOLD = 2**20


def _init_features(task: Task, tx: optax.GradientTransformation, state: TrainState,
                   rng: jax.Array) -> TrainState:
  """The feature objective's connectors and state, with the main network's optimizer state and
  EMA widened to cover the connectors."""
  connectors, feature_state = task.feature_objective.init(rng)
  state = state.replace(feature_state=feature_state)
  if connectors is None:
    return state
  opt_state = tx.init({"model": state.params, "connectors": connectors["params"]})
  ema = state.ema if state.ema is None else {**state.ema, "connectors": connectors}
  return state.replace(connectors=connectors, opt_state=opt_state, ema=ema)
