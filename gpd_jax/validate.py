"""Checks of a config, a workdir and the files a run needs, done in seconds before any work.

* :data:`FIELDS` — one row per config field: its kind (type), range or choices, and a hint. A new
  config field is one new row; a field that is in a config but not here is reported as unknown.
* :func:`check_config` — every field's type and range, unknown fields, and the rules that tie
  fields together (a KD loss needs a teacher, ...). Pure: reads nothing from disk.
* :func:`check_run` — :func:`check_config` plus the workdir (a writable directory), the dataset
  and its splits (opened, one record read), the teacher and pre-trained student exports, and, when
  the workdir holds a checkpoint, that it was written by the same setup (the resume identity).

Every problem raises :class:`ConfigError` (a ValueError) whose message names the field or file,
what is wrong with it, and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from typing import Any, Callable

import jax
import numpy as np

from gpd_jax import checkpoint, data, feature_kd, interop, models, objective, optim, phases, sharding
from gpd_jax.data import pipeline as data_pipeline
from gpd_jax.data import rand_augment as data_rand_augment
from gpd_jax.state import DTYPES, model_kwargs


class ConfigError(ValueError):
  """An input of a run is wrong; the message names it and says how to fix it."""


# ----------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  Attributes:
    kind: 'int', 'float' (ints accepted), 'bool', 'str', 'ints' / 'floats' / 'strs' (tuples of
      those), 'splits' (a dict name -> split spec), 'dict' (free-form mapping), 'any'.
    low, high: inclusive bounds of numbers (of every element for tuples); None = unbounded.
    low_open, high_open: make the bound exclusive.
    choices: allowed values, or a function returning them (read when checked).
    optional: None is allowed.
    length: required tuple length.
    what: what a value is, for messages ('unknown model name ...').
    check: ``check(value) -> problem or None`` for rules a range cannot say (after the kind).
    hint: appended to the message, e.g. what 0 means.
  """
  kind: str
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple | Callable[[], tuple] | None = None
  optional: bool = False
  length: int | None = None
  hint: str = ""
  what: str = "value"
  check: Callable[[Any], str | None] | None = None


def _weight_file_problem(path: str) -> str | None:
  """A PyTorch-side weight file name (.pth, .pth.tar, .safetensors, .npz)."""
  if interop.is_weight_file(path):
    return None
  return (f"{path!r} is not a weight file this project reads; give a .pth, .pth.tar, .safetensors "
          "or .npz file (or leave it empty and use teacher.workdir for an export of ours)")


def _model_name_problem(name: str) -> str | None:
  """A shipped or registered model, or a 'package.module:Callable' that imports."""
  if name in models.available_names():
    return None
  if ":" in name:
    try:
      models._constructor(name)  # pylint: disable=protected-access  # imports it: the path must resolve
    except ValueError as e:
      return f"{e}"
    return None
  close = difflib.get_close_matches(name, models.available_names(), n=1)
  suggestion = f"; did you mean {close[0]!r}?" if close else ""
  return (f"unknown model name {name!r}{suggestion} Choose one of {models.available_names()}, or "
          "register your own (models.register, or a 'package.module:Callable' name)")


def _rand_augment_problem(spec: str) -> str | None:
  """'' or a timm RandAugment string that parses."""
  if not spec:
    return None
  try:
    data_rand_augment.parse_rand_augment(spec)
  except ValueError as e:
    return str(e).split(": ", 1)[-1]
  return None


_POSITIVE = dict(low=0, low_open=True)
_PROBABILITY = dict(low=0, high=1)

