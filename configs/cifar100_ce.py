"""Plain CE training on CIFAR-100 (the baseline; also how the teachers are trained).

The argument picks the model (default resnet8x4), e.g. ``:resnet32x4`` for the teacher.
Expected: resnet32x4 79.42 %, resnet8x4 72.50 % (kd_losses.md §4.1).

    python launch/train.py --config=configs/cifar100_ce.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
from gpd_jax import config_base
from gpd_jax.models import MODEL_NAMES


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  names = [f for f in flags if f in MODEL_NAMES]
  c = config_base.cifar100_recipe(config_base.base_config(), model=names[0] if names else "resnet8x4")
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
  return c
