"""Orbax checkpoints of the train state, and exports of plain models.

* :class:`Checkpointer` — ``<workdir>/checkpoints``: the :class:`~gpd_jax.state.TrainState`, the
  data iterator's position and a small JSON ``info`` (what run wrote it, best metrics so far, and a
  fingerprint of the state). Orbax writes each step to a temporary directory and renames it when
  complete, so a crash never leaves a half-written checkpoint behind; the last ``keep`` steps are
  kept. Restores go into an abstract target that carries the shardings, and are verified: a step
  that cannot be read, holds non-finite values or does not match its fingerprint is reported,
  moved aside to ``<step>.corrupt-<time>`` (orbax ignores such names) and the next older step is
  used.
* :func:`save_export` / :func:`load_export` — a plain model's variables plus ``model.json``
  (name, classes, module overrides): what ``launch/eval.py`` and a static teacher load. Exports
  are written to a temporary directory and renamed into place, and only from finite weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from gpd_jax import models

# Fields of ``info['run']`` that must agree between a checkpoint and the config resuming it: what
# model it is, and what a step means (data, batch, schedule shape). A field missing from an older
# checkpoint's info is not compared.
MODEL_IDENTITY_FIELDS = ("model", "num_classes", "gpd", "ratio", "branches", "ema", "peers", "switch")
RUN_IDENTITY_FIELDS = MODEL_IDENTITY_FIELDS + ("batch_size", "dataset", "steps_per_epoch",
                                               "schedule", "total_steps", "phases")


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another model or setup."""


class CheckpointCorruptError(ValueError):
  """No step of the workdir's checkpoints can be restored intact."""


class NonFiniteStateError(FloatingPointError):
  """A state or an export to be written holds NaN or infinite values."""


class ExportError(ValueError):
  """An export directory is missing pieces, unreadable or holds non-finite weights."""


class _BadStep(Exception):
  """Internal: one checkpoint step is unreadable or damaged (the message says what)."""


# ----------------------------------------------------------------------------------------------
# Fingerprints: what a restore is checked against.


def _leaf_checksum(x) -> jax.Array:
  """Position-weighted wrapping uint32 sum of the leaf's bits (exact for any reduction order)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize >= 4:  # 64-bit leaves bitcast to a trailing pair of words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
  words = words.reshape(-1)
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


def _leaf_finite(x) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.bool_(True)


@jax.jit
def _fingerprint_arrays(tree):
  leaves = jax.tree.leaves(tree)
  return ([_leaf_checksum(x) for x in leaves], [_leaf_finite(x) for x in leaves])


def fingerprint(tree) -> tuple[list[int], list[bool]]:
  """``(checksums, finite)``: per leaf (``jax.tree.leaves`` order) a uint32 checksum of its bits
  and whether all its values are finite. Works on sharded arrays; the result is tiny."""
  checksums, finite = jax.device_get(_fingerprint_arrays(tree))
  return [int(c) for c in checksums], [bool(f) for f in finite]


def _leaf_names(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _first_non_finite(tree, finite: list[bool]) -> str | None:
  names = _leaf_names(tree)
  bad = [n for n, ok in zip(names, finite) if not ok]
  if not bad:
    return None
  return f"{bad[0]}" + (f" and {len(bad) - 1} more leaves" if len(bad) > 1 else "")


def _plain_path(path) -> str:
  """'a/b/0' for a key path, whether its entries are dict keys, attributes or indices."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _structure_diff(metadata_tree, abstract_state) -> str | None:
  """What differs between a checkpoint's saved metadata and the target state, or None.

  Empty entries (None, or a node without leaves such as optax's EmptyState, which orbax saves as
  None) count as structure: orbax restores only into the same tree.
  """
  def is_empty(x):
    return x is None or (isinstance(x, (tuple, list, dict)) and not x)

  def entries(tree):
    return {_plain_path(p): None if is_empty(x) else x for p, x in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_empty)}
  saved, wanted = entries(metadata_tree), entries(abstract_state)
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    return (f"{len(missing)} entries of the new state are not in the checkpoint (e.g. {missing[:2]}), "
            f"{len(extra)} entries of the checkpoint are not in the new state (e.g. {extra[:2]})")
  for key, a in wanted.items():
    m = saved[key]
    if (m is None) != (a is None):
      return f"{key} is {'empty' if m is None else 'an array'} in the checkpoint but not in the new state"
    shape = getattr(m, "shape", None)
    if shape is not None and tuple(shape) != tuple(a.shape):
      return f"{key} has shape {tuple(shape)} in the checkpoint but {tuple(a.shape)} in the new state"
  return None