FIELDS: dict[str, Field] = {
    "seed": Field("int", 0, 2**32 - 1),
    "batch_size": Field("int", 1, hint="the GLOBAL batch size"),
    "eval_batch_size": Field("int", 0, hint="0 = the same as batch_size"),
    "num_epochs": Field("float", 0),
    "num_train_steps": Field("int", 0, hint="0 = use num_epochs"),
    "log_every_steps": Field("int", 1),
    "eval_every_epochs": Field("float", **_POSITIVE),
    "checkpoint_every_steps": Field("int", 0, hint="0 = once per epoch"),
    "keep_checkpoints": Field("int", 1, hint="the number of newest checkpoints kept; 0 would "
                              "delete every checkpoint of the run"),
    "ema_decay": Field("float", 0, 1, high_open=True, hint="0 = no EMA"),
    "select_metric": Field("str"),
    "phases": Field("any", check=lambda value: "; ".join(phases.check_entries(value)) or None,
                    hint="a tuple of config_base.phase(...) dicts"),
    "model.name": Field("str", check=_model_name_problem),
    "model.kwargs": Field("dict"),
    "model.dtype": Field("str", choices=tuple(DTYPES)),
    "teacher.name": Field("str", check=lambda name: _model_name_problem(name) if name else None),
    "teacher.workdir": Field("str"),
    "teacher.checkpoint": Field("str", check=lambda path: _weight_file_problem(path) if path else None),
    "teacher.config": Field("str"),
    "teacher.train_mode": Field("bool"),
    "teacher.model.dtype": Field("str", choices=tuple(DTYPES)),
    "teacher.model.kwargs": Field("dict", hint="module overrides of the teacher, e.g. widths"),
    "init.student": Field("str"),
    "loss.base": Field("str", choices=objective.VALID_BASES),
    "loss.ce_weight": Field("float", 0),
    "loss.kd_weight": Field("float", 0),
    "loss.label_smoothing": Field("float", **_PROBABILITY),
    "loss.kd.temperature": Field("float", **_POSITIVE),
    "loss.dkd.alpha": Field("float", 0),
    "loss.dkd.beta": Field("float", 0),
    "loss.dkd.temperature": Field("float", **_POSITIVE),
    "loss.dkd.warmup_epochs": Field("float", 0),
    "loss.dkd.warmup_steps": Field("int", 0),
    "loss.dist.beta": Field("float", 0),
    "loss.dist.gamma": Field("float", 0),
    "loss.dist.temperature": Field("float", **_POSITIVE),
    "gpd.enabled": Field("bool"),
    "gpd.ratio": Field("int", 2, hint="the dynamic teacher's width multiple"),
    "gpd.branches": Field("bool"),
    "gpd.pretrained_branches": Field("bool"),
    "gpd.noise_std": Field("float", 0),
    "gpd.sce_weight": Field("float", 0),
    "gpd.sce_smoothing": Field("float", **_PROBABILITY),
    "gpd.train_dt_loss": Field("bool"),
    "gpd.dt_uses_static_kd": Field("bool"),
    "gpd.student_uses_static_kd": Field("bool"),
    "online.peers": Field("dict", hint="name -> config_base.online_peer(...)"),
    "online.teachers": Field("dict", hint="name -> config_base.frozen_teacher(...)"),
    "online.terms": Field("strs", hint="e.g. ('ce(peer)', 'dml(student<->peer)'); gpd_jax/terms.py"),
    "online.temperature": Field("float", low=0, low_open=True),
    "online.bdkd_gain": Field("float", low=0),
    "online.camkd_temperature": Field("float", low=0, low_open=True),
    "online.switch.teacher": Field("str", hint="'' = off; else a peer's name"),
    "online.switch.student": Field("str"),
    "features.method": Field("str", choices=("",) + feature_kd.METHODS, hint="'' = off"),
    "features.weight": Field("float", 0),
    "features.warmup_epochs": Field("float", 0, hint="linear ramp of features.weight"),
    "features.reviewkd.mid_features": Field("int", 0, hint="0 = min(512, the student's deepest width)"),
    "features.reviewkd.student_preact": Field("bool"),
    "features.reviewkd.pool_sizes": Field("ints", hint="HCL's pooled sizes, e.g. (4, 2, 1)"),
    "features.sp.groups": Field("int", 1, hint="SP over this many equal parts of the batch"),
    "features.fitnet.hint_layer": Field("int", 0, hint="index in [stem, stage_1, ..., stage_N]"),
    "features.crd.feature_dim": Field("int", 1),
    "features.crd.num_negatives": Field("int", 1),
    "features.crd.temperature": Field("float", **_POSITIVE),
    "features.crd.momentum": Field("float", 0, 1, high_open=True),
    "optim.name": Field("str", choices=optim.OPTIMIZERS),
    "optim.momentum": Field("float", 0, 1, high_open=True),
    "optim.nesterov": Field("bool"),
    "optim.b1": Field("float", 0, 1, high_open=True),
    "optim.b2": Field("float", 0, 1, high_open=True),
    "optim.eps": Field("float", **_POSITIVE),
    "optim.weight_decay": Field("float", 0),
    "optim.no_decay_regex": Field("str"),
    "optim.clip_norm": Field("float", 0, hint="0 = no clipping"),
    "schedule.name": Field("str", choices=optim.SCHEDULES),
    "schedule.base_lr": Field("float", **_POSITIVE, hint="the peak learning rate"),
    "schedule.warmup_epochs": Field("float", 0),
    "schedule.boundaries": Field("floats", 0, hint="epochs at which the 'step' schedule decays"),
    "schedule.decay_factor": Field("float", **_POSITIVE),
    "schedule.min_lr": Field("float", 0),
    "schedule.warmup_init_lr": Field("float", 0, hint="the first learning rate of the warm-up"),
    "schedule.cooldown_epochs": Field("float", 0, hint="'cosine': final epochs held at min_lr"),
    "mesh.shape": Field("ints", hint="-1 = the remaining devices"),
    "mesh.axes": Field("strs"),
    "mesh.batch_axes": Field("strs"),
    "mesh.param_rules": Field("any"),
    "dataset.name": Field("str", choices=data.SUPPORTED_NAMES),
    "dataset.data_dir": Field("str", optional=True),
    "dataset.source_dir": Field("str", optional=True),
    "dataset.train_split": Field("str"),
    "dataset.eval_splits": Field("splits"),
    "dataset.test_splits": Field("splits"),
    "dataset.image_size": Field("int", 1, optional=True, hint="None = the native size"),
    "dataset.augment": Field("str", choices=("imagenet", "cifar", "none")),
    "dataset.crop_padding": Field("int", 0),
    "dataset.rand_augment": Field("str", check=_rand_augment_problem,
                                  hint="'' = off; DeiT/RVT: 'rand-m9-mstd0.5-inc1'"),
    "dataset.random_erase_prob": Field("float", **_PROBABILITY, hint="0 = off; DeiT/RVT: 0.25"),
    "dataset.repeated_augmentations": Field("int", 1, hint="1 = off; DeiT/RVT: 3"),
    "dataset.mixup_alpha": Field("float", 0, hint="0 = no mixup; DeiT/RVT: 0.8"),
    "dataset.cutmix_alpha": Field("float", 0, hint="0 = no cutmix; DeiT/RVT: 1.0"),
    "dataset.mixup_prob": Field("float", **_PROBABILITY, hint="probability that a batch is mixed"),
    "dataset.mixup_switch_prob": Field("float", **_PROBABILITY,
                                       hint="probability of cutmix when both alphas are > 0"),
    "dataset.num_train_examples": Field("int", 1, optional=True, hint="None = all"),
    "dataset.num_eval_examples": Field("int", 1, optional=True, hint="None = all"),
    "dataset.train_fraction": Field("float", 0, 1, low_open=True,
                                    hint="the share of the train split used (1 = all)"),
    "dataset.subset_seed": Field("int", 0, 2**32 - 1),
    "dataset.worker_count": Field("int", 0),
    "dataset.num_threads": Field("int", 0),
    "dataset.prefetch_buffer_size": Field("int", 0),
    "dataset.mean": Field("floats", optional=True),
    "dataset.std": Field("floats", optional=True, low=0, low_open=True),
    "dataset.image_shape": Field("ints", 1, optional=True, length=3, hint="(H, W, C); synthetic only"),
    "dataset.num_classes": Field("int", 2, optional=True, hint="synthetic only"),
    "dataset.synthetic_sizes": Field("dict", optional=True, hint="synthetic only"),
}


