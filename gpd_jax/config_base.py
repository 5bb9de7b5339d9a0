"""Defaults shared by every config in configs/; each experiment file overrides only what it changes.

Every field that ``gpd_jax.train.train_and_evaluate`` reads is defined here, so a typo on the command
line (``--config.optim.lrr=0.1``) is an error and every field can be overridden there.
"""
import difflib
import os

import ml_collections
from ml_collections import config_dict

from gpd_jax.models import MODEL_NAMES


def parse_arg(arg, *, allowed=None):
  """``'runlocal'`` / ``'runlocal,resnet32x4'`` / None -> set of flags (big_vision style).

  ``allowed``: the flags the config understands; any other one is then an error that lists them
  (None: no check).
  """
  flags = set(a for a in (arg or "").split(",") if a)
  unknown = sorted(flags - set(allowed)) if allowed is not None else []
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config argument {arg!r}: unknown {unknown}{suggestion}; the flags are "
                     f"{', '.join(sorted(allowed))} (e.g. --config=configs/x.py:runlocal)")
  return flags


def _model_flag(flags, default):
  """The model named among the config-argument flags (``:resnet32x4``), else ``default``."""
  names = sorted(f for f in flags if f in MODEL_NAMES)
  if len(names) > 1:
    raise ValueError(f"config argument names several models {names}; give one")
  return names[0] if names else default


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128  # GLOBAL batch, split over the devices of the mesh's batch axes
  c.eval_batch_size = 512
  c.num_epochs = 1.0
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 0  # 0 = once per epoch
  c.keep_checkpoints = 3
  c.ema_decay = 0.0  # 0 = no EMA; the GPD ImageNet recipe uses 0.99996 per step
  c.select_metric = "top1_S"  # the 'best' metric reported at the end (first eval split)
  # Multi-phase runs (gpd_jax/phases.py): a tuple of phase(...) dicts; () = one ordinary phase. With
  # phases the run's length is the sum of their epochs (num_epochs is not read).
  c.phases = ()

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet8"
  c.model.kwargs = ml_collections.ConfigDict()  # module overrides, e.g. widths for tiny variants
  c.model.dtype = "float32"  # compute dtype ('bfloat16' = mixed precision; params stay float32)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.name = ""  # '' = no static teacher
  c.teacher.workdir = ""  # its workdir or export dir; relative paths are under this run's workdir
  c.teacher.checkpoint = ""  # a PyTorch file (.pth/.safetensors/.npz) of teacher.name; wins over workdir
  c.teacher.config = ""  # 'path.py[:arg]': train the teacher there first if it is missing
  c.teacher.train_mode = False  # True = batch-stat BN like the reference code (docs/method.md §13, P1)
  c.teacher.model = ml_collections.ConfigDict({"dtype": "float32"})

  c.init = ml_collections.ConfigDict()
  c.init.student = ""  # an export (or workdir) or a PyTorch file of a pre-trained student: GPD fine-tuning

  c.loss = ml_collections.ConfigDict()
  c.loss.base = "ce"  # 'ce' | 'kd' | 'dkd' | 'dist'
  c.loss.ce_weight = 1.0
  c.loss.kd_weight = 1.0
  c.loss.label_smoothing = 0.0
  c.loss.kd = ml_collections.ConfigDict({"temperature": 4.0})
  # DKD warm-up: linear ramp of the KD weight; warmup_epochs is turned into steps with the run's real
  # steps per epoch; warmup_steps is an exact step count (set one of the two).
  c.loss.dkd = ml_collections.ConfigDict(
      {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 0.0, "warmup_steps": 0})
  c.loss.dist = ml_collections.ConfigDict({"beta": 1.0, "gamma": 1.0, "temperature": 1.0})

  c.gpd = ml_collections.ConfigDict()
  c.gpd.enabled = False
  c.gpd.ratio = 2
  c.gpd.branches = False  # OREPA branches on every 3×3 stride-1 conv
  c.gpd.pretrained_branches = False  # branch scales (1,0,..): True when fine-tuning (scenario c)
  c.gpd.noise_std = 1e-6
  c.gpd.sce_weight = 3.0
  c.gpd.sce_smoothing = 0.1
  c.gpd.train_dt_loss = True
  c.gpd.dt_uses_static_kd = True
  c.gpd.student_uses_static_kd = True

  # Networks trained alongside the main one, extra frozen teachers, and the terms between them
  # (gpd_jax/terms.py). Empty = a single trained network, as above.
  c.online = ml_collections.ConfigDict()
  c.online.peers = ml_collections.ConfigDict()  # name -> online_peer(...): a trained network
  c.online.teachers = ml_collections.ConfigDict()  # name -> frozen_teacher(...): like config.teacher
  c.online.terms = ()  # e.g. ('ce(peer)', 'dml(student<->peer)'): added to config.loss's objective
  c.online.temperature = 1.0  # T of kd / dml / reverse_kl / bdkd terms
  c.online.bdkd_gain = 2.0  # BD-KD: weight of the divergence the entropy gap favours
  c.online.camkd_temperature = 4.0
  c.online.switch = ml_collections.ConfigDict()  # SwitOKD: pause a peer teacher in expert mode
  c.online.switch.teacher = ""  # '' = off; else the peer that pauses
  c.online.switch.student = "student"

  # Feature distillation from the static teacher (gpd_jax/feature_kd.py, docs/feature_kd.md): the
  # student (and with GPD the DT, each with its own connector) matches the teacher's feature taps.
  c.features = ml_collections.ConfigDict()
  c.features.method = ""  # '' = off | 'reviewkd' | 'sp' | 'fitnet' | 'crd'
  c.features.weight = 1.0  # the term's weight (recipes: ReviewKD 1, SP 3000, FitNets 100, CRD 0.8)
  c.features.warmup_epochs = 0.0  # linear ramp of the weight over these epochs (0 = none)
  c.features.reviewkd = ml_collections.ConfigDict(
      {"mid_features": 0,  # the ABFs' inner width; 0 = min(512, the student's deepest width)
       "student_preact": True,  # student levels before their last ReLU (False: mdistiller's CIFAR)
       "pool_sizes": (4, 2, 1)})  # HCL's pyramid
  c.features.sp = ml_collections.ConfigDict({"groups": 1})  # split the batch into groups (per-GPU SP)
  c.features.fitnet = ml_collections.ConfigDict({"hint_layer": 2})  # index in [stem, stage_1, ...]
  c.features.crd = ml_collections.ConfigDict(
      {"feature_dim": 128, "num_negatives": 16384, "temperature": 0.07, "momentum": 0.5})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"  # 'sgd' | 'adamw'
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 5e-4
  c.optim.no_decay_regex = ""  # '' = decay every leaf (BN, biases and OREPA v included)
  c.optim.clip_norm = 0.0  # 0 = no clipping

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "step"  # 'step' | 'cosine' | 'constant'
  c.schedule.base_lr = 0.05
  c.schedule.warmup_epochs = 0.0
  c.schedule.boundaries = (150, 180, 210)  # epochs ('step')
  c.schedule.decay_factor = 0.1
  c.schedule.min_lr = 0.0
  c.schedule.warmup_init_lr = 0.0  # first LR of the linear warm-up
  c.schedule.cooldown_epochs = 0.0  # 'cosine': final epochs held at min_lr

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)
  c.mesh.axes = ("data",)
  c.mesh.batch_axes = ("data",)
  c.mesh.param_rules = ()  # ((regex, partition spec tuple), ...); default: replicated

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = config_dict.placeholder(str)  # default $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.dataset.source_dir = config_dict.placeholder(str)  # fashion_mnist IDX files (default: Debian's)
  c.dataset.train_split = "train"
  c.dataset.eval_splits = ml_collections.ConfigDict({"test": "test"})  # evaluated every eval
  c.dataset.test_splits = ml_collections.ConfigDict()  # evaluated once, at the end
  c.dataset.image_size = config_dict.placeholder(int)  # default: native size
  c.dataset.augment = "cifar"  # 'imagenet' | 'cifar' | 'none'
  c.dataset.crop_padding = 4
  # The ViT data recipe (timm semantics; all off by default, on in vit_recipe):
  c.dataset.rand_augment = ""  # timm string, e.g. 'rand-m9-mstd0.5-inc1'; '' = off
  c.dataset.random_erase_prob = 0.0  # per-pixel N(0, 1) box in normalized space ('pixel' mode)
  c.dataset.repeated_augmentations = 1  # > 1: each image this many times per batch, on different devices
  c.dataset.mixup_alpha = 0.0  # batch-level, in the train step (gpd_jax/mixup.py); 0 and 0 = off
  c.dataset.cutmix_alpha = 0.0
  c.dataset.mixup_prob = 1.0  # probability that a batch is mixed at all
  c.dataset.mixup_switch_prob = 0.5  # probability of CutMix when both alphas are > 0
  c.dataset.num_train_examples = config_dict.placeholder(int)  # cap (None = all)
  c.dataset.num_eval_examples = config_dict.placeholder(int)
  c.dataset.train_fraction = 1.0  # reduced data: train on a seeded random fraction of the train split
  c.dataset.subset_seed = 0  # the seed of that subset (recorded in <workdir>/train_subset.json)
  c.dataset.worker_count = 0
  c.dataset.num_threads = 2
  c.dataset.prefetch_buffer_size = 2
  return c


