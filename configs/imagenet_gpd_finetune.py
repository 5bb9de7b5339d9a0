"""GPD fine-tuning of a pre-trained ResNet-18 on ImageNet, no static teacher (scenario c).

    python launch/train.py --config=configs/imagenet_ce.py:resnet18 --workdir=W/pretrained_student
    python launch/train.py --config=configs/imagenet_gpd_finetune.py --workdir=W

Starts from the export in <workdir>/pretrained_student (set --config.init.student to use another);
50 epochs, LR 0.01 dropped once at epoch 30, OREPA scales (1,0,0,0,0,0) so step 0 computes the
pre-trained student. Expected (paper): 70.9 % vs 69.76 % for the pre-trained model.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", gpd=True, finetune=True,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