def _fields(node) -> dict | None:
  """The children of a dataclass (e.g. TrainState) or dict by name, or None for anything else."""
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
  return dict(node) if isinstance(node, dict) else None


def _without_unsaved_empty_fields(abstract, on_disk):
  """``abstract`` as nested dicts, minus the None fields that ``on_disk`` (a checkpoint's metadata
  tree) does not have.

  A checkpoint written before a train-state field existed (``phase``, ``connectors``, ...) lacks
  that key; when the field is None in the new state (the feature is unused) there is nothing to
  read, so the checkpoint still fits. Orbax saves dataclasses as dicts, so the target is one too.
  """
  children = _fields(abstract)
  saved = {k: on_disk[k] for k in on_disk.keys()} if hasattr(on_disk, "keys") else None  # a mapping
  if children is None or saved is None:
    return abstract
  return {name: _without_unsaved_empty_fields(child, saved[name]) for name, child in children.items()
          if not (child is None and name not in saved)}


def _with_empty_fields(abstract, restored):
  """Rebuilds ``abstract``'s dataclasses around ``restored`` (the output of a restore into
  :func:`_without_unsaved_empty_fields`'s target), putting back the None fields left out."""
  children = _fields(abstract)
  if children is None or not isinstance(restored, dict):
    return restored
  rebuilt = {name: None if child is None and name not in restored else
             _with_empty_fields(child, restored[name]) for name, child in children.items()}
  return dataclasses.replace(abstract, **rebuilt) if dataclasses.is_dataclass(abstract) else rebuilt


# ----------------------------------------------------------------------------------------------
# Checkpoints.