# ----------------------------------------------------------------------------------------------
# Field checks.


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _range_text(field: Field) -> str:
  parts = []
  if field.low is not None:
    parts.append(f"{'>' if field.low_open else '>='} {field.low}")
  if field.high is not None:
    parts.append(f"{'<' if field.high_open else '<='} {field.high}")
  return " and ".join(parts)


def _in_range(v, field: Field) -> bool:
  if isinstance(v, float) and not math.isfinite(v):
    return False
  if field.low is not None and (v <= field.low if field.low_open else v < field.low):
    return False
  if field.high is not None and (v >= field.high if field.high_open else v > field.high):
    return False
  return True


def _is_mapping(v) -> bool:
  return hasattr(v, "items") and hasattr(v, "keys")


def check_field(path: str, value, field: Field) -> str | None:
  """What is wrong with ``config.<path> = value`` (a sentence with the fix), or None."""
  name = f"config.{path}"
  hint = f" ({field.hint})" if field.hint else ""
  if value is None:
    return None if field.optional or field.kind == "any" else f"{name} is None; set it{hint}"
  kind = field.kind
  if kind == "any":
    problem = field.check(value) if field.check is not None else None
    return f"{name}: {problem}" if problem else None
  if kind == "bool":
    if not isinstance(value, bool):
      return f"{name}={value!r} must be True or False"
    return None
  if kind == "str":
    if not isinstance(value, str):
      return f"{name}={value!r} must be a string{hint}"
  elif kind in ("int", "float"):
    ok = _is_int(value) if kind == "int" else _is_number(value)
    if not ok:
      return f"{name}={value!r} must be {'an int' if kind == 'int' else 'a number'}{hint}"
    if not _in_range(value, field):
      return f"{name}={value!r} must be {_range_text(field)}{hint}; set it in range"
  elif kind in ("ints", "floats", "strs"):
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
      return f"{name}={value!r} must be a tuple{hint}"
    element_ok = {"ints": _is_int, "floats": _is_number, "strs": lambda v: isinstance(v, str)}[kind]
    bad = [v for v in value if not element_ok(v)]
    if bad:
      what = {"ints": "ints", "floats": "numbers", "strs": "strings"}[kind]
      return f"{name}={tuple(value)!r} must hold {what}, not {bad[0]!r}{hint}"
    if field.length is not None and len(value) != field.length:
      return f"{name}={tuple(value)!r} must have {field.length} elements{hint}"
    if kind != "strs" and not all(_in_range(v, field) for v in value):
      return f"{name}={tuple(value)!r}: every element must be {_range_text(field)}{hint}"
  elif kind == "splits":
    if not _is_mapping(value):
      return f"{name}={value!r} must be a dict name -> split spec, e.g. {{'val': 'test'}}"
    bad = [(k, v) for k, v in value.items() if not isinstance(v, str) or not v]
    if bad:
      return f"{name}[{bad[0][0]!r}]={bad[0][1]!r} must be a split spec string such as 'test'"
  elif kind == "dict":
    if not _is_mapping(value):
      return f"{name}={value!r} must be a dict{hint}"
  else:
    raise AssertionError(f"FIELDS[{path!r}] has an unknown kind {kind!r}")
  if field.check is not None:
    problem = field.check(value)
    if problem:
      return f"{name}: {problem}"
  if field.choices is not None:
    choices = field.choices() if callable(field.choices) else field.choices
    if value not in choices:
      close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
      suggestion = f"; did you mean {close[0]!r}?" if close else ""
      return f"{name}: unknown {field.what} {value!r}; choose one of {tuple(choices)}{suggestion}"
  return None


