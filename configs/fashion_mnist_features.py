"""Feature distillation on the offline dataset: ResNet-20 → ResNet-8 on Fashion-MNIST (28×28×1).

    python launch/train.py --config=configs/fashion_mnist_features.py:reviewkd_gpd --workdir=runs/fm_rkd_gpd

The argument names the method (one of them; default ``reviewkd_gpd``), optionally ``gpd`` (GPD on top of any of them) and
``runlocal``:

* ``reviewkd``: CE + 1 · HCL(ABF(student levels), teacher levels), pre-ReLU levels, no warm-up: GPD's
  ReviewKD setting, so that ``reviewkd`` and ``reviewkd_gpd`` differ only by GPD;
* ``reviewkd_gpd``: that, with GPD (r 2, OREPA branches, 3 × SCE): the DT gets its own ABF stack;
* ``sp``: CE + 3000 · SP on the last stage's output (mdistiller);
* ``fitnet``: CE + 100 · MSE(regressor(stage 2 of the student), stage 2 of the teacher) (mdistiller's
  hint layer 2 of [stem, stage 1, stage 2, stage 3]);
* ``crd``: CE + 0.8 · CRD on the pooled features (dim 128, τ 0.07, momentum 0.5), with 1,024 negatives
  instead of the recipe's 16,384: the [B, K+1, 128] gathers of two directions at K = 16,384 are ~1 GB
  per step at batch 128, too much for the CPU this protocol runs on.

Everything else is configs/fashion_mnist_gpd.py's (5 epochs, SGD 0.05 cosine, clip 5; the static
ResNet-20 teacher trained first into <workdir>/teacher when missing). ``:runlocal`` runs 2 epochs on
1,024 images (about a minute on a 2-core CPU, teacher included).
"""
import os

from gpd_jax import config_base

METHODS = ("reviewkd", "reviewkd_gpd", "sp", "fitnet", "crd")


def get_config(arg=None):
  flags = config_base.parse_arg(arg, allowed=("runlocal", "gpd", *METHODS))
  methods = [m for m in METHODS if m in flags] or ["reviewkd_gpd"]
  if len(methods) != 1:
    raise ValueError(f"config argument {arg!r}: name one method of {METHODS} (e.g. "
                     "--config=configs/fashion_mnist_features.py:reviewkd_gpd,runlocal)")
  method = methods[0]
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=5)
  c.model.name = "resnet8"
  teacher_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_teacher.py")
  config_base.static_teacher(c, "resnet20", teacher_config + (":runlocal" if "runlocal" in flags else ""))
  c.loss.base = "ce"
  c.optim.clip_norm = 5.0
  if method in ("reviewkd", "reviewkd_gpd"):
    config_base.reviewkd(c, weight=1.0, warmup_epochs=0.0, student_preact=True)
  elif method == "sp":
    c.features.method, c.features.weight = "sp", 3000.0
  elif method == "fitnet":
    c.features.method, c.features.weight = "fitnet", 100.0
    c.features.fitnet.hint_layer = 2
  else:
    c.features.method, c.features.weight = "crd", 0.8
    c.features.crd.num_negatives = 1024
  if method == "reviewkd_gpd" or "gpd" in flags:
    config_base.gpd_on(c, ratio=2, branches=True)
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
  return c
