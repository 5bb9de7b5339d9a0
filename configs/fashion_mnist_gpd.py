"""The offline default: DKD + GPD, ResNet-20 → ResNet-8 on Fashion-MNIST (28×28×1).

    python launch/train.py --config=configs/fashion_mnist_gpd.py --workdir=runs/fm_gpd

The static teacher (configs/fashion_mnist_teacher.py) is trained first into <workdir>/teacher when it
is not there yet. The student is trained as a view of a ×2 dynamic teacher with OREPA branches:
DT loss CE + DKD, student loss CE + DKD + 3 × SCE(DT). Model selection on a held-out validation split
(last 5k of train); the test split is evaluated once at the end; the plain student is exported to
<workdir>/export. 5 epochs each; on a 2-core CPU about 25 min for the teacher (≈190 img/s) and
40-60 min for the student (≈80-120 img/s for the GPD step), estimated from the img/s measured in the
docs/results.md runs. ``:runlocal`` runs the same pipeline for 2 epochs on 1,024 images (< 2 min on a
2-core CPU, teacher included).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  flags = config_base.parse_arg(arg, allowed=("runlocal",))
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=5)
  c.model.name = "resnet8"
  teacher_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_teacher.py")
  config_base.static_teacher(c, "resnet20", teacher_config + (":runlocal" if "runlocal" in flags else ""))
  c.loss.base = "dkd"
  c.loss.dkd.alpha = 1.0
  c.loss.dkd.beta = 2.0  # mdistiller's setting for small same-family pairs (res56 -> res20)
  c.loss.dkd.temperature = 4.0
  config_base.gpd_on(c, ratio=2, branches=True)
  c.optim.clip_norm = 5.0
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c)
  return c