def _unknown_field(path: str) -> str:
  close = difflib.get_close_matches(path, list(FIELDS), n=1, cutoff=0.7)
  suggestion = f"; did you mean config.{close[0]}?" if close else ""
  return (f"config.{path} is not a config field{suggestion} (every field is listed in "
          "gpd_jax/config_base.py and gpd_jax/validate.py FIELDS); remove or rename it")


def _walk(config, prefix: str, problems: list[str]) -> None:
  for key, value in config.items():
    path = f"{prefix}{key}"
    if path in FIELDS:
      problem = check_field(path, value, FIELDS[path])
      if problem:
        problems.append(problem)
    elif _is_mapping(value) and any(f.startswith(path + ".") for f in FIELDS):
      _walk(value, path + ".", problems)
    else:
      problems.append(_unknown_field(path))


def _cross_field_problems(config) -> list[str]:
  """Rules that tie fields together (each field alone is already known to be well-typed)."""
  problems = []
  get = lambda section, key, default=None: (config.get(section) or {}).get(key, default)
  if config.get("phases") and config.get("num_train_steps"):
    problems.append(f"config.num_train_steps={config.num_train_steps} with config.phases: a phased "
                    "run's length is the sum of its phases' epochs; set num_train_steps=0")
  elif not config.get("phases") and not config.get("num_train_steps") and not config.get("num_epochs"):
    problems.append("config.num_epochs=0 and config.num_train_steps=0: the run would have no steps; "
                    "set config.num_epochs (or config.num_train_steps) > 0")
  base = get("loss", "base", "ce")
  teacher = get("teacher", "name", "")
  if base != "ce" and not teacher:
    problems.append(f"config.loss.base={base!r} distils from a static teacher, but config.teacher.name "
                    "is empty; name a teacher or use loss.base='ce'")
  if teacher and not get("teacher", "workdir", "") and not get("teacher", "checkpoint", ""):
    problems.append("config.teacher.workdir is empty: point it to a trained teacher's workdir or "
                    f"export (e.g. a run of a *_ce.py config with model.name={teacher!r}), or set "
                    "config.teacher.checkpoint to a PyTorch weight file")
  method = get("features", "method", "")
  if method and not teacher:
    problems.append(f"config.features.method={method!r} distils a static teacher's features, but "
                    "config.teacher.name is empty; name a teacher or set config.features.method=''")
  mesh = config.get("mesh") or {}
  shape, axes = tuple(mesh.get("shape", (-1,))), tuple(mesh.get("axes", ("data",)))
  if len(shape) != len(axes):
    problems.append(f"config.mesh.shape {shape} and config.mesh.axes {axes} differ in length; give "
                    "one size per axis")
  missing_axes = [a for a in mesh.get("batch_axes", ("data",)) if a not in axes]
  if missing_axes:
    problems.append(f"config.mesh.batch_axes names {missing_axes}, which are not in config.mesh.axes "
                    f"{axes}")
  dataset = config.get("dataset") or {}
  if dataset.get("name") == "synthetic":
    for key in ("image_shape", "num_classes"):
      if dataset.get(key) is None:
        problems.append(f"config.dataset.{key} is required for the synthetic dataset")
  repeats = dataset.get("repeated_augmentations", 1) or 1
  if repeats > config.get("batch_size", 0):
    problems.append(f"config.dataset.repeated_augmentations={repeats} is above config.batch_size="
                    f"{config.get('batch_size')}; each batch must hold at least one image per copy")
  mixing = dataset.get("mixup_alpha", 0) or dataset.get("cutmix_alpha", 0)
  if mixing and (get("online", "terms", ()) or get("online", "peers", {})):
    problems.append("config.dataset.mixup_alpha/cutmix_alpha mix the batch into soft targets, which "
                    "the online terms (config.online) do not read; turn mixing off for online runs")
  if mixing and config.get("phases"):
    problems.append("config.dataset.mixup_alpha/cutmix_alpha with config.phases: a phase's terms "
                    "(stage MSE, CE on the head) read hard labels; turn mixing off for phased runs")
  problems += _online_problems(config.get("online") or {})
  regex = get("optim", "no_decay_regex", "")
  if regex:
    try:
      re.compile(regex)
    except re.error as e:
      problems.append(f"config.optim.no_decay_regex={regex!r} is not a regular expression ({e})")
  schedule = config.get("schedule") or {}
  if schedule.get("name") == "cosine" and schedule.get("min_lr", 0) > schedule.get("base_lr", 0):
    problems.append(f"config.schedule.min_lr={schedule.get('min_lr')} is above "
                    f"config.schedule.base_lr={schedule.get('base_lr')}; lower it")
  return problems


