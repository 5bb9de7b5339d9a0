"""Every config in configs/ loads, plain and with :runlocal, and builds its objective and optimizer."""
import glob
import os

import sys

import numpy as np
import optax
import pytest

from gpd_jax import config_base, data, models, optim
from gpd_jax.metric_writer import read_metrics
from gpd_jax.objective import dkd_warmup_steps, make_objective
from gpd_jax.train import load_config_file, train_and_evaluate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def test_there_are_configs():
  assert {"imagenet_gpd.py", "imagenet_dkd.py", "imagenet_gpd_scratch.py", "imagenet_gpd_finetune.py",
          "imagenet_mobilenet_gpd.py", "fashion_mnist_gpd.py", "cifar100_gpd.py"} <= set(CONFIGS)


@pytest.mark.parametrize("arg", ["", ":runlocal"])
@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds(name, arg):
  config = load_config_file(os.path.join(CONFIG_DIR, name) + arg)
  assert config.model.name in models.MODEL_NAMES
  assert not config.teacher.name or config.teacher.name in models.MODEL_NAMES
  info = data.get_dataset_info(config)
  assert info.num_classes >= 10
  steps = 100
  make_objective(config.loss, config.gpd if config.gpd.enabled else None, steps_per_epoch=steps)
  schedule = optim.make_schedule(config.schedule, steps_per_epoch=steps,
                                 total_steps=int(config.num_epochs * steps))
  tx = optim.make_optimizer(config.optim, schedule)
  assert isinstance(tx, optax.GradientTransformation)
  if config.loss.base != "ce":
    assert config.teacher.name, "a KD base loss needs a static teacher"
  if arg:
    assert config.dataset.num_train_examples and config.dataset.num_train_examples <= 2048
    if config.teacher.name:
      assert config.teacher.config.endswith("runlocal"), "runlocal trains its own tiny teacher"


def test_imagenet_gpd_is_the_paper_recipe():
  c = load_config_file(os.path.join(CONFIG_DIR, "imagenet_gpd.py"))
  assert (c.model.name, c.teacher.name, c.batch_size, c.num_epochs) == ("resnet18", "resnet34", 512, 100)
  assert (c.optim.name, c.optim.momentum, c.optim.weight_decay, c.optim.no_decay_regex) == (
      "sgd", 0.9, 1e-4, "")
  assert (c.optim.clip_norm, c.ema_decay) == (5.0, 0.99996)
  assert (c.gpd.enabled, c.gpd.ratio, c.gpd.branches, c.gpd.sce_weight, c.gpd.sce_smoothing) == (
      True, 2, True, 3.0, 0.1)
  assert (c.loss.base, c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature,
          c.loss.dkd.warmup_steps) == ("dkd", 1.0, 0.5, 1.0, 0)
  assert c.loss.dkd.warmup_epochs == 0.0  # GPD's DKD has no warm-up
  spe = 2502
  lr = optim.make_schedule(c.schedule, steps_per_epoch=spe, total_steps=100 * spe)
  np.testing.assert_allclose([lr(0), lr(30 * spe - 1), lr(30 * spe), lr(60 * spe), lr(90 * spe)],
                             [0.1, 0.1, 0.01, 0.001, 0.0001], rtol=1e-6)
  mobilenet = load_config_file(os.path.join(CONFIG_DIR, "imagenet_mobilenet_gpd.py"))
  assert (mobilenet.model.name, mobilenet.teacher.name, mobilenet.loss.dkd.beta) == (
      "mobilenet_v1", "resnet50", 2.0)


DKD_CONFIGS = [n for n in CONFIGS if load_config_file(os.path.join(CONFIG_DIR, n)).loss.base == "dkd"]