def gpd_on(c, *, ratio=2, branches=True):
  """Turns GPD on with the paper's settings (r, six OREPA branches, 3 × SCE with 0.1 smoothing)."""
  c.gpd.enabled = True
  c.gpd.ratio = ratio
  c.gpd.branches = branches
  return c


def online_peer(model: str, *, kwargs=None, gpd_ratio: int = 0, init: str = "",
                dtype: str = "float32") -> ml_collections.ConfigDict:
  """A network trained in the same step (``config.online.peers.<name>``).

  ``gpd_ratio`` > 1 trains it as GPD does (a ×r DT whose view is the peer; logits ``<name>`` and
  ``<name>_dt``; GPD's other settings come from ``config.gpd``); 0 trains the plain network.
  ``init``: an export (or a workdir holding one) to start from, relative to the run's workdir.
  """
  return ml_collections.ConfigDict({
      "model": {"name": model, "kwargs": dict(kwargs or {}), "dtype": dtype},
      "gpd_ratio": int(gpd_ratio), "init": init})


def frozen_teacher(name: str, workdir: str, *, config: str = "",
                   train_mode: bool = False) -> ml_collections.ConfigDict:
  """An extra frozen teacher (``config.online.teachers.<key>``), read like ``config.teacher``."""
  return ml_collections.ConfigDict({"name": name, "workdir": workdir, "config": config,
                                    "train_mode": train_mode, "model": {"dtype": "float32"}})