def _online_problems(online) -> list[str]:
  """The shape of each ``config.online.peers.<name>`` and ``config.online.teachers.<name>`` entry."""
  problems = []
  for name, peer in (online.get("peers") or {}).items():
    field = f"config.online.peers.{name}"
    model = (peer.get("model") or {}) if _is_mapping(peer) else {}
    if not model.get("name"):
      problems.append(f"{field}.model.name is missing; build the entry with "
                      "config_base.online_peer('<model name>')")
      continue
    problem = _model_name_problem(model["name"])
    if problem:
      problems.append(f"{field}.model.name: {problem}")
    if model.get("dtype", "float32") not in DTYPES:
      problems.append(f"{field}.model.dtype={model.get('dtype')!r} is unknown; choose one of {tuple(DTYPES)}")
    ratio = peer.get("gpd_ratio", 0)
    if not _is_int(ratio) or ratio < 0 or ratio == 1:
      problems.append(f"{field}.gpd_ratio={ratio!r} must be 0 (plain) or an int >= 2 (GPD)")
    if not isinstance(peer.get("init", ""), str):
      problems.append(f"{field}.init must be a path string ('' = random init)")
  for name, teacher in (online.get("teachers") or {}).items():
    field = f"config.online.teachers.{name}"
    if not _is_mapping(teacher) or not teacher.get("name") or not teacher.get("workdir"):
      problems.append(f"{field} needs a model 'name' and a 'workdir'; build it with "
                      "config_base.frozen_teacher('<model name>', '<workdir>')")
      continue
    problem = _model_name_problem(teacher["name"])
    if problem:
      problems.append(f"{field}.name: {problem}")
  return problems


