"""Faults on disk: damaged, truncated, half-written and stray checkpoint steps, non-finite states,
retention, exports, and the rerun of a finished run.

One tiny 4-step run (checkpoints at steps 2 and 4, exports) is trained once per module; each test
damages its own copy. Restores go through ``train.setup`` (no compilation) where that suffices.
"""
import dataclasses
import glob
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gpd_jax import checkpoint, train
from test_train import tiny_config


def config(steps=4):
  return tiny_config(teacher=False, steps=steps)


def snapshot(root):
  state = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in [""] + dirnames + filenames:
      st = os.lstat(os.path.join(dirpath, name))
      state[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
  return state


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  train.train_and_evaluate(config(), workdir)
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  return workdir


def step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def data_files(workdir, step):
  """The state's array data files of ``step``, largest first."""
  files = glob.glob(os.path.join(step_dir(workdir, step), "state", "**", "d", "*"), recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def restored_step(workdir):
  run = train.setup(config(6), workdir)
  run.ckpt.close()
  return int(run.state.step)


def moved_aside(workdir, step):
  return glob.glob(os.path.join(workdir, "checkpoints", f"{step}.corrupt-*"))


def rewrite_state(workdir, step, change):
  """Replaces ``step``'s state with ``change(state)``, written by orbax like a real checkpoint but
  behind our back (the info, with its fingerprint, stays as it was)."""
  run = train.setup(config(), workdir, training=False)
  run.ckpt.close()
  state = change(run.state)
  target = os.path.join(step_dir(workdir, step), "state")
  shutil.rmtree(target)
  with ocp.StandardCheckpointer() as writer:
    writer.save(target, state)


# ----------------------------------------------------------------------------------------------
# Damaged steps: reported, moved aside (never deleted), the previous step used.


def garble(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 3)
    f.write(np.random.default_rng(0).integers(0, 256, min(4096, size - size // 3), np.uint8).tobytes())


@pytest.mark.parametrize("fault", ["garbled_data", "truncated_data", "damaged_metadata",
                                   "damaged_info", "missing_data"])
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_used(run_copy, fault, capsys):
  if fault == "garbled_data":
    garble(data_files(run_copy, 4)[0])
  elif fault == "truncated_data":
    path = data_files(run_copy, 4)[0]
    os.truncate(path, os.path.getsize(path) // 2)
  elif fault == "damaged_metadata":
    with open(os.path.join(step_dir(run_copy, 4), "state", "_METADATA"), "r+b") as f:
      f.write(b"}}garbage{{")
  elif fault == "damaged_info":
    with open(os.path.join(step_dir(run_copy, 4), "info", "metadata"), "w") as f:
      f.write("{not json")
  else:  # a half-written step: its data files never arrived
    for path in data_files(run_copy, 4):
      os.remove(path)
  original_files = sorted(os.listdir(step_dir(run_copy, 4)))
  assert restored_step(run_copy) == 2
  err = capsys.readouterr().err
  assert "checkpoint step 4" in err and "is damaged" in err and "moved it to" in err, err
  [aside] = moved_aside(run_copy, 4)
  assert sorted(os.listdir(aside)) == original_files  # kept, not deleted
  assert not os.path.exists(step_dir(run_copy, 4))
  assert checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints")).all_steps() == [2]


def test_changed_but_readable_arrays_fail_the_checksum(run_copy, capsys):
  """A silent change (finite, well-formed) is caught by the fingerprint saved with the step."""
  def nudge(state):
    leaves, treedef = jax.tree.flatten(state)
    index = next(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
    leaves[index] = leaves[index] + 1e-3
    return jax.tree.unflatten(treedef, leaves)
  rewrite_state(run_copy, 4, nudge)
  assert restored_step(run_copy) == 2
  assert "differ from the checksums" in capsys.readouterr().err
  assert len(moved_aside(run_copy, 4)) == 1


def test_non_finite_step_is_not_restored(run_copy, capsys):
  def poison(state):
    leaves, treedef = jax.tree.flatten(state)
    index = next(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating))
    leaves[index] = leaves[index].at[(0,) * leaves[index].ndim].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)
  rewrite_state(run_copy, 4, poison)
  assert restored_step(run_copy) == 2
  assert "NaN/inf" in capsys.readouterr().err
  assert len(moved_aside(run_copy, 4)) == 1


def as_written_before(state, dropped=("phase", "connectors", "feature_state"), extra=None):
  """``state`` as a version without the ``dropped`` fields (all None here) would have saved it."""
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  assert all(fields[name] is None for name in dropped)
  return {**{k: v for k, v in fields.items() if k not in dropped}, **(extra or {})}


def test_a_checkpoint_from_before_a_new_unused_field_restores_and_resumes(run_copy, capsys):
  """Train-state fields added later (phase, connectors, feature_state) are None when unused; a
  checkpoint written before they existed lacks their keys and must still restore, bitwise."""
  expected = train.setup(config(), run_copy, training=False)
  expected.ckpt.close()
  rewrite_state(run_copy, 4, as_written_before)
  run = train.setup(config(6), run_copy)
  run.ckpt.close()
  assert int(run.state.step) == 4 and run.state.phase is None and run.state.connectors is None
  chex.assert_trees_all_equal(run.state, expected.state)
  assert not moved_aside(run_copy, 4) and "damaged" not in capsys.readouterr().err
  train.train_and_evaluate(config(6), run_copy)  # and the run goes on from there
  assert checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints")).latest_step() == 6


def test_a_different_state_layout_is_a_mismatch_and_is_never_moved_aside(run_copy):
  """A key the new state does not have is a layout difference, not damage: a clear error, and
  the step stays where it is (moving it aside would make the next run start from step 0)."""
  rewrite_state(run_copy, 4, lambda s: as_written_before(s, (), {"legacy_field": None}))
  before = snapshot(os.path.join(run_copy, "checkpoints"))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="legacy_field"):
    train.setup(config(6), run_copy)
  assert snapshot(os.path.join(run_copy, "checkpoints")) == before


def test_stray_and_temporary_step_directories(run_copy, capsys):
  os.makedirs(step_dir(run_copy, 9))  # a stray step: not a checkpoint
  tmp = os.path.join(run_copy, "checkpoints", "7.orbax-checkpoint-tmp-1234")  # a save cut off
  shutil.copytree(step_dir(run_copy, 4), tmp)
  assert restored_step(run_copy) == 4
  assert "checkpoint step 9" in capsys.readouterr().err
  assert len(moved_aside(run_copy, 9)) == 1 and os.path.isdir(tmp)


def test_resume_after_a_fallback_repeats_the_lost_steps_exactly(run_copy):
  garble(data_files(run_copy, 4)[0])
  train.train_and_evaluate(config(6), run_copy)
  with open(os.path.join(run_copy, "metrics.jsonl")) as f:  # every record, repeats included
    records = [r for r in map(json.loads, f) if r["kind"] == "train"]
  steps = [r["step"] for r in records]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 were trained again from step 2
  np.testing.assert_array_equal([records[2]["total"], records[3]["total"]],
                                [records[4]["total"], records[5]["total"]])


def test_no_intact_step_is_a_clear_error_and_nothing_is_deleted(run_copy, capsys):
  for step in (2, 4):
    garble(data_files(run_copy, step)[0])
  export_before = snapshot(os.path.join(run_copy, "export"))
  with pytest.raises(checkpoint.CheckpointCorruptError, match="no intact checkpoint.*step 4.*step 2"):
    train.train_and_evaluate(config(6), run_copy)
  assert len(moved_aside(run_copy, 4)) == 1 and len(moved_aside(run_copy, 2)) == 1
  assert snapshot(os.path.join(run_copy, "export")) == export_before


def test_eval_skips_a_damaged_step_without_touching_it(run_copy, capsys):
  garble(data_files(run_copy, 4)[0])
  before = snapshot(run_copy)
  results = train.evaluate_checkpoint(config(), run_copy)
  assert np.isfinite(results["val"]["top1_S"])
  assert "skipping it" in capsys.readouterr().err
  assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------------------------
# Saving: retention, non-finite states.


def test_retention_zero_is_refused_before_anything_is_deleted(run_copy):
  before = snapshot(run_copy)
  with pytest.raises(ValueError, match="config.keep_checkpoints=0"):
    checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints"), keep=0)
  c = config(6)
  c.keep_checkpoints = 0
  with pytest.raises(ValueError, match="config.keep_checkpoints=0 must be >= 1"):
    train.train_and_evaluate(c, run_copy)
  assert snapshot(run_copy) == before


def test_retention_one_keeps_the_newest_step(run_copy):
  c = config(8)
  c.keep_checkpoints = 1
  train.train_and_evaluate(c, run_copy)
  assert checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints"), read_only=True).all_steps() == [8]


def test_a_non_finite_state_is_never_saved(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  state = {"w": jnp.array([1.0, jnp.inf]), "step": jnp.int32(3)}
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 3.*\['w'\]"):
    ckpt.save(3, state, {}, {})
  ckpt.wait()
  assert ckpt.all_steps() == []
  ckpt.close()


def test_fingerprint_sees_every_bit_and_ignores_the_sharding():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  flipped = x.at[3, 5].set(jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x[3, 5], jnp.uint32) ^ jnp.uint32(1), jnp.float32))
  swapped = x.at[0, 1].set(x[0, 2]).at[0, 2].set(x[0, 1])
  sums = {name: checkpoint.fingerprint({"x": v, "b": jnp.array([True, False]),
                                        "h": jnp.ones(3, jnp.bfloat16)})[0]
          for name, v in [("plain", x), ("sharded", sharded), ("flipped", flipped),
                          ("swapped", swapped)]}
  assert sums["plain"] == sums["sharded"]
  assert sums["flipped"] != sums["plain"] and sums["swapped"] != sums["plain"]
  # The checksum of a leaf, computed independently with NumPy (uint32 arithmetic wraps).
  words = np.asarray(x).view(np.uint32).reshape(-1).astype(np.uint64)
  weights = (np.arange(words.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
  expected = int(np.sum(words * weights % 2**32) % 2**32)
  assert sums["plain"][2] == expected  # leaves in key order: b, h, x


# ----------------------------------------------------------------------------------------------
# Exports and reruns.


def test_rerun_of_a_finished_run_changes_nothing(run_copy, capsys):
  before = snapshot(run_copy)
  final = train.train_and_evaluate(config(), run_copy)
  assert final["already_finished"] and final["step"] == 4
  assert "already finished" in capsys.readouterr().out
  assert snapshot(run_copy) == before


def test_rerun_repairs_a_damaged_export_from_the_checkpoint(run_copy, finished_run):
  with open(os.path.join(run_copy, "export", "model.json"), "w") as f:
    f.write("{garbled")
  train.train_and_evaluate(config(), run_copy)
  _, repaired, _ = checkpoint.load_export(run_copy)
  _, original, _ = checkpoint.load_export(finished_run)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(repaired), jax.device_get(original))


def test_export_refuses_non_finite_weights_and_keeps_the_old_export(run_copy):
  export = os.path.join(run_copy, "export")
  before = snapshot(export)
  _, variables, info = checkpoint.load_export(export)
  variables = jax.tree.map(np.array, jax.device_get(variables))  # writable copies
  variables["params"]["fc"]["kernel"][0, 0] = np.nan
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"fc.*kernel"):
    checkpoint.save_export(export, variables, info)
  assert snapshot(export) == before
  assert not glob.glob(export + ".*")  # no temporary directory left behind


def test_export_is_replaced_whole(run_copy):
  export = os.path.join(run_copy, "export")
  _, variables, info = checkpoint.load_export(export)
  variables = jax.tree.map(np.array, jax.device_get(variables))  # writable copies
  variables["params"]["fc"]["bias"] = variables["params"]["fc"]["bias"] + 1.0
  checkpoint.save_export(export, variables, {**info, "note": "second"})
  _, again, info_again = checkpoint.load_export(export)
  np.testing.assert_array_equal(jax.device_get(again)["params"]["fc"]["bias"],
                                variables["params"]["fc"]["bias"])
  assert info_again["note"] == "second"
  assert sorted(os.listdir(run_copy)) == sorted(["checkpoints", "config.json", "export",
                                                 "export_best", "export_ema", "metrics.jsonl",
                                                 "tensorboard"])


def test_eval_of_a_non_finite_export_fails_clearly(run_copy):
  export = os.path.join(run_copy, "export")
  _, variables, info = checkpoint.load_export(export)
  variables = jax.tree.map(np.array, jax.device_get(variables))  # writable copies
  variables["params"]["fc"]["bias"][0] = np.inf
  target = os.path.join(run_copy, "bad_export")
  shutil.copytree(export, target)
  shutil.rmtree(os.path.join(target, "variables"))
  with ocp.StandardCheckpointer() as writer:  # written behind save_export's back
    writer.save(os.path.join(target, "variables"), variables)
  with open(os.path.join(target, "model.json")) as f:
    assert json.load(f)["name"] == "resnet8"
  with pytest.raises(checkpoint.ExportError, match="NaN/inf weights.*fc"):
    train.evaluate_export(config(), target)