def phase(name: str, epochs: float, train, terms, *, start: str = "best", optim=None,
          schedule=None) -> dict:
  """One entry of ``config.phases`` (see gpd_jax/phases.py for every key).

  ``train``: stage names ('stem', 'stage1', ..., 'head', 'all') or path regexes of the leaves the
  phase trains; ``terms``: its objective ('base', 'ce', 'stage_mse(<tap>)'); ``start``: 'best' (the
  previous phase's weights with the lowest validation loss) or 'last'; ``optim`` / ``schedule``:
  overrides of config.optim / config.schedule for this phase.
  """
  return {"name": name, "epochs": float(epochs), "train": tuple(train), "terms": tuple(terms),
          "start": start, "optim": dict(optim or {}), "schedule": dict(schedule or {})}


def shrink_for_local_run(c, *, num_train_examples=1024, num_eval_examples=256, batch_size=64,
                         num_epochs=2):
  """``runlocal``: a few steps on a data subset, to check a config end to end on a laptop CPU.

  Warm-ups given in epochs keep their share of the run (DKD's 20 of 240 epochs become 1/6 of an epoch
  in a 2-epoch run), so a quick run exercises the same schedule shape instead of never leaving it.
  """
  share = float(num_epochs) / float(c.num_epochs) if c.num_epochs else 1.0
  c.loss.dkd.warmup_epochs = c.loss.dkd.warmup_epochs * share
  c.features.warmup_epochs = c.features.warmup_epochs * share
  c.schedule.warmup_epochs = c.schedule.warmup_epochs * share
  c.batch_size = batch_size
  c.eval_batch_size = 128
  c.num_epochs = num_epochs
  c.log_every_steps = 4
  c.dataset.num_train_examples = num_train_examples
  c.dataset.num_eval_examples = num_eval_examples
  c.dataset.worker_count = 0
  return c