def check_config(config) -> None:
  """Raises ConfigError listing every wrong, unknown or inconsistent field of ``config``."""
  problems: list[str] = []
  _walk(config, "", problems)
  if not problems:
    problems = _cross_field_problems(config)
  if problems:
    raise ConfigError("\n".join(problems))


# ----------------------------------------------------------------------------------------------
# The run: workdir, data, teacher, checkpoints.


def check_workdir(workdir: str, *, must_exist: bool = False) -> None:
  """``workdir`` is (or can be created as) a writable directory; ``must_exist`` for read-only use."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pick another path")
  if must_exist:
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir={workdir} does not exist; give the workdir of a training run "
                        "(check the path for typos)")
    return
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir={workdir}: {existing} is a file, so the workdir cannot be created "
                      "there; pick another path")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir}: {existing} is not writable; pick a writable path or fix "
                      "its permissions")


def _check_split(config, split: str, field: str) -> int:
  """Opens ``split`` and reads its first record; returns its number of examples."""
  try:
    source = data_pipeline.open_source(config, split)
    if len(source) == 0:
      raise ConfigError(f"{field}={split!r}: the split of dataset {config.dataset.name!r} is empty; "
                        "fix the split spec")
    record = source[0]
    if "image" not in record or "label" not in record:
      raise ConfigError(f"{field}={split!r}: its records have no image/label; re-prepare dataset "
                        f"{config.dataset.name!r}")
    return len(source)
  except (ConfigError, data.DatasetNotReadyError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{field}={split!r}: dataset {config.dataset.name!r} cannot be read "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); fix the split name "
                      "(e.g. 'train', 'test', 'train[:5000]') or re-prepare the dataset") from None


def check_data(config, splits: dict | None = None, *, training: bool = True) -> None:
  """The dataset is known and ready, and every split opens and reads: the train split (when
  ``training``) and ``splits`` (name -> spec; default: the config's eval and test splits)."""
  try:
    data.get_dataset_info(config)
  except ValueError as e:
    raise ConfigError(f"config.dataset: {e}") from None
  if training:
    _check_split(config, config.dataset.get("train_split", "train") or "train",
                 "config.dataset.train_split")
  named = {}
  if splits is None:
    for key in ("eval_splits", "test_splits"):
      for name, split in dict(config.dataset.get(key) or {}).items():
        named[f"config.dataset.{key}[{name!r}]"] = split
  else:
    named = {f"split {name!r}": split for name, split in splits.items()}
  for field, split in named.items():
    _check_split(config, split, field)
  if training and data.steps_per_epoch(config) < 1:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the "
                      f"{data.num_examples(config)} training examples; lower it")


def _check_export(path: str, field: str, *, name: str, num_classes: int) -> None:
  try:
    model_info = checkpoint.read_model_info(path)
  except FileNotFoundError as e:
    raise ConfigError(f"{field}: {e}") from None
  except checkpoint.ExportError as e:
    raise ConfigError(f"{field}: {e}") from None
  if model_info["name"] != name:
    raise ConfigError(f"{field}: the export at {path!r} is a {model_info['name']!r}, but the config "
                      f"expects a {name!r}; point it to the right export or fix the model name")
  if model_info["num_classes"] != num_classes:
    raise ConfigError(f"{field}: the export at {path!r} has {model_info['num_classes']} classes but the "
                      f"dataset {num_classes}; the teacher and the student must share the label space")


