"""GPD from scratch on ImageNet, ResNet-18, no static teacher (scenario b, "GPD*").

    python launch/train.py --config=configs/imagenet_gpd_scratch.py --workdir=W

DT loss CE, student loss CE + 3 × SCE(DT); the rest of the recipe as imagenet_gpd.py.
Expected (paper): 71.58 % vs 69.76 % for plain training (+1.8).
"""
from gpd_jax import config_base


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.imagenet_recipe(config_base.base_config(), model="resnet18")
  config_base.imagenet_gpd(c)
  c.loss.base = "ce"
  if "runlocal" in flags:
    config_base.imagenet_runlocal(c)
  return c