def fashion_mnist_recipe(c, *, num_epochs=10):
  """The offline recipe: Fashion-MNIST 28×28×1, pad-crop + flip, SGD 0.05 with cosine decay.

  Model selection uses a validation split held out from the training set (the last 5,000 images);
  the test split is evaluated once, at the end.
  """
  c.dataset.name = "fashion_mnist"
  c.dataset.train_split = "train[:55000]"
  c.dataset.eval_splits = ml_collections.ConfigDict({"val": "train[55000:]"})
  c.dataset.test_splits = ml_collections.ConfigDict({"test": "test"})
  c.dataset.augment = "cifar"
  c.dataset.crop_padding = 2
  c.batch_size = 128
  c.num_epochs = float(num_epochs)
  c.optim.weight_decay = 5e-4
  c.schedule.name = "cosine"
  c.schedule.base_lr = 0.05
  c.schedule.warmup_epochs = 0.0
  return c


def imagenet_recipe(c, *, model="resnet18"):
  """GPD's ImageNet CNN recipe (docs/method.md §9.1): 100 epochs, global batch 512, SGD 0.1 m 0.9,
  wd 1e-4 on every leaf, ×0.1 at epochs 30/60/90, no warm-up, RandomResizedCrop 224 + flip.

  BN statistics are over the global batch (the reference used per-GPU batches of 128; docs/method.md §13, P10).
  """
  c.model.name = model
  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_splits = ml_collections.ConfigDict({"val": "validation"})
  c.dataset.image_size = 224
  c.dataset.augment = "imagenet"
  c.dataset.worker_count = 8
  c.batch_size = 512
  c.eval_batch_size = 1000
  c.num_epochs = 100.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.optim.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.base_lr = 0.1
  c.schedule.boundaries = (30, 60, 90)
  return c


def static_teacher(c, name, config=""):
  """A static teacher ``name`` (trained by a ``*_ce.py`` config), expected in <workdir>/teacher;
  with ``config`` (a config file path, ``:args`` allowed) it is trained there first when missing."""
  c.teacher.name = name
  c.teacher.workdir = "teacher"
  c.teacher.config = config
  return c


def imagenet_gpd(c):
  """GPD's additions: r 2, OREPA branches, 3 × SCE, clip 5, EMA 0.99996 per step."""
  gpd_on(c, ratio=2, branches=True)
  c.optim.clip_norm = 5.0
  c.ema_decay = 0.99996
  return c


def imagenet_runlocal(c, *, teacher_config=None):
  """``runlocal`` for ImageNet configs: synthetic 64×64 images with 1000 classes, a few steps."""
  shrink_for_local_run(c, num_train_examples=128, num_eval_examples=64, batch_size=16, num_epochs=1)
  c.eval_batch_size = 32
  c.dataset.name = "synthetic"
  c.dataset.image_shape = (72, 72, 3)
  c.dataset.num_classes = 1000
  c.dataset.image_size = 64
  c.dataset.train_split = "train"
  c.dataset.eval_splits = ml_collections.ConfigDict({"val": "validation"})
  c.dataset.worker_count = 0
  c.checkpoint_every_steps = 0
  if c.teacher.name and teacher_config:
    c.teacher.config = teacher_config
  return c


def cifar100_recipe(c, *, model="resnet8x4"):
  """mdistiller's CIFAR-100 recipe (docs/kd_methods.md §2.1): 240 epochs, batch 64, SGD 0.05 m 0.9,
  wd 5e-4, ×0.1 at epochs 150/180/210, pad-4 crop + flip; val = the last 5k of train."""
  c.model.name = model
  c.dataset.name = "cifar100"
  c.dataset.train_split = "train[:45000]"
  c.dataset.eval_splits = ml_collections.ConfigDict({"val": "train[45000:]"})
  c.dataset.test_splits = ml_collections.ConfigDict({"test": "test"})
  c.dataset.augment = "cifar"
  c.dataset.crop_padding = 4
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 240.0
  c.log_every_steps = 100
  c.optim.weight_decay = 5e-4
  c.schedule.name = "step"
  c.schedule.base_lr = 0.05
  c.schedule.boundaries = (150, 180, 210)
  return c