@contextlib.contextmanager
def _quiet_absl():
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"gpd_jax: warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
  """Saves and restores ``(state, data_state, info)`` in ``directory``.

  ``keep``: how many of the newest steps to keep (>= 1). ``read_only``: never create, delete or
  move anything (``launch/eval.py``); damaged steps are then only reported and skipped.
  """

  def __init__(self, directory: str, *, keep: int = 3, read_only: bool = False):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"config.keep_checkpoints={keep!r}: must be an int >= 1 (the number of newest "
                       "checkpoints kept); 0 would delete every checkpoint of the run")
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    options = (ocp.CheckpointManagerOptions(read_only=True, create=False) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    with _quiet_absl():  # orbax logs a warning for every read-only manager
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, info: dict) -> None:
    """Starts an asynchronous save; :meth:`wait` (or the next save) completes it.

    ``info`` gets the state's fingerprint added. Raises NonFiniteStateError (and saves nothing)
    when the state holds NaN or infinite values.
    """
    checksums, finite = fingerprint(state)
    bad = _first_non_finite(state, finite)
    if bad is not None:
      raise NonFiniteStateError(f"the train state at step {step} holds NaN/inf values ({bad}); "
                                "nothing was saved, the previous checkpoint is kept")
    info = {**info, "fingerprint": checksums}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        info=ocp.args.JsonSave(info)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def read_info(self, step: int) -> dict:
    """The JSON ``info`` of ``step``; raises _BadStep when it cannot be read."""
    try:
      info = self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
    except Exception as e:  # pylint: disable=broad-except
      raise _BadStep(f"its info file is unreadable ({type(e).__name__}: {_short(e)})") from None
    if not isinstance(info, dict):
      raise _BadStep(f"its info file holds {type(info).__name__}, not a JSON object")
    return info

  def latest_info(self) -> tuple[int, dict] | None:
    """``(step, info)`` of the newest step whose info is readable, or None. Reads only."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_info(step)
      except _BadStep:
        continue
    return None

  def check_identity(self, step: int, info: dict, run_identity: dict, *, fields=None) -> None:
    """Raises CheckpointMismatchError when ``info['run']`` disagrees with ``run_identity`` on
    ``fields`` (default: RUN_IDENTITY_FIELDS)."""
    stored = info.get("run", {}) or {}
    diffs = [f"{k}: checkpoint has {stored.get(k)!r}, config gives {run_identity.get(k)!r}"
             for k in (fields or RUN_IDENTITY_FIELDS)
             if k in stored and stored.get(k) != run_identity.get(k)]
    if diffs:
      raise CheckpointMismatchError(
          f"the checkpoint in {self.directory} (step {step}) was written by another setup ("
          + "; ".join(diffs) + "). Use a new --workdir, or change the config back to match.")

  def _restore_step(self, step: int, abstract_state):
    info = self.read_info(step)
    if callable(abstract_state):  # the target depends on what the step holds (a phased run's phase)
      abstract_state = abstract_state(info)
    try:
      with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(os.path.join(self._step_dir(step), "state"))
      metadata = getattr(metadata, "item_metadata", metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise _BadStep(f"its state metadata is unreadable ({type(e).__name__}: {_short(e)})") from None
    if metadata is None or not jax.tree.leaves(metadata):
      raise _BadStep("its state metadata is missing or unreadable")
    # A None field that the checkpoint predates has nothing to read: leave it out of the target.
    target = _without_unsaved_empty_fields(abstract_state, metadata)
    diff = _structure_diff(metadata, target)
    if diff is not None:
      raise CheckpointMismatchError(
          f"the checkpoint in {self.directory} (step {step}) does not fit the train state this "
          f"config builds ({diff}); did config.optim, config.ema_decay or config.model change? Use a "
          "new --workdir, or restore the old settings.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise _BadStep(f"its arrays are unreadable ({_short(e)})") from None
    state = _with_empty_fields(abstract_state, restored["state"])
    checksums, finite = fingerprint(state)
    bad = _first_non_finite(state, finite)
    if bad is not None:
      raise _BadStep(f"it holds NaN/inf values ({bad})")
    stored = info.get("fingerprint")
    if stored is not None and list(stored) != checksums:
      names = _leaf_names(state)
      wrong = [n for n, a, b in zip(names, stored, checksums) if a != b]
      raise _BadStep(f"its arrays differ from the checksums saved with them ({len(wrong)} arrays, "
                     f"e.g. {wrong[:1]}): the files were changed after writing")
    return state, restored["data"], info

  def _move_aside(self, step: int) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = os.path.join(self.directory, f"{step}.corrupt-{stamp}")
    if jax.process_index() == 0:
      os.rename(self._step_dir(step), target)
    return target

  def restore_latest(self, abstract_state, run_identity: dict, *, identity_fields=None):
    """``(state, data_state, info)`` of the newest intact step, or None when there is no step.

    ``abstract_state``: the target (shapes, dtypes, shardings), or a function of a step's ``info``
    returning it (a multi-phase run's optimizer state has the structure of the step's phase).

    A damaged step (unreadable, non-finite, or not matching its fingerprint) is reported and, unless
    read-only, moved aside; the next older step is tried.

    Raises:
      CheckpointMismatchError: the checkpoint was written for a different model or setup.
      CheckpointCorruptError: there are steps, but none is intact.
    """
    steps = self.all_steps()
    damaged = []
    identity_checked = False
    for step in reversed(steps):
      try:
        if not identity_checked:
          self.check_identity(step, self.read_info(step), run_identity, fields=identity_fields)
          identity_checked = True
        restored = self._restore_step(step, abstract_state)
      except _BadStep as e:
        where = self._step_dir(step)
        if self.read_only:
          _warn(f"checkpoint step {step} ({where}) is damaged: {e}; skipping it")
          damaged.append(f"step {step} ({where}): {e}")
        else:
          moved = self._move_aside(step)
          _warn(f"checkpoint step {step} ({where}) is damaged: {e}; moved it to {moved} and "
                "trying the previous step")
          damaged.append(f"step {step} (now {moved}): {e}")
        continue
      if damaged:
        self._manager.reload()
        _warn(f"resuming from step {step}, the newest intact checkpoint")
      return restored
    if damaged:
      self._manager.reload()
      raise CheckpointCorruptError(
          f"no intact checkpoint in {self.directory}: " + "; ".join(damaged) + ". "
          + ("Nothing was changed (read-only). " if self.read_only else
             "The damaged steps were moved aside, not deleted; running again starts from step 0. ")
          + "Restore a good copy of the checkpoints, or use a new --workdir.")
    return None

  def close(self) -> None:
    self._manager.close()


def _short(e: BaseException, limit: int = 300) -> str:
  """A one-line reason: the innermost cause's message (TensorStore puts the useful part there)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split("See full TensorStore details")[0].split())
  return text if len(text) <= limit else text[:limit] + "..."


