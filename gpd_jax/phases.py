"""Multi-phase runs: one run, several phases, each training a part of the network on its own objective.

``config.phases`` is a tuple of phase dicts (build them with ``config_base.phase(...)``)::

  name      a label for logs ('stem', 'stage1', 'head', ...)
  epochs    the phase's length, in epochs of the (possibly reduced) training set (> 0)
  train     the parameters it trains: stage names ('stem', 'stage1'.., 'head', 'all') or regular
            expressions searched in the parameter paths ('layer2_0/conv1', ...); everything else is
            frozen (its params and its BatchNorm statistics stay bitwise unchanged)
  terms     its objective, a sum of: 'base' (the run's config.loss / config.gpd objective), 'ce' (the
            student's cross-entropy with config.loss.label_smoothing) and 'stage_mse(<tap>)' (MSE
            between the student's and the static teacher's post-ReLU output of tap 'stem' or
            'stage<k>', the Stagewise KD / SSKD loss; run as the step's feature objective, so the
            networks return their taps in those phases only)
  start     which weights start the phase: 'best' (the previous phase's weights with the lowest
            validation loss, Stagewise KD's rule) or 'last' (where the previous phase ended); the first
            phase starts from the initial weights either way
  optim     overrides of config.optim for this phase (e.g. {'name': 'adamw', 'weight_decay': 0.0})
  schedule  overrides of config.schedule; the schedule runs over the phase's own steps

Every phase starts a fresh optimizer (``tx.init``) made of ``optax.multi_transform({'train': tx,
'frozen': optax.set_to_zero()}, labels)``: the update of a frozen leaf is exactly zero (weight decay
and clipping sit inside ``tx``, so they see the trained leaves only). The optimizer state's structure
depends on the phase, so the train state records the phase (``TrainState.phase``) and a resume reads
the phase from the checkpoint first. A phase uses the static teacher only when one of its terms needs
it. With GPD the labels apply to the DT's tree (the student view is its slice).

The phase's validation loss (for ``start='best'``) is the sum of its terms evaluated per example on the
first eval split with eval-mode BatchNorm; 'base' counts as the student's cross-entropy there.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpd_jax import losses, optim
from gpd_jax.transforms.spec import leaf_key

PHASE_KEYS = ("name", "epochs", "train", "terms", "start", "optim", "schedule")
STARTS = ("best", "last")
TERM_NAMES = ("base", "ce", "stage_mse")
_TERM_RE = re.compile(r"^\s*(\w+)\s*(?:\(\s*(\w+)\s*\))?\s*$")
_TAP_RE = re.compile(r"^(stem|stage([1-9]))$")


def stage_pattern(name: str) -> str:
  """The path regex of a stage name of the ResNet families ('stem': the first conv and BN,
  'stage<k>': the blocks ``layer<k>_*``, 'head': the classifier ``fc``, 'all'); any other string is
  taken as a regex itself."""
  if name == "stem":
    return r"^(conv1|bn1)/"
  match = re.fullmatch(r"stage([1-9])", name)
  if match:
    return rf"^layer{match.group(1)}_\d+/"
  if name == "head":
    return r"^fc/"
  if name == "all":
    return r""
  return name


@dataclasses.dataclass(frozen=True)
class Term:
  """One objective term: ``kind`` in TERM_NAMES and, for 'stage_mse', the tap."""
  kind: str
  tap: str = ""

  @property
  def label(self) -> str:
    return f"mse_{self.tap}" if self.kind == "stage_mse" else self.kind


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of the plan (static; hashable).

  Attributes:
    index: its position; name: its label.
    start_step, num_steps: the global steps ``[start_step, start_step + num_steps)`` it runs.
    train: the path regexes of the trained leaves.
    terms: the objective terms.
    train_names: the ``train`` entries as written (stage names or regexes), for messages.
    start: 'best' or 'last'.
    optim, schedule: the phase's ``config.optim`` / ``config.schedule`` (overrides applied), frozen
      as sorted item tuples.
  """
  index: int
  name: str
  start_step: int
  num_steps: int
  train: tuple[str, ...]
  terms: tuple[Term, ...]
  start: str
  optim: tuple
  schedule: tuple
  train_names: tuple[str, ...] = ()

  @property
  def end_step(self) -> int:
    return self.start_step + self.num_steps

  @property
  def uses_teacher(self) -> bool:
    return any(t.kind in ("stage_mse", "base") for t in self.terms)

  @property
  def needs_features(self) -> bool:
    return any(t.kind == "stage_mse" for t in self.terms)

  def is_trained(self, path: str) -> bool:
    return any(re.search(p, path) for p in self.train)