def mdistiller_kd(c):
  """mdistiller's KD on CIFAR-100: τ 4, CE weight 0.1, KD weight 0.9."""
  c.loss.base = "kd"
  c.loss.ce_weight, c.loss.kd_weight = 0.1, 0.9
  c.loss.kd.temperature = 4.0
  return c


def dkd(c, *, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0.0):
  """DKD as the base KD loss (CE weight 1)."""
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = alpha, beta, temperature
  c.loss.dkd.warmup_epochs = float(warmup_epochs)
  return c


def reviewkd(c, *, weight=1.0, warmup_epochs=0.0, student_preact=True, mid_features=0):
  """ReviewKD as the feature term (docs/feature_kd.md): CE + weight · HCL(ABF(student levels), teacher
  levels), the weight ramped linearly over ``warmup_epochs``. ``mid_features`` 0 = min(512, the
  student's deepest width)."""
  c.features.method = "reviewkd"
  c.features.weight = float(weight)
  c.features.warmup_epochs = float(warmup_epochs)
  c.features.reviewkd.student_preact = bool(student_preact)
  c.features.reviewkd.mid_features = int(mid_features)
  return c


CIFAR100_METHODS = ("ce", "kd", "dkd", "dkd_gpd", "reviewkd", "reviewkd_gpd")


