"""Multi-phase runs (gpd_jax/phases.py): labels, frozen leaves, phase entry, kill-and-resume at and
inside a phase, the stage MSE loss, and the reduced-data subset.

Tiny CIFAR ResNets on 16×16 synthetic images (tests/test_train.py's tiny_config).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import checkpoint, config_base, data, phases, train
from gpd_jax.data import pipeline
from gpd_jax.metric_writer import read_metrics
from gpd_jax.state import build_task, init_state
from gpd_jax.step import make_train_step
from gpd_jax.transforms.spec import leaf_key
from test_train import make_teacher, tiny_config

SAMPLE = (1, 16, 16, 3)


def stagewise_phases(epochs=0.5, *, first_start="best"):
  """Stagewise KD on resnet8: stem, stage1..3 (stage MSE), then the head (CE)."""
  stages = ("stem", "stage1", "stage2", "stage3")
  return tuple(config_base.phase(s, epochs, (s,), (f"stage_mse({s})",), start=first_start)
               for s in stages) + (config_base.phase("head", epochs, ("head",), ("ce",)),)


def paths(tree):
  return [leaf_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# ----------------------------------------------------------------------------------------------
# Labels.


RESNET8_PARAMS = {
    "stem": ["bn1/bias", "bn1/scale", "conv1/kernel"],
    "stage1": ["layer1_0/bn1/bias", "layer1_0/bn1/scale", "layer1_0/bn2/bias", "layer1_0/bn2/scale",
               "layer1_0/conv1/kernel", "layer1_0/conv2/kernel"],
    "stage2": ["layer2_0/bn1/bias", "layer2_0/bn1/scale", "layer2_0/bn2/bias", "layer2_0/bn2/scale",
               "layer2_0/conv1/kernel", "layer2_0/conv2/kernel", "layer2_0/downsample_bn/bias",
               "layer2_0/downsample_bn/scale", "layer2_0/downsample_conv/kernel"],
    "stage3": ["layer3_0/bn1/bias", "layer3_0/bn1/scale", "layer3_0/bn2/bias", "layer3_0/bn2/scale",
               "layer3_0/conv1/kernel", "layer3_0/conv2/kernel", "layer3_0/downsample_bn/bias",
               "layer3_0/downsample_bn/scale", "layer3_0/downsample_conv/kernel"],
    "head": ["fc/bias", "fc/kernel"],
}


def test_labels_of_every_stagewise_phase_on_resnet8():
  c = tiny_config(gpd=False)
  c.num_train_steps = 0
  c.phases = stagewise_phases()
  plan = phases.make_plan(c, steps_per_epoch=4)
  task = build_task(c, num_classes=5, sample_shape=SAMPLE)
  params = jax.eval_shape(lambda: task.student.init(jax.random.key(0), jnp.zeros(SAMPLE),
                                                    train=False))["params"]
  assert sorted(paths(params)) == sorted(sum(RESNET8_PARAMS.values(), []))
  for phase, stage in zip(plan, ("stem", "stage1", "stage2", "stage3", "head")):
    labels = dict(zip(paths(params), jax.tree.leaves(phases.labels(phase, params))))
    trained = sorted(p for p, label in labels.items() if label == "train")
    assert trained == RESNET8_PARAMS[stage], phase.name
    assert all(label in ("train", "frozen") for label in labels.values())
  # The step ranges: 0.5 epoch of 4 steps each, back to back.
  assert [(p.start_step, p.end_step) for p in plan] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_gpd_labels_apply_to_the_dt_tree_with_branches():
  c = tiny_config(gpd=True, branches=True, teacher=False)
  c.num_train_steps = 0
  c.loss.base = "ce"
  c.phases = (config_base.phase("s2", 1, ("stage2",), ("base",)),)
  plan = phases.make_plan(c, steps_per_epoch=4)
  task = build_task(c, num_classes=5, sample_shape=SAMPLE)
  state = jax.eval_shape(lambda: init_state(task, c, phases.make_optimizer(plan[0], 4),
                                            jax.random.key(0)))
  labels = dict(zip(paths(state.params), jax.tree.leaves(phases.labels(plan[0], state.params))))
  trained = [p for p, label in labels.items() if label == "train"]
  # Every DT leaf of layer2 (OREPA branches included) trains, nothing else does.
  assert trained and all(p.startswith("layer2_0/") for p in trained)
  assert all(labels[p] == "frozen" for p in labels if not p.startswith("layer2_0/"))


# ----------------------------------------------------------------------------------------------
# Frozen leaves stay bitwise unchanged.


def _phase_state_and_step(c, index, teacher=None):
  plan = phases.make_plan(c, steps_per_epoch=4)
  task = build_task(c, num_classes=5, sample_shape=SAMPLE, teacher=teacher)
  phase, tx = plan[index], phases.make_optimizer(plan[index], 4)
  state = init_state(task, c, tx, jax.random.key(0))
  state = state.replace(phase=phases.initial_phase_state(state, index, phase.start_step))
  step = jax.jit(make_train_step(phases.phase_task(task, phase, c), tx,
                                 phases.make_schedule(phase, 4), c.ema_decay, phase=phase))
  return phase, state, step


def _batches(n, batch=8):
  rng = np.random.default_rng(0)
  return [{"image": jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, size=batch), jnp.int32)} for _ in range(n)]


def _teacher_variables():
  from gpd_jax import models  # pylint: disable=import-outside-toplevel
  module = models.create("resnet8", 5, widths=(4, 4, 8, 8))
  return module, module.init(jax.random.key(1), jnp.zeros(SAMPLE), train=False)


@pytest.mark.parametrize("stage,term,gpd", [("stage2", "ce", False), ("head", "ce", False),
                                            ("stage2", "stage_mse(stage2)", False),
                                            ("stage2", "base", True)])
def test_frozen_params_and_statistics_stay_bitwise_unchanged(stage, term, gpd):
  # SGD with momentum and weight decay 5e-4, gradient clipping, EMA: none of it may touch a frozen leaf.
  # With GPD the labels apply to the DT's tree (OREPA branches included) and to both BN statistics.
  c = tiny_config(gpd=gpd, branches=gpd, teacher=term.startswith("stage_mse"))
  c.num_train_steps = 0
  c.phases = (config_base.phase(stage, 1, (stage,), (term,)),)
  teacher, teacher_variables = _teacher_variables() if c.teacher.name else (None, None)
  phase, state, step = _phase_state_and_step(c, 0, teacher)
  collections = ("params", "batch_stats") + (("student_batch_stats",) if gpd else ())
  before = jax.device_get([getattr(state, name) for name in collections])
  for batch in _batches(3):
    state, metrics = step(state, batch, teacher_variables)
  if term.startswith("stage_mse"):
    assert float(metrics["mse_stage2"]) > 0 and "ce_S" not in metrics
  if gpd:
    assert "sce_S" in metrics and "ce_D" in metrics  # the GPD objective
  assert np.isfinite(float(metrics["total"]))
  after = jax.device_get([getattr(state, name) for name in collections])
  for name, tree_before, tree_after in zip(collections, before, after):
    flat_before = dict(zip(paths(tree_before), jax.tree.leaves(tree_before)))
    flat_after = dict(zip(paths(tree_after), jax.tree.leaves(tree_after)))
    trained = [p for p in flat_before if phase.is_trained(p)]
    frozen = [p for p in flat_before if not phase.is_trained(p)]
    assert frozen and (trained or (name, stage) == ("batch_stats", "head")), name  # fc has no BN
    for p in frozen:
      np.testing.assert_array_equal(flat_after[p], flat_before[p], err_msg=f"{name} {p} moved")
    for p in trained:
      assert not np.array_equal(flat_after[p], flat_before[p]), f"{name} {p} did not train"


# ----------------------------------------------------------------------------------------------
# Entering a phase.


def test_enter_starts_from_the_best_or_the_last_weights_with_a_fresh_optimizer():
  c = tiny_config(gpd=False, teacher=False)
  c.num_train_steps = 0
  c.phases = (config_base.phase("a", 1, ("stage1",), ("ce",)),
              config_base.phase("b", 1, ("head",), ("ce",), start="best"),
              config_base.phase("c", 1, ("head",), ("ce",), start="last"))
  plan = phases.make_plan(c, steps_per_epoch=4)
  _, state, step = _phase_state_and_step(c, 0)
  state, _ = step(state, _batches(1)[0], None)
  best = jax.device_get(state.params)
  state = phases.remember_best(state, 0.5)
  for batch in _batches(2):
    state, _ = step(state, batch, None)
  last = jax.device_get(state.params)
  tx_b = phases.make_optimizer(plan[1], 4)
  entered = phases.enter(state, plan[1], tx_b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(entered.params), best)
  assert int(entered.phase["index"]) == 1 and int(entered.phase["start"]) == 4
  assert float(entered.phase["best_loss"]) == phases.NO_LOSS
  # A fresh optimizer state: the same as tx.init of the entered params.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(entered.opt_state),
               jax.device_get(tx_b.init(entered.params)))
  # 'last', and 'best' without any evaluation in the phase, keep the last weights.
  entered_last = phases.enter(state, plan[2], phases.make_optimizer(plan[2], 4))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(entered_last.params), last)
  unevaluated = state.replace(phase=phases.initial_phase_state(state, 0, 0))
  entered_unevaluated = phases.enter(unevaluated, plan[1], tx_b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(entered_unevaluated.params), last)


# ----------------------------------------------------------------------------------------------
# The stage MSE loss.


def test_stage_mse_against_numpy():
  rng = np.random.default_rng(3)
  student = rng.normal(size=(4, 5, 5, 6)).astype(np.float32)
  teacher = rng.normal(size=(4, 5, 5, 6)).astype(np.float32)
  expected = np.array([np.sum((student[b] - teacher[b]) ** 2) / (5 * 5 * 6) for b in range(4)])
  got = phases.stage_mse_per_example(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  # The teacher is a constant: the gradient reaches the student only, 2(s - t)/(B·M) for the mean.
  grad_s, grad_t = jax.grad(lambda s, t: jnp.mean(phases.stage_mse_per_example(s, t)),
                            argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(np.asarray(grad_s), 2 * (student - teacher) / student.size, rtol=1e-5)
  assert not np.any(np.asarray(grad_t))
  with pytest.raises(ValueError, match="stage widths"):
    phases.stage_mse_per_example(jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 4, 4, 16)))


# ----------------------------------------------------------------------------------------------
# Kill and resume.


class Killed(Exception):
  pass


def _kill_after(monkeypatch, kill_step):
  original = checkpoint.Checkpointer.save

  def save(self, step, state, data_state, info):
    original(self, step, state, data_state, info)
    if step == kill_step:
      self.wait()
      raise Killed(step)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)


def _phased_config():
  c = tiny_config(gpd=False, teacher=True)
  c.loss.base = "ce"
  c.num_train_steps = 0
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 2
  c.phases = (config_base.phase("stem+stage1", 0.5, ("stem", "stage1"), ("stage_mse(stage1)",)),
              config_base.phase("stage2+3", 0.75, ("stage2", "stage3"),
                                ("stage_mse(stage2)", "stage_mse(stage3)"), start="best"),
              config_base.phase("head", 0.5, ("head",), ("ce",), start="best",
                                optim={"name": "adamw", "weight_decay": 0.0},
                                schedule={"name": "constant", "base_lr": 1e-3}))
  return c


def _final(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step, info = ckpt.latest_info()
  ckpt.close()
  _, variables, _ = checkpoint.load_export(workdir)
  return step, info, jax.device_get(variables)


@pytest.mark.parametrize("kill_step", [2, 4])  # 2: the end of phase 0; 4: inside phase 1 (steps 2-5)
def test_kill_at_and_inside_a_phase_resumes_to_the_same_final_state(tmp_path, monkeypatch, kill_step):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  for w in (straight, killed):
    make_teacher(w)
  train.train_and_evaluate(_phased_config(), straight)
  with monkeypatch.context() as m:
    _kill_after(m, kill_step)
    with pytest.raises(Killed):
      train.train_and_evaluate(_phased_config(), killed)
  ckpt = checkpoint.Checkpointer(os.path.join(killed, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == kill_step and ckpt.latest_info()[1]["phase"] == (0 if kill_step == 2 else 1)
  ckpt.close()
  train.train_and_evaluate(_phased_config(), killed)
  step_a, info_a, export_a = _final(straight)
  step_b, info_b, export_b = _final(killed)
  assert step_a == step_b == 7 and info_a["phase"] == info_b["phase"] == 2
  assert info_a["fingerprint"] == info_b["fingerprint"]  # every leaf of the state, bit for bit
  jax.tree.map(np.testing.assert_array_equal, export_b, export_a)
  losses_a = {r["step"]: r["total"] for r in read_metrics(straight, "train")}
  losses_b = {r["step"]: r["total"] for r in read_metrics(killed, "train")}
  assert [losses_b[s] for s in range(1, 8)] == [losses_a[s] for s in range(1, 8)]
  records = read_metrics(straight, "train")
  assert [r["phase"] for r in records] == [0, 0, 1, 1, 1, 2, 2]
  # Each phase logs its own terms: the stage MSEs, then the head's CE without the teacher.
  assert "mse_stage1" in records[0] and "ce_S" not in records[0]
  assert "mse_stage2" in records[2] and "mse_stage3" in records[2]
  assert "ce_S" in records[-1] and not any(k.startswith("mse_") for k in records[-1])
  # The phase's best is chosen by validation loss at each evaluation and at the phase's end.
  assert [(r["step"], r["index"]) for r in read_metrics(straight, "phase")] == [(2, 0), (4, 1), (5, 1)]


# ----------------------------------------------------------------------------------------------
# Reduced data.


def test_reduced_data_subset_is_seeded_deterministic_and_recorded(tmp_path):
  a = pipeline.subset_indices(1000, 0.2, seed=7)
  assert len(a) == 200 and len(set(a.tolist())) == 200 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, pipeline.subset_indices(1000, 0.2, seed=7))
  assert not np.array_equal(a, pipeline.subset_indices(1000, 0.2, seed=8))
  np.testing.assert_array_equal(pipeline.subset_indices(10, 1.0, seed=7), np.arange(10))
  c = tiny_config(gpd=False, teacher=False, steps=2)
  c.dataset.train_fraction = 0.5
  c.dataset.subset_seed = 11
  indices = data.train_subset_indices(c)
  np.testing.assert_array_equal(indices, pipeline.subset_indices(32, 0.5, seed=11))
  assert data.num_examples(c) == 16 and data.steps_per_epoch(c) == 2
  full = pipeline.open_source(c, None)
  subset = pipeline.open_train_source(c)
  for i, j in enumerate(indices):
    np.testing.assert_array_equal(subset[i]["image"], full[int(j)]["image"])
  workdir = str(tmp_path)
  train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, train.SUBSET_FILE)) as f:
    record = json.load(f)
  assert record["indices"] == indices.tolist() and record["count"] == 16
  assert record["train_fraction"] == 0.5 and record["subset_seed"] == 11
  # The subset is part of the resume identity: another seed is another run.
  c.dataset.subset_seed = 12
  c.num_train_steps = 4
  with pytest.raises(checkpoint.CheckpointMismatchError, match="subset_seed"):
    train.train_and_evaluate(c, workdir)


def test_a_teacher_with_other_stage_widths_is_refused_with_the_field(tmp_path):
  workdir = str(tmp_path)
  make_teacher(workdir)  # resnet8 with widths (4, 4, 8, 8)
  c = tiny_config(gpd=False)
  c.loss.base = "ce"
  c.num_train_steps = 0
  c.model.kwargs = {"widths": (4, 4, 16, 8)}  # stage 2 twice as wide as the teacher's
  c.phases = (config_base.phase("s1", 0.5, ("stage1",), ("stage_mse(stage1)",)),
              config_base.phase("s2", 0.5, ("stage2",), ("stage_mse(stage2)",)))
  with pytest.raises(phases.PhaseConfigError, match=r"config\.phases\[1\]\.terms: 'stage_mse\(stage2\)' "
                     r"compares the student's tap of shape \(8, 8, 16\) with the teacher's \(8, 8, 8\)"):
    train.train_and_evaluate(c, workdir)


# ----------------------------------------------------------------------------------------------
# The configs.


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _phase_fields(c):
  return [(p["name"], p["epochs"], tuple(p["train"]), tuple(p["terms"]), p["start"]) for p in c.phases]


def test_imagenet_stagewise_kd_is_the_published_recipe():
  c = train.load_config_file(os.path.join(CONFIG_DIR, "imagenet_stagewise_kd.py"))
  assert (c.model.name, c.teacher.name, c.teacher.workdir) == ("resnet18", "resnet34", "teacher")
  assert (c.dataset.name, c.dataset.image_size, c.dataset.augment, c.batch_size) == (
      "imagenet2012", 224, "imagenet", 64)
  assert (c.gpd.enabled, c.ema_decay, c.loss.base, c.dataset.train_fraction) == (False, 0.0, "ce", 1.0)
  # torch.optim.Adam(lr=1e-4): no decay, PyTorch's betas and eps, constant LR, no clipping.
  assert (c.optim.name, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.clip_norm) == (
      "adamw", 0.9, 0.999, 1e-8, 0.0, 0.0)
  assert (c.schedule.name, c.schedule.base_lr, c.schedule.warmup_epochs) == ("constant", 1e-4, 0.0)
  assert _phase_fields(c) == [
      ("stem", 100.0, ("stem",), ("stage_mse(stem)",), "best"),
      ("stage1", 100.0, ("stage1",), ("stage_mse(stage1)",), "best"),
      ("stage2", 100.0, ("stage2",), ("stage_mse(stage2)",), "best"),
      ("stage3", 100.0, ("stage3",), ("stage_mse(stage3)",), "best"),
      ("stage4", 100.0, ("stage4",), ("stage_mse(stage4)",), "best"),
      ("head", 100.0, ("head",), ("ce",), "best")]
  assert all(not p["optim"] and not p["schedule"] for p in c.phases)  # every phase: the same Adam
  plan = phases.make_plan(c, steps_per_epoch=20018)  # 1,281,167 // 64
  assert [p.num_steps for p in plan] == [2001800] * 6 and plan[-1].end_step == 6 * 2001800
  # The head phase reads no teacher; the stage phases read its features.
  assert [p.needs_features for p in plan] == [True] * 5 + [False]
  from gpd_jax import models  # pylint: disable=import-outside-toplevel
  params = jax.eval_shape(lambda: models.create("resnet18", 1000).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
  for phase, expected in zip(plan, ("conv1/", "layer1_", "layer2_", "layer3_", "layer4_", "fc/")):
    trained = [p for p in paths(params) if phase.is_trained(p)]
    assert trained and all(p.startswith(expected) or (expected == "conv1/" and p.startswith("bn1/"))
                           for p in trained), phase.name
  assert train.load_config_file(os.path.join(CONFIG_DIR, "imagenet_stagewise_kd.py:data20")
                                ).dataset.train_fraction == 0.2


@pytest.mark.parametrize("arg", ["stagewise", "stagewise,data20", "sskd"])
def test_fashion_mnist_stagewise_configs(arg):
  c = train.load_config_file(os.path.join(CONFIG_DIR, f"fashion_mnist_stagewise.py:{arg}"))
  assert (c.model.name, c.teacher.name, c.loss.base, c.gpd.enabled) == ("resnet8", "resnet20", "ce", False)
  assert sum(p["epochs"] for p in c.phases) == pytest.approx(3.0)  # the protocol's student budget
  assert c.dataset.train_fraction == (0.2 if "data20" in arg else 1.0)
  if arg.startswith("stagewise"):
    assert _phase_fields(c) == [(s, 0.5, (s,), (f"stage_mse({s})",), "best")
                                for s in ("stem", "stage1", "stage2", "stage3")] + [
                                    ("head", 1.0, ("head",), ("ce",), "best")]
    assert all(p["optim"] == {"name": "adamw", "weight_decay": 0.0, "clip_norm": 0.0} and
               p["schedule"]["base_lr"] == 1e-3 for p in c.phases)
  else:
    assert [(f[0], f[2], f[3], f[4]) for f in _phase_fields(c)] == [
        ("stem+stage1", ("stem", "stage1"), ("stage_mse(stage1)",), "last"),
        ("stage2", ("stage2",), ("stage_mse(stage2)",), "last"),
        ("stage3", ("stage3",), ("stage_mse(stage3)",), "last"),
        ("head", ("head",), ("ce",), "last")]
    assert all(not p["optim"] for p in c.phases) and c.optim.name == "sgd"
  # The student's stage widths are the teacher's: every tap lines up.
  plan = phases.make_plan(c, steps_per_epoch=78)
  from gpd_jax import models  # pylint: disable=import-outside-toplevel
  phases.check_taps(plan, models.create("resnet8", 10), models.create("resnet20", 10), (1, 28, 28, 1))