class PhaseConfigError(ValueError):
  """A phase entry is malformed; the message names ``config.phases[i].<field>`` and the fix."""


def parse_term(text: str, field: str) -> Term:
  match = _TERM_RE.match(text) if isinstance(text, str) else None
  if not match or match.group(1) not in TERM_NAMES:
    raise PhaseConfigError(f"{field}: {text!r} is not a term; use 'base', 'ce' or "
                           "'stage_mse(<stem|stage1|stage2|...>)'")
  kind, arg = match.group(1), match.group(2)
  if kind == "stage_mse":
    if not arg or not _TAP_RE.match(arg):
      raise PhaseConfigError(f"{field}: {text!r} needs a tap, 'stage_mse(stem)' or 'stage_mse(stage<k>)'")
    return Term(kind, arg)
  if arg:
    raise PhaseConfigError(f"{field}: {text!r}: '{kind}' takes no argument")
  return Term(kind)


def _is_mapping(v) -> bool:
  return hasattr(v, "items") and hasattr(v, "keys")


def _merged(base, overrides, field: str) -> tuple:
  merged = dict(base.to_dict() if hasattr(base, "to_dict") else base)
  for key, value in dict(overrides or {}).items():
    if key not in merged:
      raise PhaseConfigError(f"{field}.{key} is not a field of {field.split('.')[-1]}; choose from "
                             f"{sorted(merged)}")
    merged[key] = tuple(value) if isinstance(value, list) else value
  return tuple(sorted(merged.items()))


def check_entries(phases) -> list[str]:
  """The problems of ``config.phases`` that need no model or data (each names its field)."""
  if isinstance(phases, (str, bytes)) or not isinstance(phases, (tuple, list)):
    return [f"config.phases={phases!r} must be a tuple of phase dicts (config_base.phase(...)); () = "
            "one ordinary phase"]
  problems = []
  for i, entry in enumerate(phases):
    field = f"config.phases[{i}]"
    if not _is_mapping(entry):
      problems.append(f"{field}={entry!r} must be a dict; build it with config_base.phase(...)")
      continue
    unknown = sorted(set(entry.keys()) - set(PHASE_KEYS))
    if unknown:
      problems.append(f"{field} has unknown keys {unknown}; the keys are {PHASE_KEYS}")
    epochs = entry.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
      problems.append(f"{field}.epochs={epochs!r} must be a number > 0")
    train = entry.get("train")
    if isinstance(train, str) or not isinstance(train, (tuple, list)) or not train or not all(
        isinstance(t, str) for t in train):
      problems.append(f"{field}.train={train!r} must be a non-empty tuple of stage names ('stem', "
                      "'stage1', 'head', 'all') or path regexes")
    else:
      for t in train:
        try:
          re.compile(stage_pattern(t))
        except re.error as e:
          problems.append(f"{field}.train: {t!r} is not a stage name or a regular expression ({e})")
    terms = entry.get("terms")
    if isinstance(terms, str) or not isinstance(terms, (tuple, list)) or not terms:
      problems.append(f"{field}.terms={terms!r} must be a non-empty tuple such as ('ce',) or "
                      "('stage_mse(stage1)',)")
    else:
      for t in terms:
        try:
          parse_term(t, f"{field}.terms")
        except PhaseConfigError as e:
          problems.append(str(e))
    if entry.get("start", "best") not in STARTS:
      problems.append(f"{field}.start={entry.get('start')!r} must be one of {STARTS}")
    for key in ("optim", "schedule"):
      if entry.get(key) is not None and not _is_mapping(entry.get(key)):
        problems.append(f"{field}.{key}={entry.get(key)!r} must be a dict of config.{key} overrides")
    if not isinstance(entry.get("name", ""), str):
      problems.append(f"{field}.name={entry.get('name')!r} must be a string")
  return problems