@pytest.mark.parametrize("name", DKD_CONFIGS)
def test_dkd_warmup_fits_the_run(name):
  """The DKD warm-up is a share of the run in epochs, also when :runlocal shortens the run."""
  full = load_config_file(os.path.join(CONFIG_DIR, name))
  local = load_config_file(os.path.join(CONFIG_DIR, name) + ":runlocal")
  share = full.loss.dkd.warmup_epochs / full.num_epochs
  if name.startswith("cifar100"):  # mdistiller: 20 of 240 epochs, 703 steps of 64 per epoch
    assert (full.loss.dkd.warmup_epochs, full.loss.dkd.warmup_steps) == (20.0, 0)
    assert dkd_warmup_steps(full.loss.dkd, 45_000 // 64) == 14_060
  steps_per_epoch = local.dataset.num_train_examples // local.batch_size
  total = int(local.num_epochs * steps_per_epoch)
  warmup = dkd_warmup_steps(local.loss.dkd, steps_per_epoch)
  assert warmup < total
  assert abs(warmup / total - share) <= 1.0 / total  # the same share, up to rounding to a step
  if share:
    assert warmup >= 1


def test_dkd_warmup_fields_are_checked():
  dkd = config_base.base_config().loss.dkd
  dkd.warmup_epochs = 0.5
  assert dkd_warmup_steps(dkd, 20) == 10
  with pytest.raises(ValueError, match="warmup_epochs.*steps per epoch"):
    dkd_warmup_steps(dkd)
  dkd.warmup_steps = 7
  with pytest.raises(ValueError, match="both"):
    dkd_warmup_steps(dkd, 20)
  dkd.warmup_epochs = 0.0
  assert dkd_warmup_steps(dkd) == 7  # an exact step count needs no steps per epoch
  dkd.warmup_epochs = -1.0
  with pytest.raises(ValueError, match="config.loss.dkd.warmup_epochs"):
    dkd_warmup_steps(dkd, 20)


def test_dkd_warmup_in_epochs_ramps_the_kd_weight_in_a_run(tmp_path):
  """warmup_epochs=1 with 4 steps per epoch: KD weighs step/4 (step = steps taken before this one)."""
  sys.path.insert(0, os.path.dirname(__file__))
  from test_train import make_teacher, tiny_config  # noqa: E402
  make_teacher(str(tmp_path))
  config = tiny_config(steps=3, base="dkd")  # 32 synthetic images, batch 8: 4 steps per epoch
  config.loss.dkd.warmup_epochs = 1.0
  train_and_evaluate(config, str(tmp_path))
  for record in read_metrics(str(tmp_path), "train"):
    factor = (record["step"] - 1) / 4
    no_kd = record["ce_S"] + record["ce_D"] + 3.0 * record["sce_S"]
    assert record["kd_S"] > 0 and record["kd_D"] > 0
    np.testing.assert_allclose(record["total"], no_kd + factor * (record["kd_S"] + record["kd_D"]),
                               rtol=1e-5)


def test_config_arguments_are_checked():
  cifar = os.path.join(CONFIG_DIR, "cifar100_dkd.py")
  assert load_config_file(cifar + ":resnet32x4,runlocal").model.name == "resnet32x4"
  with pytest.raises(ValueError, match="unknown.*runlocl"):
    load_config_file(cifar + ":runlocl")
  with pytest.raises(ValueError, match="several models"):
    load_config_file(cifar + ":resnet8,resnet20")
  with pytest.raises(ValueError, match="unknown.*resnet34"):  # the student of a distillation is fixed
    load_config_file(os.path.join(CONFIG_DIR, "imagenet_gpd.py") + ":resnet34")
  with pytest.raises(ValueError, match="unknown.*runlocl"):
    load_config_file(os.path.join(CONFIG_DIR, "fashion_mnist_gpd.py") + ":runlocl")


def _features(c):
  r = c.features.reviewkd
  return (c.features.method, c.features.weight, c.features.warmup_epochs, r.student_preact,
          r.mid_features, tuple(r.pool_sizes))


def test_reviewkd_configs_are_the_published_recipes():
  """Numbers from the recipes: mdistiller's ImageNet ReviewKD (batch 256, LR 0.1, weight 1, warm-up
  1 epoch, pre-ReLU student levels, ABF width 512), GPD's ReviewKD + GPD (GPD's ImageNet recipe with
  weight 1, no warm-up, ABF width 512 for ResNet-18 and 256 for MobileNet, CE as the logit loss), and
  mdistiller's CIFAR-100 ReviewKD (weight 5, warm-up 20 epochs, post-ReLU student levels)."""
  load = lambda name: load_config_file(os.path.join(CONFIG_DIR, name))
  c = load("imagenet_reviewkd.py")
  assert (c.model.name, c.teacher.name, c.batch_size, c.num_epochs, c.schedule.base_lr,
          tuple(c.schedule.boundaries), c.optim.weight_decay, c.optim.momentum) == (
      "resnet18", "resnet34", 256, 100, 0.1, (30, 60, 90), 1e-4, 0.9)
  assert (c.loss.base, c.gpd.enabled, c.loss.ce_weight) == ("ce", False, 1.0)
  assert _features(c) == ("reviewkd", 1.0, 1.0, True, 512, (4, 2, 1))
  for name, model, teacher, mid in (("imagenet_reviewkd_gpd.py", "resnet18", "resnet34", 512),
                                    ("imagenet_mobilenet_reviewkd_gpd.py", "mobilenet_v1", "resnet50", 256)):
    c = load(name)
    assert (c.model.name, c.teacher.name, c.batch_size, c.num_epochs, c.schedule.base_lr,
            tuple(c.schedule.boundaries), c.optim.weight_decay, c.optim.no_decay_regex) == (
        model, teacher, 512, 100, 0.1, (30, 60, 90), 1e-4, ""), name
    assert (c.optim.clip_norm, c.ema_decay) == (5.0, 0.99996), name
    assert (c.gpd.enabled, c.gpd.ratio, c.gpd.branches, c.gpd.sce_weight, c.gpd.sce_smoothing,
            c.gpd.train_dt_loss, c.gpd.dt_uses_static_kd, c.gpd.student_uses_static_kd) == (
        True, 2, True, 3.0, 0.1, True, True, True), name
    assert (c.loss.base, c.loss.ce_weight) == ("ce", 1.0), name
    assert _features(c) == ("reviewkd", 1.0, 0.0, True, mid, (4, 2, 1)), name
  for name, gpd in (("cifar100_reviewkd.py", False), ("cifar100_reviewkd_gpd.py", True)):
    c = load(name)
    assert (c.model.name, c.teacher.name, c.batch_size, c.num_epochs, c.schedule.base_lr,
            tuple(c.schedule.boundaries), c.optim.weight_decay) == (
        "resnet8x4", "resnet32x4", 64, 240, 0.05, (150, 180, 210), 5e-4), name
    assert (c.loss.base, c.loss.ce_weight) == ("ce", 1.0), name
    assert _features(c) == ("reviewkd", 5.0, 20.0, False, 0, (4, 2, 1)), name
    assert (c.gpd.enabled, c.optim.clip_norm) == ((True, 5.0) if gpd else (False, 0.0)), name
    if gpd:
      assert (c.gpd.ratio, c.gpd.branches, c.gpd.sce_weight) == (2, True, 3.0)
  # :runlocal keeps the warm-up's share of the run (20 of 240 epochs).
  local = load_config_file(os.path.join(CONFIG_DIR, "cifar100_reviewkd.py") + ":runlocal")
  assert local.features.warmup_epochs == pytest.approx(20.0 * local.num_epochs / 240.0)


def test_reviewkd_connector_widths_follow_the_models():
  """mdistiller's default ABF width min(512, deepest student width) = 256 for resnet8x4, and the
  ABFs' out-widths are the teacher's levels; with GPD the DT's stack takes ×2 in-widths."""
  from gpd_jax.state import build_task  # pylint: disable=import-outside-toplevel
  c = load_config_file(os.path.join(CONFIG_DIR, "cifar100_reviewkd_gpd.py"))
  teacher = models.create("resnet32x4", 100)
  task = build_task(c, num_classes=100, sample_shape=(1, 32, 32, 3), teacher=teacher,
                    steps_per_epoch=700)
  objective = task.feature_objective
  assert objective.targets == ("student", "dt")
  for target in ("student", "dt"):
    fusion = objective.connectors[target]
    assert fusion.mid_features == 256
    assert tuple(fusion.out_features) == (64, 128, 256, 256)
  widths = lambda t: [x.shape[-1] for x in objective.connector_inputs[t][0]]
  assert widths("student") == [64, 128, 256, 256]
  assert widths("dt") == [128, 256, 512, 512]
  assert objective.warmup_steps == 20 * 700


def test_fashion_feature_configs():
  path = os.path.join(CONFIG_DIR, "fashion_mnist_features.py")
  expected = {"reviewkd": ("reviewkd", 1.0, False), "reviewkd_gpd": ("reviewkd", 1.0, True),
              "sp": ("sp", 3000.0, False), "fitnet": ("fitnet", 100.0, False),
              "crd": ("crd", 0.8, False)}
  for arg, (method, weight, gpd) in expected.items():
    c = load_config_file(f"{path}:{arg}")
    assert (c.features.method, c.features.weight, c.gpd.enabled, c.loss.base) == (
        method, weight, gpd, "ce"), arg
    assert (c.model.name, c.teacher.name) == ("resnet8", "resnet20")
  assert load_config_file(f"{path}:sp,gpd").gpd.enabled
  with pytest.raises(ValueError, match="name one method"):
    load_config_file(f"{path}:sp,crd")
