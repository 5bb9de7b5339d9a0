"""GPD fine-tuning of a pre-trained ResNet-18 on ImageNet, no static teacher (scenario c).

    python launch/train.py --config=configs/imagenet_ce.py:resnet18 --workdir=W/pretrained_student
    python launch/train.py --config=configs/imagenet_gpd_finetune.py --workdir=W

Starts from the export in <workdir>/pretrained_student (set --config.init.student to use another);
50 epochs, LR 0.01 dropped once at epoch 30, OREPA scales (1,0,0,0,0,0) so step 0 computes the
pre-trained student. Expected (paper): 70.9 % vs 69.76 % for the pre-trained model.
"""
from gpd_jax import config_base


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.imagenet_recipe(config_base.base_config(), model="resnet18")
  config_base.imagenet_gpd(c)
  c.loss.base = "ce"
  c.init.student = "pretrained_student"
  c.gpd.pretrained_branches = True
  c.num_epochs = 50.0
  c.schedule.base_lr = 0.01
  c.schedule.boundaries = (30,)
  if "runlocal" in flags:
    config_base.imagenet_runlocal(c)
  return c
