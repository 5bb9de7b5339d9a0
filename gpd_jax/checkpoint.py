"""Orbax checkpoints of the train state, and exports of plain models.

* :class:`Checkpointer` — ``<workdir>/checkpoints``: the :class:`~gpd_jax.state.TrainState`, the
  data iterator's position and a small JSON ``info`` (what model wrote it, best metrics so far).
  Orbax writes each step to a temporary directory and renames it when complete, so a crash never
  leaves a half-written checkpoint behind; the last ``keep`` steps are kept. Restores always go
  into an abstract target that carries the shardings.
* :func:`save_export` / :func:`load_export` — a plain model's variables plus ``model.json``
  (name, classes, module overrides): what ``launch/eval.py`` and a static teacher load.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from gpd_jax import models

# Fields of ``info['run']`` that must agree between a checkpoint and the config resuming it.
RUN_IDENTITY_FIELDS = ("model", "num_classes", "gpd", "ratio", "branches", "ema")


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another model or setup."""


class Checkpointer:
  """Saves and restores ``(state, data_state, info)`` in ``directory``."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, info: dict) -> None:
    """Starts an asynchronous save; :meth:`wait` (or the next save) completes it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        info=ocp.args.JsonSave(info)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state, run_identity: dict):
    """``(state, data_state, info)`` of the latest step, or None when there is none.

    Raises:
      CheckpointMismatchError: the checkpoint was written for a different model or setup.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    info = self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
    stored = info.get("run", {})
    diffs = [f"{k}: checkpoint has {stored.get(k)!r}, config asks for {run_identity.get(k)!r}"
             for k in RUN_IDENTITY_FIELDS if stored.get(k) != run_identity.get(k)]
    if diffs:
      raise CheckpointMismatchError(
          f"the checkpoint in {self.directory} (step {step}) was written by another setup ("
          + "; ".join(diffs) + "). Use a new --workdir, or change the config to match.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          info=ocp.args.JsonRestore()))
    except ValueError as e:
      raise CheckpointMismatchError(
          f"the checkpoint in {self.directory} (step {step}) does not fit the train state this "
          "config builds (did config.optim, config.ema_decay or config.model change?). Use a new "
          f"--workdir, or restore the old settings. Orbax said: {e}") from None
    return restored["state"], restored["data"], restored["info"]

  def close(self) -> None:
    self._manager.close()


def _write_json_atomically(path: str, obj) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save_export(directory: str, variables, model_info: dict) -> None:
  """Writes a plain model: ``<directory>/variables`` (orbax) and ``<directory>/model.json``.

  ``model_info``: ``{'name', 'num_classes', 'kwargs'}`` such that
  ``models.create(name, num_classes, **kwargs)`` builds the module. Overwrites an older export.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  # Empty collections (the batch_stats of a model without BatchNorm, e.g. DeiT) are not variables
  # of the module, so load_export's abstract tree has none: leave them out.
  variables = {c: v for c, v in variables.items() if jax.tree.leaves(v)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "variables"), variables, force=True)
  _write_json_atomically(os.path.join(directory, "model.json"), model_info)


def resolve_export_dir(path: str) -> str:
  """An export directory, or a workdir whose ``export/`` holds one."""
  for candidate in (path, os.path.join(path, "export")):
    if os.path.isfile(os.path.join(candidate, "model.json")):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"no exported model at {path!r} (expected model.json there or in "
                          f"{os.path.join(path, 'export')!r}); train one with launch/train.py, which "
                          "exports the plain student to <workdir>/export at the end")


def load_export(path: str, mesh=None, *, dtype=None):
  """``(module, variables, model_info)`` of an export (or of a workdir's ``export/``).

  Variables are restored replicated on ``mesh`` (default: the first device) into the abstract
  shapes of ``models.create(**model_info)``, so a mismatch between the files and model.json fails
  loudly. ``dtype``: the module's compute dtype (default float32).
  """
  directory = resolve_export_dir(path)
  with open(os.path.join(directory, "model.json")) as f:
    model_info = json.load(f)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_info.get("kwargs", {}).items()}
  if dtype is not None:
    kwargs["dtype"] = dtype
  module = models.create(model_info["name"], model_info["num_classes"], **kwargs)
  shape = tuple(model_info["input_shape"])
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros(shape), train=False))
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    sharding = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, "variables"), abstract)
  return module, variables, model_info
