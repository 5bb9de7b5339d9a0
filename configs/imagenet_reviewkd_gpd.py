"""ReviewKD + GPD on ImageNet, ResNet-34 → ResNet-18: the paper's recipe (GPD ``CNN/train_reviewkd.py``).

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_reviewkd_gpd.py --workdir=W

GPD's ImageNet recipe (100 epochs, batch 512, SGD 0.1, wd 1e-4 on all params, ×0.1 at 30/60/90, clip 5
over all trained leaves, EMA 0.99996, r 2, OREPA branches) with ReviewKD as the base method: the DT's
loss CE + HCL(ABF_D(DT levels), teacher levels) and the student's CE + HCL(ABF_S(student levels),
teacher levels) + 3 · SCE(DT); weight 1, no warm-up, pre-ReLU levels, ABF width 512. ABF_S and ABF_D
are two independently initialised stacks (ABF_D takes the ×2 wide DT levels), optimised, clipped and
EMA'd with θ, checkpointed, and not exported.
Expected (paper Table 1): 72.50 % top-1 vs 71.61 % for ReviewKD.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", teacher="resnet34", gpd=True,
                                     reviewkd_mid=512,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
