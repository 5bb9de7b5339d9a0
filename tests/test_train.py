"""End-to-end training: train + eval + checkpoint + resume on synthetic data, 1 and 4 fake devices.

Tiny CIFAR ResNets (widths 4-16) on 16×16 synthetic images keep every run to a few seconds.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpd_jax import checkpoint, config_base, models, train
from gpd_jax.metric_writer import read_metrics

TINY = {"widths": (4, 4, 8, 8)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(*, gpd=True, branches=False, teacher=True, steps=2, devices=1, base="dkd"):
  c = config_base.base_config()
  c.seed = 3
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = steps
  c.num_epochs = 1.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_epochs = 1.0
  c.model.name = "resnet8"
  c.model.kwargs = dict(TINY)
  c.dataset.name = "synthetic"
  c.dataset.image_shape = (18, 18, 3)
  c.dataset.image_size = 16
  c.dataset.num_classes = 5
  c.dataset.synthetic_sizes = {"train": 32, "validation": 12}
  c.dataset.eval_splits = {"val": "validation"}
  c.dataset.augment = "cifar"
  c.dataset.num_threads = 0
  c.mesh.shape = (devices,)
  c.schedule.name = "constant"
  c.schedule.base_lr = 0.05
  c.optim.clip_norm = 5.0
  c.ema_decay = 0.9
  c.loss.base = base if teacher else "ce"
  if teacher:
    c.teacher.name = "resnet8"
    c.teacher.model = {"dtype": "float32"}
    c.teacher.workdir = "teacher"
  if gpd:
    config_base.gpd_on(c, ratio=2, branches=branches)
  return c


def make_teacher(workdir, num_classes=5, seed=1):
  """A random plain resnet8 exported where tiny_config expects its teacher."""
  model = models.create("resnet8", num_classes, **TINY)
  variables = model.init(jax.random.key(seed), np.zeros((1, 16, 16, 3), np.float32), train=False)
  checkpoint.save_export(os.path.join(workdir, "teacher", "export"), jax.device_get(variables),
                         {"name": "resnet8", "num_classes": num_classes, "kwargs": {"widths": [4, 4, 8, 8]},
                          "input_shape": [1, 16, 16, 3]})


def train_losses(workdir):
  return {r["step"]: r["total"] for r in read_metrics(workdir, "train")}


@pytest.mark.parametrize("devices", [1, 4])
def test_gpd_train_eval_checkpoint_resume(tmp_path, devices):
  workdir = str(tmp_path)
  make_teacher(workdir)
  final = train.train_and_evaluate(tiny_config(devices=devices, branches=devices == 1), workdir)
  assert final["step"] == 2
  val = final["eval"]["val"]
  for key in ("top1_S", "top1_D", "top1_T", "top5_S", "agree_S_D", "agree_S_T", "top1_S_ema"):
    assert 0.0 <= val[key] <= 100.0, key
  records = read_metrics(workdir, "train")
  assert [r["step"] for r in records] == [1, 2]
  for term in ("ce_S", "kd_S", "sce_S", "ce_D", "kd_D", "total", "lr", "grad_norm", "images_per_sec"):
    assert np.isfinite(records[-1][term]), term
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 2
  # The exported plain student is the student view's function (CBR).
  module, variables, info = checkpoint.load_export(workdir)
  assert info["name"] == "resnet8" and type(module) is models.CifarResNet and not module.branches
  # launch/eval.py's functions: the checkpoint gives the final metrics again, and the exported plain
  # student scores what its training-time view scored.
  again = train.evaluate_checkpoint(tiny_config(devices=devices, branches=devices == 1), workdir)
  np.testing.assert_allclose(again["val"]["top1_S"], val["top1_S"])
  exported = train.evaluate_export(tiny_config(devices=devices), workdir)
  np.testing.assert_allclose(exported["val"]["top1"], val["top1_S"])
  np.testing.assert_allclose(exported["val"]["ce"], val["ce_S"], rtol=1e-5)
  # Running again with more steps resumes at step 2 instead of restarting.
  config = tiny_config(devices=devices, branches=devices == 1, steps=4)
  train.train_and_evaluate(config, workdir)
  assert sorted(train_losses(workdir)) == [1, 2, 3, 4]


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  for w in (straight, resumed):
    make_teacher(w)
  train.train_and_evaluate(tiny_config(steps=6), straight)
  train.train_and_evaluate(tiny_config(steps=2), resumed)  # "interrupted" after step 2
  train.train_and_evaluate(tiny_config(steps=6), resumed)
  a, b = train_losses(straight), train_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
  # 6 steps of batch 8 over 32 examples cross an epoch boundary: the data position was restored.


def test_one_and_eight_devices_give_the_same_loss(tmp_path):
  losses = {}
  for devices in (1, 8):
    w = str(tmp_path / f"d{devices}")
    make_teacher(w)
    train.train_and_evaluate(tiny_config(devices=devices, steps=2), w)
    losses[devices] = train_losses(w)
  np.testing.assert_allclose([losses[8][s] for s in (1, 2)], [losses[1][s] for s in (1, 2)],
                             rtol=2e-5)


@pytest.mark.parametrize("scenario", ["ce", "kd", "dist", "gpd_scratch", "gpd_finetune", "gpd_bf16"])
def test_scenarios_run(tmp_path, scenario):
  workdir = str(tmp_path)
  make_teacher(workdir)
  if scenario in ("ce", "kd", "dist"):
    config = tiny_config(gpd=False, teacher=scenario != "ce", base=scenario)
  else:
    config = tiny_config(gpd=True, teacher=False)
  if scenario == "gpd_bf16":  # mixed precision: bfloat16 compute, float32 params and logits
    config.model.dtype = "bfloat16"
  if scenario == "gpd_finetune":
    student_dir = str(tmp_path / "student")
    train.train_and_evaluate(tiny_config(gpd=False, teacher=False, steps=1), student_dir)
    config.init.student = student_dir
    config.gpd.pretrained_branches = True
  final = train.train_and_evaluate(config, workdir)
  assert np.isfinite(read_metrics(workdir, "train")[-1]["total"])
  assert ("top1_D" in final["eval"]["val"]) == scenario.startswith("gpd")
  if scenario == "gpd_bf16":
    _, variables, _ = checkpoint.load_export(workdir)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype("float32")}


def test_teacher_is_trained_first_when_configured(tmp_path):
  config = tiny_config(gpd=True, steps=1)
  teacher_config = tmp_path / "teacher_config.py"
  teacher_config.write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom test_train import tiny_config\n"
      "def get_config(arg=None):\n  return tiny_config(gpd=False, teacher=False, steps=1)\n"
      % os.path.dirname(__file__))
  config.teacher.config = str(teacher_config)
  train.train_and_evaluate(config, str(tmp_path))
  assert os.path.isfile(tmp_path / "teacher" / "export" / "model.json")


# ----------------------------------------------------------------------------------------------
# Errors: each names the field and keeps what is saved.


def test_batch_not_divisible_by_devices(tmp_path):
  config = tiny_config(devices=4, teacher=False)
  config.batch_size = 6
  with pytest.raises(ValueError, match="config.batch_size"):
    train.train_and_evaluate(config, str(tmp_path))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(teacher=False, steps=2), workdir)
  config = tiny_config(teacher=False, steps=6)
  config.schedule.base_lr = 1e38  # the first step after the resume overflows the params
  with pytest.raises(train.NonFiniteLossError, match=r"step [3-6]"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 2


def test_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(teacher=False, steps=2), workdir)
  config = tiny_config(teacher=False, steps=4)
  config.gpd.ratio = 3
  with pytest.raises(checkpoint.CheckpointMismatchError, match="ratio"):
    train.train_and_evaluate(config, workdir)
  config = tiny_config(teacher=False, steps=4)
  config.optim.clip_norm = 0.0  # another optimizer-state structure
  with pytest.raises(checkpoint.CheckpointMismatchError, match="config.optim"):
    train.train_and_evaluate(config, workdir)


def test_teacher_with_other_classes_is_refused(tmp_path):
  make_teacher(str(tmp_path), num_classes=7)
  with pytest.raises(ValueError, match="config.teacher.*7 classes"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


@pytest.mark.parametrize("field, value, match", [
    ("model.name", "resnet9", "unknown model name 'resnet9'"),
    ("loss.base", "fitnet", "loss.base"),
    ("gpd.ratio", 1, "config.gpd.ratio"),
])
def test_bad_config_fields(tmp_path, field, value, match):
  config = tiny_config(teacher=False)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))


def test_launcher_without_imagenet_exits_with_instructions(tmp_path):
  env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}  # this checkout's gpd_jax
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"),
       "--config=" + os.path.join(ROOT, "configs", "imagenet_gpd.py"), f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode != 0
  assert "imagenet2012" in result.stderr and "manual" in result.stderr.lower(), result.stderr[-2000:]
