"""Static teacher for the offline default: ResNet-20 trained with CE on Fashion-MNIST.

    python launch/train.py --config=configs/fashion_mnist_teacher.py --workdir=runs/fm_teacher

Trains 5 epochs on 55k images (val = the last 5k of train; test evaluated once at the end) and
exports the plain model to <workdir>/export. ``:runlocal`` trains 2 epochs on 1,024 images.
"""
from gpd_jax import config_base


def get_config(arg=None):
  flags = config_base.parse_arg(arg, allowed=("runlocal",))
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=5)
  c.model.name = "resnet20"
  c.loss.base = "ce"
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
  return c
