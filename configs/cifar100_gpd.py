"""DKD + GPD on CIFAR-100, resnet32x4 → resnet8x4: mdistiller's DKD recipe plus GPD's settings
(r 2, six OREPA branches, 3 × SCE, clip 5; gpd_method.md Q12). Not reported by the authors: the
project's own setting.

    python launch/train.py --config=configs/cifar100_ce.py:resnet32x4 --workdir=W/teacher
    python launch/train.py --config=configs/cifar100_gpd.py --workdir=W

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
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 8.0, 4.0
  c.loss.dkd.warmup_steps = 20 * (45_000 // c.batch_size)
  config_base.gpd_on(c, ratio=2, branches=True)
  c.optim.clip_norm = 5.0
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
    c.teacher.config = os.path.join(HERE, "cifar100_ce.py:resnet32x4,runlocal")
  return c
