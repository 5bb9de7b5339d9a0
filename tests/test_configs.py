"""Every config in configs/ loads, plain and with :runlocal, and builds its objective and optimizer."""
import glob
import os

import numpy as np
import optax
import pytest

from gpd_jax import data, models, optim
from gpd_jax.objective import make_objective
from gpd_jax.train import load_config_file

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
  make_objective(config.loss, config.gpd if config.gpd.enabled else None)
  steps = 100
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
  spe = 2502
  lr = optim.make_schedule(c.schedule, steps_per_epoch=spe, total_steps=100 * spe)
  np.testing.assert_allclose([lr(0), lr(30 * spe - 1), lr(30 * spe), lr(60 * spe), lr(90 * spe)],
                             [0.1, 0.1, 0.01, 0.001, 0.0001], rtol=1e-6)
  mobilenet = load_config_file(os.path.join(CONFIG_DIR, "imagenet_mobilenet_gpd.py"))
  assert (mobilenet.model.name, mobilenet.teacher.name, mobilenet.loss.dkd.beta) == (
      "mobilenet_v1", "resnet50", 2.0)
