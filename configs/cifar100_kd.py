"""KD on CIFAR-100, resnet32x4 → resnet8x4 (mdistiller: τ 4, CE 0.1, KD 0.9).
Expected: 73.33 % (kd_losses.md §4.1).

    python launch/train.py --config=configs/cifar100_ce.py:resnet32x4 --workdir=W/teacher
    python launch/train.py --config=configs/cifar100_kd.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
import os

from gpd_jax import config_base
from gpd_jax.models import MODEL_NAMES

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  names = [f for f in flags if f in MODEL_NAMES]
  c = config_base.cifar100_recipe(config_base.base_config(), model=names[0] if names else "resnet8x4")
  config_base.static_teacher(c, "resnet32x4")
  c.loss.base = "kd"
  c.loss.ce_weight, c.loss.kd_weight = 0.1, 0.9
  c.loss.kd.temperature = 4.0
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
    c.teacher.config = os.path.join(HERE, "cifar100_ce.py:resnet32x4,runlocal")
  return c