def _check_weight_file(path: str, field: str) -> None:
  if not os.path.isfile(path):
    raise ConfigError(f"{field}: no file at {path!r} (relative paths are taken under the run's "
                      "workdir); fix the path")


def check_teacher(config, workdir: str, num_classes: int, *, training: bool = True) -> None:
  """The static teacher's export exists (or, when training, its config can train it)."""
  name = config.teacher.get("name") or ""
  if not name:
    return
  weights = config.teacher.get("checkpoint") or ""
  if weights:  # a PyTorch file: it must exist; its keys and shapes are checked when it is read
    _check_weight_file(os.path.join(workdir, weights), "config.teacher.checkpoint")
    return
  teacher_dir = os.path.join(workdir, config.teacher.workdir)
  try:
    checkpoint.resolve_export_dir(teacher_dir)
  except FileNotFoundError:
    teacher_config = config.teacher.get("config") or ""
    if not training or not teacher_config:
      raise ConfigError(
          f"config.teacher.workdir: no trained teacher at {teacher_dir!r}. Train one first, e.g. "
          f"`python launch/train.py --config=<teacher config> --workdir={teacher_dir}`"
          + (", or set config.teacher.config to have it trained there automatically" if training
             else " (evaluation never trains)")) from None
    from gpd_jax.train import load_config_file  # pylint: disable=import-outside-toplevel
    try:
      sub = load_config_file(teacher_config)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"config.teacher.config={teacher_config!r} cannot be loaded "
                        f"({type(e).__name__}: {e}); fix the path or the file") from None
    try:
      check_config(sub)
    except ConfigError as e:
      raise ConfigError(f"config.teacher.config={teacher_config!r} is not valid:\n{e}") from None
    if sub.model.name != name:
      raise ConfigError(f"config.teacher.config={teacher_config!r} trains a {sub.model.name!r}, but "
                        f"config.teacher.name={name!r}; make them agree")
    return
  _check_export(teacher_dir, "config.teacher.workdir", name=name, num_classes=num_classes)


def _check_phase_patterns(config, num_classes: int, steps_per_epoch: int) -> None:
  """Every phase's ``train`` entry names leaves of the student and its 'stage_mse' taps exist there
  (shapes only, nothing computed; the teacher's side is checked when it is loaded)."""
  plan = phases.make_plan(config, steps_per_epoch)
  if not plan:
    return
  module = models.create(config.model.name, num_classes, **model_kwargs(config.model))
  info = data.get_dataset_info(config)
  size = config.dataset.get("image_size") or info.image_shape[0]
  sample = (1, int(size), int(size), int(info.image_shape[-1]))
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros(sample, np.float32),
                                                train=False))
  phases.check_patterns(plan, abstract["params"])
  phases.check_taps(plan, module, None, sample)


def run_steps(config, steps_per_epoch: int) -> int:
  """The run's length in steps: the sum of its phases, else ``num_train_steps`` or ``num_epochs``."""
  plan = phases.make_plan(config, steps_per_epoch)
  if plan:
    return plan[-1].end_step
  return config.get("num_train_steps") or int(round(config.num_epochs * steps_per_epoch))