def make_plan(config, steps_per_epoch: int) -> tuple[Phase, ...]:
  """The phases of ``config`` with their global step ranges; () for an ordinary run.

  Raises:
    PhaseConfigError: a malformed entry, a phase shorter than one step, or a combination this
      mechanism does not support (named).
  """
  entries = tuple(config.get("phases") or ())
  if not entries:
    return ()
  problems = check_entries(entries)
  if problems:
    raise PhaseConfigError("\n".join(problems))
  if (config.get("online") or {}).get("peers"):
    raise PhaseConfigError("config.phases with config.online.peers is not supported (the phases "
                           "freeze the main network only); drop one of them")
  if (config.get("features") or {}).get("method"):
    raise PhaseConfigError(f"config.phases with config.features.method={config.features.method!r} is "
                           "not supported (the phases' optimizer covers the network, not the feature "
                           "connectors); use 'stage_mse' terms in the phases, or drop config.phases")
  plan, start = [], 0
  for i, entry in enumerate(entries):
    field = f"config.phases[{i}]"
    num_steps = int(round(float(entry["epochs"]) * steps_per_epoch))
    if num_steps < 1:
      raise PhaseConfigError(f"{field}.epochs={entry['epochs']} is less than one step "
                             f"({steps_per_epoch} steps per epoch); raise it")
    terms = tuple(parse_term(t, f"{field}.terms") for t in entry["terms"])
    if any(t.kind == "stage_mse" for t in terms):
      if not config.teacher.get("name"):
        raise PhaseConfigError(f"{field}.terms={tuple(entry['terms'])} distil features from the "
                               "static teacher, but config.teacher.name is empty; name a teacher")
      if config.gpd.enabled:
        raise PhaseConfigError(f"{field}.terms: 'stage_mse' compares the student's stage outputs with "
                               "the teacher's; with GPD (config.gpd.enabled) the trained network is the "
                               "×r-wide DT, whose stages do not match the teacher's widths. Use 'base' "
                               "or 'ce' terms with GPD, or turn GPD off")
    plan.append(Phase(index=i, name=str(entry.get("name") or f"phase{i}"), start_step=start,
                      num_steps=num_steps,
                      train=tuple(stage_pattern(t) for t in entry["train"]), terms=terms,
                      start=entry.get("start", "best"),
                      optim=_merged(config.optim, entry.get("optim"), f"{field}.optim"),
                      schedule=_merged(config.schedule, entry.get("schedule"), f"{field}.schedule"),
                      train_names=tuple(entry["train"])))
    start += num_steps
  return tuple(plan)


def describe(plan) -> list[dict]:
  """The plan as JSON (part of the resume identity: a checkpoint resumes only under the same plan)."""
  return [{"name": p.name, "start_step": p.start_step, "num_steps": p.num_steps,
           "train": list(p.train), "terms": [t.label for t in p.terms], "start": p.start}
          for p in plan]


def check_patterns(plan, params) -> None:
  """Every ``train`` entry of every phase matches at least one leaf of ``params``."""
  paths = [leaf_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  for phase in plan:
    for name, pattern in zip(phase.train_names or phase.train, phase.train):
      if not any(re.search(pattern, path) for path in paths):
        shown = repr(name) if name == pattern else f"{name!r} (regex {pattern!r})"
        raise PhaseConfigError(
            f"config.phases[{phase.index}].train: {shown} matches no parameter of the model "
            f"(paths look like {paths[:3]}); use a stage name or a regex over these paths")


def labels(phase: Phase, tree) -> Any:
  """``'train'`` / ``'frozen'`` per leaf of ``tree`` (params or BN statistics) by its path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if phase.is_trained(leaf_key(path)) else "frozen", tree)


def keep_frozen(phase: Phase, old, new):
  """``new`` with the leaves that ``phase`` freezes taken from ``old`` (BN statistics)."""
  if old is None:
    return new
  return jax.tree_util.tree_map_with_path(
      lambda path, o, n: n if phase.is_trained(leaf_key(path)) else o, old, new)


def _local_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """The phase's learning rate as a function of its own step (0 at its first step)."""
  return optim.make_schedule(ml_collections.ConfigDict(dict(phase.schedule)),
                             steps_per_epoch=steps_per_epoch, total_steps=phase.num_steps)


def make_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """The phase's learning rate as a function of the GLOBAL step (for the logs)."""
  local = _local_schedule(phase, steps_per_epoch)
  return lambda step: local(step - phase.start_step)


def make_optimizer(phase: Phase, steps_per_epoch: int) -> optax.GradientTransformation:
  """``multi_transform``: the phase's optimizer on its trained leaves, exactly zero on the rest.

  The inner optimizer's schedule counts from its own ``init``, i.e. from the phase's first step.
  """
  inner = optim.make_optimizer(ml_collections.ConfigDict(dict(phase.optim)),
                               _local_schedule(phase, steps_per_epoch))
  return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()},
                               lambda params: labels(phase, params))