def _write_json_atomically(path: str, obj) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _non_finite_leaves(variables) -> list[str]:
  return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(variables)
          if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))]


def save_export(directory: str, variables, model_info: dict) -> None:
  """Writes a plain model: ``<directory>/variables`` (orbax) and ``<directory>/model.json``.

  ``variables``: host (numpy) arrays. ``model_info``: ``{'name', 'num_classes', 'kwargs',
  'input_shape'}`` such that ``models.create(name, num_classes, **kwargs)`` builds the module.
  The export is written next to ``directory`` and renamed into place, so ``directory`` always holds
  either the old export or the complete new one. Raises NonFiniteStateError (writing nothing)
  when a weight is NaN or infinite.
  """
  directory = os.path.abspath(directory)
  # Empty collections (the batch_stats of a model without BatchNorm, e.g. DeiT) are not variables
  # of the module, so load_export's abstract tree has none: leave them out.
  variables = {c: v for c, v in variables.items() if jax.tree.leaves(v)}
  bad = _non_finite_leaves(variables)
  if bad:
    raise NonFiniteStateError(f"not exporting to {directory}: {len(bad)} arrays hold NaN/inf values "
                              f"(e.g. {bad[0]}); the previous export, if any, is kept")
  staging = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(staging, "variables"), variables)
  _write_json_atomically(os.path.join(staging, "model.json"), model_info)
  old = f"{directory}.old-{os.getpid()}"
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(staging, directory)
  shutil.rmtree(old, ignore_errors=True)


def resolve_export_dir(path: str) -> str:
  """An export directory, or a workdir whose ``export/`` holds one."""
  for candidate in (path, os.path.join(path, "export")):
    if os.path.isfile(os.path.join(candidate, "model.json")):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"no exported model at {path!r} (expected model.json there or in "
                          f"{os.path.join(path, 'export')!r}); train one with launch/train.py, which "
                          "exports the plain student to <workdir>/export at the end")


def read_model_info(path: str) -> dict:
  """The ``model.json`` of an export (or of a workdir's ``export/``), checked for its keys."""
  directory = resolve_export_dir(path)
  model_json = os.path.join(directory, "model.json")
  try:
    with open(model_json) as f:
      model_info = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{model_json} is unreadable ({_short(e)}); export the model again (run "
                      "launch/train.py on its workdir)") from None
  missing = [k for k in ("name", "num_classes", "input_shape") if not isinstance(model_info, dict)
             or k not in model_info]
  if missing:
    raise ExportError(f"{model_json} lacks {missing}; export the model again (run launch/train.py "
                      "on its workdir)")
  return model_info


def load_export(path: str, mesh=None, *, dtype=None):
  """``(module, variables, model_info)`` of an export (or of a workdir's ``export/``).

  Variables are restored replicated on ``mesh`` (default: the first device) into the abstract
  shapes of ``models.create(**model_info)``, so a mismatch between the files and model.json fails
  loudly. ``dtype``: the module's compute dtype (default float32).

  Raises:
    FileNotFoundError: no model.json at ``path`` or in ``path/export``.
    ExportError: model.json or the variables are unreadable, or a weight is not finite.
  """
  directory = resolve_export_dir(path)
  model_info = read_model_info(directory)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_info.get("kwargs", {}).items()}
  if dtype is not None:
    kwargs["dtype"] = dtype
  try:
    module = models.create(model_info["name"], model_info["num_classes"], **kwargs)
  except (TypeError, ValueError) as e:
    raise ExportError(f"{os.path.join(directory, 'model.json')} names a model that cannot be built "
                      f"({_short(e)}); export it again (run launch/train.py on its workdir)") from None
  shape = tuple(model_info["input_shape"])
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros(shape), train=False))
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    sharding = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(directory, "variables"), abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(f"the export in {directory} is unreadable ({type(e).__name__}: {_short(e)}); "
                      "export it again (run launch/train.py on its workdir)") from None
  _, finite = fingerprint(variables)
  bad = _first_non_finite(variables, finite)
  if bad is not None:
    raise ExportError(f"the export in {directory} holds NaN/inf weights ({bad}); export it again from "
                      "a good checkpoint (run launch/train.py on its workdir)")
  return module, variables, model_info