def resume_identity(config, num_classes: int, steps_per_epoch: int, total_steps: int) -> dict:
  """What a checkpoint must agree on with the config that resumes it.

  The model (name, classes, GPD ratio and branches, EMA, the online peers and SwitOKD's paused
  peer) and what a step means: the global batch,
  the training data, the epoch length and the schedule's shape (its name, warm-up and decay points;
  the cosine's length too). ``base_lr`` may change (e.g. to recover from a NaN), and ``num_epochs``
  may grow for the step and constant schedules (training longer).
  """
  d = config.dataset
  schedule = config.schedule
  identity = {
      "model": config.model.name, "num_classes": num_classes, "gpd": bool(config.gpd.enabled),
      "ratio": int(config.gpd.ratio) if config.gpd.enabled else 1,
      "branches": bool(config.gpd.enabled and config.gpd.branches),
      "ema": bool(config.ema_decay),
      "batch_size": int(config.batch_size),
      "dataset": {"name": d.name, "train_split": d.get("train_split", "train"),
                  "num_train_examples": d.get("num_train_examples"),
                  "image_size": d.get("image_size")},
      "steps_per_epoch": int(steps_per_epoch),
      "schedule": {"name": schedule.name, "warmup_epochs": float(schedule.get("warmup_epochs", 0.0)),
                   "boundaries": ([float(b) for b in schedule.boundaries]
                                  if schedule.name == "step" else []),
                   "decay_factor": float(schedule.decay_factor) if schedule.name == "step" else 0.0},
      "total_steps": int(total_steps) if schedule.name == "cosine" else None,
  }
  method = (config.get("features") or {}).get("method", "")
  if method:  # only then, so checkpoints of runs without feature methods keep their identity
    identity["features"] = method
  online = config.get("online") or {}
  identity["peers"] = {name: {"model": p.model.name, "gpd_ratio": int(p.get("gpd_ratio", 0) or 0)}
                       for name, p in (online.get("peers") or {}).items()}
  identity["switch"] = (online.get("switch") or {}).get("teacher", "")
  # Only for the runs that use them, so the identity of every other run stays what it was.
  if float(d.get("train_fraction", 1.0) or 1.0) != 1.0:
    identity["dataset"]["train_fraction"] = float(d.train_fraction)
    identity["dataset"]["subset_seed"] = int(d.get("subset_seed", 0) or 0)
  if config.get("phases"):
    identity["phases"] = phases.describe(phases.make_plan(config, steps_per_epoch))
  return identity


def check_run(config, workdir: str, *, training: bool = True, splits: dict | None = None) -> None:
  """Everything :func:`gpd_jax.train.setup` will need, checked without compiling or writing.

  ``training=False`` (evaluation): the workdir must exist and hold a checkpoint, and nothing may
  have to be trained. ``splits``: name -> split spec to check instead of the config's eval and test
  splits.
  """
  check_config(config)
  workdir = os.path.abspath(workdir)
  check_workdir(workdir, must_exist=not training)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not training and not os.path.isdir(ckpt_dir):
    raise ConfigError(f"--workdir={workdir} holds no checkpoints/ directory; give the workdir of a "
                      "training run, or evaluate an export with --export")
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f"{e}; fix config.mesh") from None
  shards = sharding.num_batch_shards(mesh, config.mesh)
  for key in ("batch_size", "eval_batch_size"):
    value = config.get(key) or config.batch_size
    if value % shards:
      raise ConfigError(f"config.{key}={value} (global) is not divisible by the {shards} devices on "
                        "the batch axes of the mesh; pick a multiple, or set config.mesh.shape")
  check_data(config, splits, training=training)
  num_classes = data.get_dataset_info(config).num_classes
  check_teacher(config, workdir, num_classes, training=training)
  init_student = (config.get("init") or {}).get("student") or ""
  if training and init_student:
    path = os.path.join(workdir, init_student)
    if interop.is_weight_file(path):
      _check_weight_file(path, "config.init.student")
    else:
      _check_export(path, "config.init.student", name=config.model.name, num_classes=num_classes)
  steps_per_epoch = data.steps_per_epoch(config)
  try:
    total_steps = run_steps(config, steps_per_epoch)
    _check_phase_patterns(config, num_classes, steps_per_epoch)
  except phases.PhaseConfigError as e:
    raise ConfigError(str(e)) from None
  if training and total_steps < 1:
    raise ConfigError(f"config.num_epochs={config.num_epochs} is less than one step ({steps_per_epoch} "
                      "steps per epoch); raise it")
  if os.path.isdir(ckpt_dir):
    reader = checkpoint.Checkpointer(ckpt_dir, read_only=True)
    try:
      latest = reader.latest_info()
      if latest is not None:
        identity = resume_identity(config, num_classes, steps_per_epoch, total_steps)
        # Evaluation only needs the same model; training also needs the same meaning of a step.
        fields = None if training else checkpoint.MODEL_IDENTITY_FIELDS
        reader.check_identity(*latest, identity, fields=fields)
    finally:
      reader.close()
