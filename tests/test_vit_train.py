"""Vision transformers in training: the ViT recipe configs, and GPD end to end with a tiny ViT.

The end-to-end runs use a two-block ViT (width 8, 2 heads, 4×4 patches of 16×16 synthetic images)
with drop-path on, a random tiny ViT static teacher, DKD + GPD, 4 fake devices, checkpoint and resume.
"""
import os

import jax
import numpy as np
import optax
import pytest

from gpd_jax import checkpoint, config_base, models, optim, train
from gpd_jax.metric_writer import read_metrics
from gpd_jax.train import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
TINY_VIT = {"embed_dim": 8, "depth": 2, "num_heads": 2, "patch_size": 4, "image_size": 16}


def test_imagenet_rvt_gpd_is_the_reference_recipe():
  """Fields of configs/imagenet_rvt_gpd.py == docs/method.md §9.4 (RVT's main_gpd.py defaults)."""
  c = load_config_file(os.path.join(CONFIG_DIR, "imagenet_rvt_gpd.py"))
  assert (c.model.name, c.teacher.name, c.batch_size, c.num_epochs) == ("rvt_tiny", "rvt_small",
                                                                        2048, 310)
  assert (c.optim.name, c.optim.weight_decay, c.optim.clip_norm) == ("adamw", 0.05, 0.0)
  assert (c.schedule.name, c.schedule.base_lr, c.schedule.warmup_epochs, c.schedule.warmup_init_lr,
          c.schedule.min_lr, c.schedule.cooldown_epochs) == ("cosine", 2e-3, 5.0, 1e-6, 1e-5, 10.0)
  assert (c.loss.label_smoothing, c.ema_decay, c.model.kwargs.drop_path_rate) == (0.1, 0.99996, 0.0)
  assert (c.gpd.enabled, c.gpd.ratio, c.gpd.branches, c.gpd.sce_weight, c.gpd.sce_smoothing) == (
      True, 2, False, 3.0, 0.1)
  assert (c.loss.base, c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature,
          c.loss.dkd.warmup_steps) == ("dkd", 1.0, 0.5, 1.0, 0)
  assert c.dataset.name == "imagenet2012" and c.dataset.image_size == 224
  # The schedule: warm-up from 1e-6, peak 2e-3 after 5 epochs, 1e-5 from epoch 300 to 310.
  spe = 625  # 1.28M / 2048
  lr = optim.make_schedule(c.schedule, steps_per_epoch=spe, total_steps=310 * spe)
  np.testing.assert_allclose([lr(0), lr(5 * spe), lr(300 * spe), lr(305 * spe), lr(310 * spe - 1)],
                             [1e-6, 2e-3, 1e-5, 1e-5, 1e-5], rtol=1e-5)
  assert 1e-5 < float(lr(299 * spe)) < 1.01e-5 + 1e-7 and float(lr(150 * spe)) > 9e-4


def test_vit_no_decay_mask():
  """AdamW decays kernels only: not biases, norm scales, tokens or positions (timm's rule)."""
  c = load_config_file(os.path.join(CONFIG_DIR, "imagenet_deit_gpd.py"))
  assert (c.model.name, c.teacher.name, c.batch_size, c.schedule.base_lr,
          c.model.kwargs.drop_path_rate) == ("deit_tiny", "deit_small", 1024, 1e-3, 0.1)
  model = models.create("deit_tiny", 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 224, 224, 3))))
  mask = optim.decay_mask(shapes["params"], c.optim.no_decay_regex)
  key = lambda path: "/".join(str(p.key) for p in path)
  flat = {key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]}
  want = {k for k, leaf in flat.items() if leaf.ndim > 1 and "tokens/" not in k}
  got = {key(path) for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  assert got == want and len(got) == 1 + 12 * 4 + 1  # patch, qkv/proj/fc1/fc2 ×12, head


def tiny_vit_config(*, steps=2, devices=4):
  c = config_base.base_config()
  c.seed = 3
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.model.name = "deit_tiny"
  c.model.kwargs = dict(TINY_VIT, drop_path_rate=0.3)
  c.dataset.name = "synthetic"
  c.dataset.image_shape = (18, 18, 3)
  c.dataset.image_size = 16
  c.dataset.num_classes = 5
  c.dataset.synthetic_sizes = {"train": 32, "validation": 12}
  c.dataset.eval_splits = {"val": "validation"}
  c.dataset.num_threads = 0
  c.mesh.shape = (devices,)
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.05
  c.optim.no_decay_regex = config_base.VIT_NO_DECAY_REGEX
  c.schedule.name = "constant"
  c.schedule.base_lr = 1e-3
  c.ema_decay = 0.9
  c.loss.base = "dkd"
  c.loss.label_smoothing = 0.1
  c.teacher.name = "deit_tiny"
  c.teacher.workdir = "teacher"
  config_base.gpd_on(c, ratio=2, branches=False)
  return c


def make_vit_teacher(workdir):
  kwargs = dict(TINY_VIT, embed_dim=12)
  model = models.create("deit_tiny", 5, **kwargs)
  variables = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32))
  checkpoint.save_export(os.path.join(workdir, "teacher", "export"), jax.device_get(variables),
                         {"name": "deit_tiny", "num_classes": 5, "kwargs": kwargs,
                          "input_shape": [1, 16, 16, 3]})


def test_vit_gpd_trains_evaluates_resumes_and_exports(tmp_path):
  """DKD + GPD on a tiny DeiT with drop-path (which needs the step's 'dropout' key): finite losses,
  resume reproduces the uninterrupted run (the drop-path masks are a function of the step), and the
  export loads as the plain student."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  for w in (straight, resumed):
    make_vit_teacher(w)
  final = train.train_and_evaluate(tiny_vit_config(steps=4), straight)
  train.train_and_evaluate(tiny_vit_config(steps=2), resumed)
  train.train_and_evaluate(tiny_vit_config(steps=4), resumed)
  val = final["eval"]["val"]
  for key in ("top1_S", "top1_D", "top1_T", "agree_S_D", "top1_S_ema"):
    assert 0.0 <= val[key] <= 100.0, key
  losses = {w: {r["step"]: r["total"] for r in read_metrics(w, "train")} for w in (straight, resumed)}
  assert sorted(losses[straight]) == sorted(losses[resumed]) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in losses[straight].values())
  np.testing.assert_allclose([losses[resumed][s] for s in range(1, 5)],
                             [losses[straight][s] for s in range(1, 5)], rtol=1e-6)
  module, variables, info = checkpoint.load_export(straight)
  assert info["name"] == "deit_tiny" and module.ratio == 1
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  logits = module.apply(variables, x, train=False)
  assert logits.shape == (4, 5) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", ["imagenet_rvt_gpd.py", "imagenet_deit_gpd.py",
                                  "imagenet_vit_ce.py"])
def test_vit_configs_build(name):
  for arg in ("", ":runlocal"):
    c = load_config_file(os.path.join(CONFIG_DIR, name) + arg)
    schedule = optim.make_schedule(c.schedule, steps_per_epoch=10, total_steps=100)
    assert isinstance(optim.make_optimizer(c.optim, schedule), optax.GradientTransformation)
    model = models.create(c.model.name, 1000, **c.model.kwargs)
    assert model.image_size == (64 if arg else 224)