# ----------------------------------------------------------------------------------------------
# The phase's state: its index, first step, and the best weights so far.


def _copy(tree):
  # Real copies: the best weights must not share buffers with the live ones (the step donates both).
  return jax.tree.map(jnp.copy, tree)


def _weights(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats,
          "student_batch_stats": state.student_batch_stats}


# "No best yet": the largest float32 (checkpoints hold finite values only).
NO_LOSS = float(np.finfo(np.float32).max)


def initial_phase_state(state, index: int = 0, start_step=0) -> dict:
  """``TrainState.phase`` at the start of phase ``index``: no best yet (``best_loss`` NO_LOSS)."""
  return {"index": jnp.asarray(index, jnp.int32), "start": jnp.asarray(start_step, jnp.int32),
          "best_loss": jnp.asarray(NO_LOSS, jnp.float32), "best": _copy(_weights(state))}


def enter(state, phase: Phase, tx: optax.GradientTransformation):
  """The state at the start of ``phase`` (pure, jittable): the previous phase's best weights (when
  ``phase.start == 'best'`` and it was evaluated at least once) or its last ones, a fresh optimizer
  state, and a new phase record."""
  current = _weights(state)
  if phase.start == "best":
    evaluated = state.phase["best_loss"] < NO_LOSS
    current = jax.tree.map(lambda b, c: jnp.where(evaluated, b, c), state.phase["best"], current)
  state = state.replace(params=current["params"], batch_stats=current["batch_stats"],
                        student_batch_stats=current["student_batch_stats"],
                        opt_state=tx.init(current["params"]))
  return state.replace(phase=initial_phase_state(state, phase.index, phase.start_step))


def remember_best(state, loss):
  """The state with the current weights recorded as the phase's best, at validation loss ``loss``."""
  record = dict(state.phase)
  record["best_loss"] = jnp.asarray(loss, jnp.float32)
  record["best"] = _copy(_weights(state))
  return state.replace(phase=record)


# ----------------------------------------------------------------------------------------------
# The phase's objective.


def tap(features, name: str) -> jax.Array:
  """The post-ReLU output ``name`` ('stem' or 'stage<k>') of a ``Features``."""
  if name == "stem":
    return features.stem
  k = int(name[len("stage"):])
  if not 1 <= k <= len(features.stages):
    raise ValueError(f"tap {name!r}: the model has {len(features.stages)} stages (stage1.."
                     f"stage{len(features.stages)})")
  return features.stages[k - 1]


def stage_mse_per_example(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """[B]: each example's mean squared difference over its C·H·W elements (teacher stop-gradient).
  Its batch mean is ``feature_losses.feature_mse``, PyTorch's ``MSELoss()``."""
  if student.shape != teacher.shape:
    raise ValueError(f"stage_mse: the student's tap has shape {tuple(student.shape)}, the teacher's "
                     f"{tuple(teacher.shape)}; Stagewise KD / SSKD need students with the teacher's "
                     "stage widths and resolutions (e.g. resnet20 -> resnet8/14, resnet34 -> resnet18)")
  diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher.astype(jnp.float32))
  return jnp.mean(jnp.reshape(diff * diff, (diff.shape[0], -1)), axis=1)


