"""Stagewise KD on ImageNet, the published recipe: ResNet-34 → ResNet-18 (same stage widths).

    python launch/train.py --config=configs/imagenet_stagewise_kd.py --workdir=runs/in_skd
    python launch/train.py --config=configs/imagenet_stagewise_kd.py:data20 --workdir=...

Kulkarni et al. (IvLabs/stagewise-knowledge-distillation ``experiments/stagewise_kd.py``): six
phases of 100 epochs each, every phase a fresh Adam (LR 1e-4, PyTorch's defaults otherwise, no weight
decay) at batch 64, starting from the previous phase's weights with the lowest validation loss.
Phase 0 trains the stem (conv1 + bn1), phases 1-4 ``layer1..4``, each alone, on the MSE between its
post-ReLU output and the teacher's; phase 5 trains the classifier alone with CE and no teacher.
The teacher is a trained ResNet-34 in ``<workdir>/teacher`` (e.g. torchvision's weights through
``config.teacher.checkpoint``). ``data<NN>`` trains on a seeded NN % of the training set (the paper's
10-40 %). ``:runlocal``: synthetic 64×64 data, a few steps per phase.
"""
import os

from gpd_jax import config_base

FRACTIONS = {f"data{p}": p / 100 for p in (10, 20, 30, 40)}
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")
EPOCHS_PER_PHASE = 100.0


def get_config(arg=None):
  flags = config_base.parse_arg(arg, allowed=("runlocal", *FRACTIONS))
  c = config_base.imagenet_recipe(config_base.base_config(), model="resnet18")
  config_base.static_teacher(c, "resnet34")
  c.batch_size = 64
  c.eval_batch_size = 250
  c.loss.base = "ce"
  # The phases' optimizer: torch.optim.Adam(lr=1e-4) = AdamW without decay, constant LR.
  c.optim.name = "adamw"
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 0.0
  c.schedule.name = "constant"
  c.schedule.base_lr = 1e-4
  c.schedule.warmup_epochs = 0.0
  epochs = EPOCHS_PER_PHASE
  if "runlocal" in flags:
    config_base.imagenet_runlocal(
        c, teacher_config=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "imagenet_ce.py:resnet34,runlocal"))
    epochs = 0.25
  c.phases = tuple(config_base.phase(s, epochs, (s,), (f"stage_mse({s})",)) for s in STAGES) + (
      config_base.phase("head", epochs, ("head",), ("ce",)),)
  fractions = [FRACTIONS[f] for f in flags if f in FRACTIONS]
  if fractions:
    c.dataset.train_fraction = fractions[0]
  c.num_epochs = len(c.phases) * epochs  # informational: the phases set the length
  return c