def cifar100_config(arg, *, method, config_dir):
  """The configs/cifar100_*.py experiments: mdistiller's recipe, resnet32x4 → resnet8x4 by default.

  Args:
    arg: the config argument: ``runlocal`` and/or a model name (the student; for ``ce`` the model
      trained, e.g. ``:resnet32x4`` for the teacher).
    method: ``'ce'`` (plain training), ``'kd'`` (τ 4, CE 0.1 / KD 0.9), ``'dkd'`` (α 1, β 8, T 4,
      warm-up 20 epochs), ``'reviewkd'`` (mdistiller's: CE 1 + 5 · HCL, warm-up 20 epochs, post-ReLU
      student levels), or ``'dkd_gpd'`` / ``'reviewkd_gpd'`` (that method plus GPD: r 2, OREPA
      branches, 3 × SCE, clip 5; with ReviewKD the DT gets its own ABF stack).
    config_dir: the directory of the config files (``runlocal`` trains its teacher with
      ``cifar100_ce.py:resnet32x4,runlocal`` from there).
  """
  if method not in CIFAR100_METHODS:
    raise ValueError(f"cifar100_config: method {method!r} is not one of {CIFAR100_METHODS}")
  flags = parse_arg(arg, allowed=("runlocal", *MODEL_NAMES))
  c = cifar100_recipe(base_config(), model=_model_flag(flags, "resnet8x4"))
  if method != "ce":
    static_teacher(c, "resnet32x4")
  if method == "kd":
    mdistiller_kd(c)
  if method in ("dkd", "dkd_gpd"):
    dkd(c, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
  if method in ("reviewkd", "reviewkd_gpd"):
    reviewkd(c, weight=5.0, warmup_epochs=20, student_preact=False)
  if method in ("dkd_gpd", "reviewkd_gpd"):
    gpd_on(c, ratio=2, branches=True)
    c.optim.clip_norm = 5.0
  if "runlocal" in flags:
    shrink_for_local_run(c)
    if c.teacher.name:
      c.teacher.config = os.path.join(config_dir, "cifar100_ce.py:resnet32x4,runlocal")
  return c


def imagenet_config(arg, *, config_dir, model="resnet18", teacher="", dkd_beta=None, gpd=False,
                    finetune=False, reviewkd_mid=None):
  """The configs/imagenet_*.py experiments: GPD's ImageNet recipe plus the method's settings.

  Args:
    arg: the config argument: ``runlocal`` (synthetic data, a few steps); for a run without a static
      teacher also a model name (``imagenet_ce.py:resnet34``).
    config_dir: the directory of the config files (``runlocal`` trains its teacher with
      ``imagenet_ce.py:<teacher>,runlocal`` from there).
    model: the student (default when the argument names none).
    teacher: the static teacher, expected in ``<workdir>/teacher``; '' for none.
    dkd_beta: DKD (α 1, T 1, no warm-up) with this β as the base loss; None for CE.
    gpd: GPD's additions (r 2, OREPA branches, 3 × SCE, clip 5, EMA 0.99996).
    finetune: scenario (c): start from ``<workdir>/pretrained_student``, 50 epochs, LR 0.01 dropped
      once at epoch 30, OREPA scales (1, 0, 0, 0, 0, 0).
    reviewkd_mid: ReviewKD (weight 1, pre-ReLU student levels) with this ABF inner width as the
      feature term; None for none. With GPD, GPD's combination (no warm-up, the DT with its own ABF
      stack, CE as the logit loss); without GPD, mdistiller's ImageNet recipe (batch 256, warm-up 1
      epoch).
  """
  flags = parse_arg(arg, allowed=("runlocal",) + (() if teacher else MODEL_NAMES))
  c = imagenet_recipe(base_config(), model=_model_flag(flags, model))
  if teacher:
    static_teacher(c, teacher)
  if gpd:
    imagenet_gpd(c)
  if dkd_beta is not None:
    dkd(c, alpha=1.0, beta=dkd_beta, temperature=1.0)
  if reviewkd_mid is not None:
    reviewkd(c, weight=1.0, warmup_epochs=0.0 if gpd else 1.0, student_preact=True,
             mid_features=reviewkd_mid)
    if not gpd:
      c.batch_size = 256
  if finetune:
    c.init.student = "pretrained_student"
    c.gpd.pretrained_branches = True
    c.num_epochs = 50.0
    c.schedule.base_lr = 0.01
    c.schedule.boundaries = (30,)
  if "runlocal" in flags:
    imagenet_runlocal(c, teacher_config=os.path.join(config_dir, f"imagenet_ce.py:{teacher},runlocal")
                      if teacher else None)
  return c


# timm's no-weight-decay rule of the ViT recipes: 1-D leaves (biases, LayerNorm/BatchNorm affine
# parameters) and the model's token / position parameters.
VIT_NO_DECAY_REGEX = r"(/bias|/scale|/cls_token|/dist_token|/pos_embed)$"


def vit_recipe(c, *, model, batch_size=2048, drop_path_rate=0.0):
  """GPD's ImageNet vision-transformer recipe (docs/method.md §9.2; RVT's ``main_gpd.py`` defaults).

  AdamW (wd 0.05, no decay on 1-D leaves and tokens), LR 5e-4 × batch/512, cosine with 5 warm-up
  epochs from 1e-6 down to 1e-5, 300 + 10 cool-down epochs, label smoothing 0.1, EMA 0.99996, no
  gradient clipping, drop-path ``drop_path_rate``. Augmentation (timm's DeiT/RVT values):
  RandomResizedCrop + flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode),
  mixup 0.8 / cutmix 1.0 (switch 0.5, every batch) with the label smoothing folded into the soft
  targets, repeated augmentation ×3 (``docs/method.md`` §9.4). RandomResizedCrop is bilinear here
  (the reference: bicubic).
  """
  imagenet_recipe(c, model=model)
  c.batch_size = batch_size
  c.num_epochs = 310.0
  c.model.kwargs = ml_collections.ConfigDict({"drop_path_rate": drop_path_rate})
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.05
  c.optim.no_decay_regex = VIT_NO_DECAY_REGEX
  c.optim.clip_norm = 0.0
  c.schedule.name = "cosine"
  c.schedule.base_lr = 5e-4 * batch_size / 512
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_init_lr = 1e-6
  c.schedule.min_lr = 1e-5
  c.schedule.cooldown_epochs = 10.0
  c.loss.label_smoothing = 0.1
  c.ema_decay = 0.99996
  c.dataset.rand_augment = "rand-m9-mstd0.5-inc1"
  c.dataset.random_erase_prob = 0.25
  c.dataset.repeated_augmentations = 3
  c.dataset.mixup_alpha = 0.8
  c.dataset.cutmix_alpha = 1.0
  c.dataset.mixup_prob = 1.0
  c.dataset.mixup_switch_prob = 0.5
  return c


def vit_runlocal(c, *, teacher_config=None):
  """``runlocal`` for the ViT configs: :func:`imagenet_runlocal` on 64×64 images (4×4 tokens)."""
  imagenet_runlocal(c, teacher_config=teacher_config)
  c.model.kwargs.image_size = 64
  return c