def make_objective(phase: Phase, base_objective: Callable, label_smoothing: float):
  """``objective(logits, labels, *, step) -> (total, terms)``: the phase's logit terms ('base',
  'ce'; its 'stage_mse' terms are :class:`StageMSEObjective`'s).

  ``terms``: each term's batch mean (``base``'s own terms, ``ce_S``), ``acc_S`` and ``total``.
  """
  def objective(logits, labels, *, step):
    total, terms = jnp.zeros((), jnp.float32), {}
    for term in phase.terms:
      if term.kind == "base":
        base_total, base_terms = base_objective(logits, labels, step=step)
        total = total + base_total
        terms.update({k: v for k, v in base_terms.items() if k != "total"})
      elif term.kind == "ce":
        terms["ce_S"] = jnp.mean(losses.cross_entropy(logits["student"], labels,
                                                      label_smoothing=label_smoothing))
        total = total + terms["ce_S"]
    terms["acc_S"] = jnp.mean(losses.top_k_correct(logits["student"], labels, 1))
    terms["total"] = total
    return total, terms

  return objective


@dataclasses.dataclass(frozen=True)
class StageMSEObjective:
  """The phase's 'stage_mse' terms as a feature objective (the step's ``Task.feature_objective``
  interface, ``gpd_jax/feature_kd.py``): no connectors, no state; each term is the batch mean of
  :func:`stage_mse_per_example` between the student's and the static teacher's tap."""
  terms: tuple[Term, ...]

  def init(self, rng):  # pylint: disable=unused-argument
    return None, None

  def __call__(self, features, labels, *, step, connectors, feature_state, batch):  # pylint: disable=unused-argument
    values = {t.label: jnp.mean(stage_mse_per_example(tap(features["student"], t.tap),
                                                      tap(features["teacher"], t.tap)))
              for t in self.terms}
    return sum(values.values()), values, None, feature_state


def validation_loss_sums(phase: Phase, logits, labels, mask, features=None) -> jax.Array:
  """Sum over the real (mask 1) examples of the phase's per-example loss (eval mode)."""
  per_example = jnp.zeros(labels.shape, jnp.float32)
  for term in phase.terms:
    if term.kind in ("base", "ce"):
      per_example = per_example + losses.cross_entropy(logits["student"], labels)
    else:
      per_example = per_example + stage_mse_per_example(tap(features["student"], term.tap),
                                                        tap(features["teacher"], term.tap))
  return jnp.sum(mask * per_example)


def phase_task(task, phase: Phase, config):
  """``task`` as phase ``phase`` trains it: the phase's objective, and the static teacher only when
  one of its terms reads it (a 'base' term with a KD loss, or 'stage_mse')."""
  kinds = {t.kind for t in phase.terms}
  uses_teacher = "stage_mse" in kinds or ("base" in kinds and config.loss.base != "ce")
  objective = make_objective(phase, task.objective, float(config.loss.label_smoothing))
  stage_terms = tuple(t for t in phase.terms if t.kind == "stage_mse")
  return dataclasses.replace(task, objective=objective,
                             teacher=task.teacher if uses_teacher else None,
                             feature_objective=StageMSEObjective(stage_terms) if stage_terms else None)


def check_taps(plan, student, teacher, sample_shape) -> None:
  """Every 'stage_mse' tap exists in the student and has the same shape in the teacher (shapes
  only; ``teacher`` None checks the student alone).

  Stagewise KD and SSKD compare the stage outputs directly; a student whose stage widths or
  resolutions differ from the teacher's would need an adapter, which these methods do not have.
  """
  if not any(p.needs_features for p in plan):
    return
  from gpd_jax import feature_kd  # pylint: disable=import-outside-toplevel
  shapes = {"student": feature_kd.feature_shapes(student, sample_shape)}
  if teacher is not None:
    shapes["teacher"] = feature_kd.feature_shapes(teacher, sample_shape)
  for phase in plan:
    for term in phase.terms:
      if term.kind != "stage_mse":
        continue
      field = f"config.phases[{phase.index}].terms"
      try:
        s, t = (tap(shapes[n], term.tap) if n in shapes else None for n in ("student", "teacher"))
      except ValueError as e:
        raise PhaseConfigError(f"{field}: the student's {e}") from None
      if t is not None and s.shape[1:] != t.shape[1:]:
        raise PhaseConfigError(
            f"{field}: 'stage_mse({term.tap})' compares the student's tap of shape {s.shape[1:]} "
            f"with the teacher's {t.shape[1:]}; use a student with the teacher's stage widths "
            "(e.g. resnet20 -> resnet8/14, resnet34 -> resnet18) or drop the term")
