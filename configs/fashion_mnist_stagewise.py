"""Stagewise KD and SSKD on Fashion-MNIST: ResNet-20 → ResNet-8, one multi-phase run each.

    python launch/train.py --config=configs/fashion_mnist_stagewise.py:stagewise --workdir=runs/fm_skd
    python launch/train.py --config=configs/fashion_mnist_stagewise.py:stagewise,data20 --workdir=...
    python launch/train.py --config=configs/fashion_mnist_stagewise.py:sskd --workdir=runs/fm_sskd

The CIFAR-style ResNets share their stage widths (16 | 16, 32, 64), so the student's stem and stage
outputs line up with the teacher's without an adapter (Stagewise KD's and our SSKD's requirement).

* ``stagewise`` (Kulkarni et al.): five phases, each starting from the previous phase's weights with
  the lowest validation loss: the stem, then stage 1, 2, 3, each trained alone on the MSE between its
  post-ReLU output and the teacher's (everything else frozen), then the classifier alone with CE and
  no teacher. Adam (no weight decay), as published; the LR is 1e-3 instead of 1e-4 because a phase here
  lasts half an epoch, not 100 epochs.
* ``data<NN>``: Stagewise KD's less-data setting, the student trains on a seeded NN % of the training
  split (``config.dataset.train_fraction``; the subset is written to ``<workdir>/train_subset.json``).
* ``sskd`` (Gao et al., stage by stage): the backbone is split at its resolutions (stem with stage 1,
  stage 2, stage 3); each part learns to reproduce the teacher's stage output (MSE) with the earlier
  parts frozen, then only the classifier is trained on CE. The protocol's optimizer (SGD 0.05 with a
  cosine per phase, weight decay 5e-4); phases start from the previous phase's last weights.

Length: 3 epochs in all, the Fashion-MNIST protocol's student budget (docs/results.md): Stagewise KD
4 × 0.5 + 1 epoch, SSKD 3 × 2/3 + 1 epoch. The static teacher (configs/fashion_mnist_teacher.py) is
trained first into <workdir>/teacher when it is missing. ``:runlocal`` runs the same phases on 1,024
images (well under 2 min on a 2-core CPU, teacher included); a model name (``:resnet14``) changes
the student.
"""
import os

from gpd_jax import config_base

METHODS = ("stagewise", "sskd")
FRACTIONS = {f"data{p}": p / 100 for p in (10, 20, 30, 40)}


def stagewise_phases(feature_epochs: float, head_epochs: float, *, lr: float = 1e-3):
  """Stagewise KD: stem, stage1..3 on their stage MSE, then the head on CE (Adam, no decay)."""
  adam = {"name": "adamw", "weight_decay": 0.0, "clip_norm": 0.0}
  constant = {"name": "constant", "base_lr": lr, "warmup_epochs": 0.0}
  stages = ("stem", "stage1", "stage2", "stage3")
  return tuple(config_base.phase(s, feature_epochs, (s,), (f"stage_mse({s})",), optim=adam,
                                 schedule=constant) for s in stages) + (
      config_base.phase("head", head_epochs, ("head",), ("ce",), optim=adam, schedule=constant),)


def sskd_phases(feature_epochs: float, head_epochs: float):
  """SSKD: (stem + stage1), stage2, stage3 on their stage MSE, then the head on CE."""
  parts = ((("stem", "stage1"), "stage1"), (("stage2",), "stage2"), (("stage3",), "stage3"))
  return tuple(config_base.phase("+".join(train), feature_epochs, train, (f"stage_mse({tap})",),
                                 start="last") for train, tap in parts) + (
      config_base.phase("head", head_epochs, ("head",), ("ce",), start="last"),)


def get_config(arg=None):
  flags = config_base.parse_arg(arg, allowed=("runlocal", *METHODS, *FRACTIONS,
                                              *config_base.MODEL_NAMES))
  methods = sorted(flags & set(METHODS))
  if len(methods) > 1:
    raise ValueError(f"config argument {arg!r} names several methods {methods}; give one")
  method = methods[0] if methods else "stagewise"
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=3)
  c.model.name = config_base._model_flag(flags, "resnet8")  # pylint: disable=protected-access
  teacher_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_teacher.py")
  config_base.static_teacher(c, "resnet20", teacher_config + (":runlocal" if "runlocal" in flags else ""))
  c.loss.base = "ce"  # the logit loss of the phases that use 'base' (none here)
  c.optim.clip_norm = 0.0
  if method == "stagewise":
    c.phases = stagewise_phases(0.5, 1.0)
  else:
    c.phases = sskd_phases(2.0 / 3.0, 1.0)
  fractions = [FRACTIONS[f] for f in flags if f in FRACTIONS]
  if fractions:
    c.dataset.train_fraction = fractions[0]
  if "runlocal" in flags:
    config_base.shrink_for_local_run(c, num_epochs=3)
  c.num_epochs = sum(p["epochs"] for p in c.phases)  # informational: the phases set the length
  return c
