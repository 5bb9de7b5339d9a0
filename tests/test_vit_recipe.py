"""The ViT data recipe: mixup/cutmix (in the step), soft targets in the objective, RandAugment,
random erasing and repeated augmentation (in the grain pipeline), and the recipe's config values.

Each op is checked against an independent NumPy computation or an exact property; the pipeline is
checked for determinism and resume, and a tiny DeiT trains with the whole recipe and resumes exactly.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from gpd_jax import config_base, data, losses, mixup, train
from gpd_jax.data import preprocess
from gpd_jax.data import rand_augment as ra
from gpd_jax.metric_writer import read_metrics
from gpd_jax.objective import make_objective
from gpd_jax.train import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")


def spec(**kwargs):
  base = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
              num_classes=7)
  return mixup.MixupSpec(**{**base, **kwargs})


def batch(b=6, h=9, w=11, c=3, k=7, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, h, w, c)).astype(np.float32), rng.integers(0, k, b).astype(np.int32))


def numpy_targets(labels, lam, k, eps):
  smooth = np.eye(k)[labels] * (1 - eps) + eps / k
  return lam * smooth + (1 - lam) * smooth[::-1]


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------


def test_mixup_is_the_stated_convex_combination():
  images, labels = batch()
  s = spec(cutmix_alpha=0.0)
  for i in range(5):
    mixed, targets, info = mixup.mix_batch(jax.random.key(i), images, labels, s)
    lam = float(info["lam"])
    assert 0.0 < lam < 1.0 and not bool(info["cutmix"])
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, numpy_targets(labels, lam, 7, 0.1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.sum(targets, -1), 1.0, rtol=1e-6)


def test_cutmix_lambda_is_the_area_share_outside_the_box():
  images, labels = batch(h=16, w=12)
  s = spec(mixup_alpha=0.0)
  seen_clipped = False
  for i in range(20):
    mixed, targets, info = mixup.mix_batch(jax.random.key(i), images, labels, s)
    mixed = np.asarray(mixed)
    assert bool(info["cutmix"])
    pasted = np.all(mixed == images[::-1], axis=(0, 3)) & ~np.all(mixed == images, axis=(0, 3))
    kept = np.all(mixed == images, axis=(0, 3))
    assert np.all(pasted | kept)  # every pixel is either the original or the mirror's
    rows, cols = np.nonzero(pasted)
    area = 0
    if rows.size:  # the pasted pixels form one axis-aligned rectangle
      top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
      assert pasted[top:bottom, left:right].all() and pasted.sum() == (bottom - top) * (right - left)
      area = pasted.sum()
      seen_clipped |= top == 0 or left == 0 or bottom == 16 or right == 12
    lam = float(info["lam"])
    assert lam == pytest.approx(1 - area / (16 * 12), abs=1e-7)
    np.testing.assert_allclose(targets, numpy_targets(labels, lam, 7, 0.1), rtol=1e-6, atol=1e-7)
  assert seen_clipped


def test_cutmix_box_size_follows_lambda():
  for lam in (0.1, 0.36, 0.75, 0.99):
    for i in range(10):
      box = mixup.cutmix_box(jax.random.key(i), jnp.float32(lam), 40, 30)
      top, bottom, left, right = (int(v) for v in box)
      ratio = np.sqrt(np.float32(1) - np.float32(lam))  # float32, as in the step
      cut_h, cut_w = int(np.float32(40) * ratio), int(np.float32(30) * ratio)
      assert 0 <= top <= bottom <= 40 and 0 <= left <= right <= 30
      assert bottom - top <= 2 * (cut_h // 2) and right - left <= 2 * (cut_w // 2)
      if 0 < top and bottom < 40:  # not clipped: exactly the stated side
        assert bottom - top == 2 * (cut_h // 2)


def test_switch_and_prob():
  images, labels = batch()
  s = spec()
  kinds = [bool(mixup.mix_batch(jax.random.key(i), images, labels, s)[2]["cutmix"]) for i in range(200)]
  assert 0.38 < np.mean(kinds) < 0.62  # switch_prob 0.5
  off = spec(prob=0.0)
  for i in range(3):
    mixed, targets, info = mixup.mix_batch(jax.random.key(i), images, labels, off)
    assert float(info["lam"]) == 1.0
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(targets, numpy_targets(labels, 1.0, 7, 0.1), rtol=1e-6)


def test_mixup_spec_from_config():
  c = config_base.base_config()
  assert mixup.mixup_spec(c, 10) is None  # off by default
  c = config_base.vit_recipe(config_base.base_config(), model="deit_tiny")
  assert mixup.mixup_spec(c, 1000) == mixup.MixupSpec(0.8, 1.0, 1.0, 0.5, 0.1, 1000)


# ---------------------------------------------------------------------------------------------
# The objective with soft targets
# ---------------------------------------------------------------------------------------------


def numpy_soft_ce(z, q):
  z = z - z.max(-1, keepdims=True)
  return -(q * (z - np.log(np.exp(z).sum(-1, keepdims=True)))).sum(-1)


def objective_config(base):
  c = config_base.base_config()
  c.loss.base = base
  c.loss.label_smoothing = 0.1
  config_base.gpd_on(c, ratio=2, branches=False)
  return c


def test_objective_soft_targets():
  rng = np.random.default_rng(1)
  k, b = 7, 6
  z_s, z_d, z_t = (rng.normal(size=(b, k)).astype(np.float32) * 2 for _ in range(3))
  labels = np.arange(b, dtype=np.int32) % k
  lam = 0.3  # the mirror dominates: argmax(target) = flip(labels)
  targets = numpy_targets(labels, lam, k, 0.1).astype(np.float32)
  mixed_labels = np.argmax(targets, -1)
  assert np.all(mixed_labels == labels[::-1]) and np.any(mixed_labels != labels)
  c = objective_config("dkd")
  objective = make_objective(c.loss, c.gpd)
  logits = {"student": z_s, "dt": z_d, "teacher": z_t}
  _, terms = objective(logits, labels, step=0, targets=targets)
  np.testing.assert_allclose(terms["ce_S"], numpy_soft_ce(z_s, targets).mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["ce_D"], numpy_soft_ce(z_d, targets).mean(), rtol=1e-5)
  dkd = lambda z, y: float(np.mean(losses.dkd(z, z_t, y, alpha=1.0, beta=8.0, temperature=4.0)))
  assert terms["kd_S"] == pytest.approx(dkd(z_s, mixed_labels), rel=1e-6)
  assert terms["kd_D"] == pytest.approx(dkd(z_d, mixed_labels), rel=1e-6)
  assert abs(terms["kd_S"] - dkd(z_s, labels)) > 1e-3  # the mask really moved
  assert terms["acc_S"] == pytest.approx(np.mean(np.argmax(z_s, -1) == labels))  # unmixed labels
  # Without targets: the hard-label objective, unchanged.
  _, hard = objective(logits, labels, step=0)
  np.testing.assert_allclose(hard["ce_S"], numpy_soft_ce(z_s, numpy_targets(labels, 1.0, k, 0.1)).mean(),
                             rtol=1e-5)
  assert hard["kd_S"] == pytest.approx(dkd(z_s, labels), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# RandAugment and random erasing
# ---------------------------------------------------------------------------------------------


def test_parse_rand_augment():
  p = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert (p.magnitude, p.magnitude_std, p.num_ops, p.ops) == (9.0, 0.5, 2, ra.INCREASING_OPS)
  assert len(p.ops) == 15 and "SolarizeIncreasing" in p.ops
  p = ra.parse_rand_augment("rand-m7-n3")
  assert (p.magnitude, p.magnitude_std, p.num_ops, p.ops) == (7.0, 0.0, 3, ra.DEFAULT_OPS)
  for bad in ("auto-m9", "rand-mstd0.5", "rand-m9-q2", "rand-m11"):
    with pytest.raises(ValueError, match="config.dataset.rand_augment"):
      ra.parse_rand_augment(bad)


def test_pixel_ops_against_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
  pil = Image.fromarray(image)
  run = lambda name, arg: np.asarray(ra.apply_op(pil, name, arg, (1, 2, 3)))
  np.testing.assert_array_equal(run("Invert", None), 255 - image)
  np.testing.assert_array_equal(run("SolarizeIncreasing", 100), np.where(image >= 100, 255 - image, image))
  np.testing.assert_array_equal(run("PosterizeIncreasing", 2), image & 0b11000000)
  added = np.where(image < 128, np.minimum(image.astype(int) + 50, 255), image)
  np.testing.assert_array_equal(run("SolarizeAdd", 50), added)
  lo, hi = image.min(axis=(0, 1)), image.max(axis=(0, 1))  # autocontrast: per-channel stretch
  stretched = np.asarray(ra.apply_op(pil, "AutoContrast", None, 0))
  assert np.all(stretched.min(axis=(0, 1)) == 0) and np.all(stretched.max(axis=(0, 1)) == 255)
  assert np.all(lo < hi)
  # Brightness blends with black: x·f, rounded and clipped (f = 1 is the identity).
  np.testing.assert_array_equal(run("BrightnessIncreasing", 1.0), image)
  np.testing.assert_allclose(run("BrightnessIncreasing", 0.5), image * 0.5, atol=1.0)


def test_geometric_ops_shift_and_fill():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
  pil = Image.fromarray(image)
  fill = (11, 22, 33)
  # TranslateXRel 0.3 of width 10 = 3 pixels: output(x, y) = input(x + 3, y).
  out = np.asarray(ra.apply_op(pil, "TranslateXRel", 0.3, fill))
  np.testing.assert_array_equal(out[:, :7], image[:, 3:])
  np.testing.assert_array_equal(out[:, 7:], np.broadcast_to(fill, (10, 3, 3)))
  out = np.asarray(ra.apply_op(pil, "TranslateYRel", -0.2, fill))
  np.testing.assert_array_equal(out[2:], image[:8])
  np.testing.assert_array_equal(out[:2], np.broadcast_to(fill, (2, 10, 3)))
  np.testing.assert_array_equal(np.asarray(ra.apply_op(pil, "Rotate", 0.0, fill)), image)
  np.testing.assert_array_equal(np.asarray(ra.apply_op(pil, "ShearX", 0.0, fill)), image)
  gray = Image.fromarray(image[..., 0], mode="L")
  out = np.asarray(ra.apply_op(gray, "TranslateXRel", 0.3, 7))
  np.testing.assert_array_equal(out[:, 7:], 7)


def test_levels_at_magnitude_9():
  rng = np.random.default_rng(0)
  m = 9.0
  assert ra.op_argument("PosterizeIncreasing", m, rng) == 4 - int(4 * 0.9) == 1
  assert ra.op_argument("SolarizeIncreasing", m, rng) == 256 - int(256 * 0.9) == 26
  assert ra.op_argument("SolarizeAdd", m, rng) == int(110 * 0.9) == 99
  assert ra.op_argument("Posterize", m, rng) == 3 and ra.op_argument("Solarize", m, rng) == 230
  for name, value in (("Rotate", 27.0), ("ShearX", 0.27), ("TranslateYRel", 0.405)):
    got = {round(ra.op_argument(name, m, rng), 6) for _ in range(50)}
    assert got == {value, -value}, name
  got = {round(ra.op_argument("ContrastIncreasing", m, rng), 6) for _ in range(50)}
  assert got == {1.81, 0.19}
  assert ra.op_argument("Contrast", m, rng) == pytest.approx(1.72)
  assert ra.op_argument("Invert", m, rng) is None


def test_magnitude_noise_and_op_draws():
  policy = ra.parse_rand_augment("rand-m9-mstd0.5-inc1")
  rng = np.random.default_rng(0)
  levels = np.array([ra.sample_level(policy, rng) for _ in range(20000)])
  assert levels.max() == 10.0 and levels.min() > 6.0  # clipped at the top of the 0-10 scale
  # The clipped normal: P(level = 10) = P(N(9, 0.5²) >= 10) = 1 - Φ(2) ≈ 0.02275.
  assert np.mean(levels == 10.0) == pytest.approx(0.02275, abs=0.004)
  unclipped = levels[levels < 10.0]
  assert unclipped.mean() == pytest.approx(9.0 - 0.5 * 0.05399 / 0.97725, abs=0.01)
  # Two draws with replacement, each applied with probability 1/2.
  calls = []

  def record(pil, name, arg, fill):
    calls.append(name)
    return pil

  image = np.zeros((4, 4, 3), np.uint8)
  counts, repeats = [], []
  for i in range(4000):
    before = len(calls)
    ra.rand_augment(image, policy, np.random.default_rng(i), fill=(0, 0, 0), apply=record)
    counts.append(len(calls) - before)
    if counts[-1] == 2:
      repeats.append(calls[-1] == calls[-2])
  assert np.mean(counts) == pytest.approx(1.0, abs=0.05)  # 2 × 1/2
  assert np.mean(np.array(counts) == 2) == pytest.approx(0.25, abs=0.03)
  assert np.mean(repeats) == pytest.approx(1 / 15, abs=0.03)  # drawn with replacement
  assert set(calls) == set(ra.INCREASING_OPS)


def test_random_erase():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(32, 24, 3)).astype(np.float32) + 100.0  # far from N(0, 1)
  erased_share, erased = [], 0
  for i in range(400):
    out = ra.random_erase(image, 0.25, np.random.default_rng(i))
    changed = np.any(out != image, axis=-1)
    if not changed.any():
      continue
    erased += 1
    rows, cols = np.nonzero(changed)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    h, w = bottom - top, right - left
    assert changed.sum() == h * w and h < 32 and w < 24  # one box, strictly inside
    assert 0.02 * 0.7 <= h * w / (32 * 24) <= 1 / 3 * 1.3  # the stated area range, up to rounding
    box = out[top:bottom, left:right]
    assert np.all(np.abs(box) < 10)  # per-pixel N(0, 1) noise replaced every channel
    erased_share.append(box)
  assert erased / 400 == pytest.approx(0.25, abs=0.06)
  noise = np.concatenate([b.ravel() for b in erased_share])
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
  np.testing.assert_array_equal(ra.random_erase(image, 0.0, rng), image)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def synthetic_config(**dataset):
  fields = dict(name="synthetic", image_shape=(20, 20, 3), num_classes=7, image_size=16,
                augment="imagenet", train_split="train", eval_splits={"test": "test"},
                synthetic_sizes={"train": 60, "test": 20}, num_threads=0)
  return ml_collections.ConfigDict(dict(seed=3, batch_size=12, eval_batch_size=8,
                                        dataset={**fields, **dataset}))


def take(it, n):
  return [next(it) for _ in range(n)]


def test_repeated_augmentation_layout():
  config = synthetic_config(augment="none", repeated_augmentations=3)
  batches = take(data.create_train_iterator(config), 10)  # 5 steps per epoch: 2 epochs
  for b in batches:
    images = b["image"]
    for copy in (1, 2):  # copy-major: rows [4c, 4c + 4) repeat rows [0, 4)
      np.testing.assert_array_equal(images[4 * copy:4 * copy + 4], images[:4])
      np.testing.assert_array_equal(b["label"][4 * copy:4 * copy + 4], b["label"][:4])
    distinct = {images[i].tobytes() for i in range(4)}
    assert len(distinct) == 4
  # With 4 devices (3 rows each) the three copies of an image sit on three different devices.
  rows = np.arange(12)
  for image in range(4):
    devices = {r // 3 for r in rows if r % 4 == image}
    assert len(devices) == 3
  # Each epoch draws 20 distinct images (5 batches × 4); the next epoch is reshuffled.
  first = [b["image"][i].tobytes() for b in batches[:5] for i in range(4)]
  second = [b["image"][i].tobytes() for b in batches[5:] for i in range(4)]
  assert len(set(first)) == 20 and first != second
  # A batch that 3 does not divide: ceil(10/3) = 4 images, the last copy cut to 2 rows.
  config = synthetic_config(augment="none", repeated_augmentations=3)
  config.batch_size = 10
  b = next(data.create_train_iterator(config))
  np.testing.assert_array_equal(b["image"][4:8], b["image"][:4])
  np.testing.assert_array_equal(b["image"][8:], b["image"][:2])


def test_repeated_copies_are_augmented_differently():
  config = synthetic_config(repeated_augmentations=3, rand_augment="rand-m9-mstd0.5-inc1",
                            random_erase_prob=0.25)
  b = next(data.create_train_iterator(config))
  for i in range(4):
    assert not np.array_equal(b["image"][i], b["image"][i + 4])
  np.testing.assert_array_equal(b["label"][4:8], b["label"][:4])
  # RandAugment alone (no crop or flip) also changes the copies: it runs in the pipeline.
  plain = next(data.create_train_iterator(synthetic_config(augment="none", repeated_augmentations=3)))
  augmented = next(data.create_train_iterator(synthetic_config(
      augment="none", repeated_augmentations=3, rand_augment="rand-m9-mstd0.5-inc1")))
  assert sum(np.array_equal(augmented["image"][i], augmented["image"][i + 4]) for i in range(8)) < 4
  assert not np.array_equal(plain["image"], augmented["image"])


def test_recipe_pipeline_is_deterministic_and_resumes():
  config = synthetic_config(repeated_augmentations=3, rand_augment="rand-m9-mstd0.5-inc1",
                            random_erase_prob=0.25)
  reference = take(data.create_train_iterator(config), 9)
  again = take(data.create_train_iterator(config), 9)
  for x, y in zip(reference, again):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert reference[0]["image"].dtype == np.float32 and reference[0]["image"].shape == (12, 16, 16, 3)
  it = data.create_train_iterator(config)
  take(it, 6)  # past the epoch boundary (5 steps per epoch)
  resumed = data.create_train_iterator(config)
  resumed.set_state(it.get_state())
  for want in reference[6:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_erasing_normalizes_per_example_exactly_as_the_batch_does():
  """Per-example normalization (needed before erasing) is bitwise the batch normalization."""
  plain = synthetic_config(rand_augment="rand-m9-mstd0.5-inc1")
  erase = synthetic_config(rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=1e-12)
  a, b = next(data.create_train_iterator(plain)), next(data.create_train_iterator(erase))
  np.testing.assert_array_equal(a["image"], b["image"])  # p ≈ 0: nothing erased, same draws


def test_cnn_augmentation_is_unchanged():
  """The recipe's fields at their defaults leave the per-example draws as they were."""
  record = {"image": np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": 3}
  a = preprocess.train_example(record, np.random.default_rng(5), augment="cifar", image_size=28,
                               crop_padding=2)
  rng = np.random.default_rng(5)
  padded = np.pad(record["image"], ((2, 2), (2, 2), (0, 0)))
  top, left = rng.integers(0, 5, size=2)
  want = padded[top:top + 28, left:left + 28]
  want = want[:, ::-1] if rng.random() < 0.5 else want
  np.testing.assert_array_equal(a["image"], want)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet_rvt_gpd.py", "imagenet_deit_gpd.py", "imagenet_vit_ce.py"])
def test_vit_configs_carry_the_published_augmentation(name):
  """DeiT / RVT (timm): rand-m9-mstd0.5-inc1, reprob 0.25, mixup 0.8, cutmix 1.0, switch 0.5,
  mixup prob 1, smoothing 0.1, repeated augmentation 3."""
  c = load_config_file(os.path.join(CONFIG_DIR, name))
  d = c.dataset
  assert (d.rand_augment, d.random_erase_prob, d.repeated_augmentations) == (
      "rand-m9-mstd0.5-inc1", 0.25, 3)
  assert (d.mixup_alpha, d.cutmix_alpha, d.mixup_prob, d.mixup_switch_prob) == (0.8, 1.0, 1.0, 0.5)
  assert c.loss.label_smoothing == 0.1 and d.augment == "imagenet"
  base = config_base.base_config().dataset
  assert (base.rand_augment, base.random_erase_prob, base.repeated_augmentations, base.mixup_alpha,
          base.cutmix_alpha) == ("", 0.0, 1, 0.0, 0.0)  # off by default


def recipe_vit_config(steps):
  import test_vit_train  # the tiny DeiT of the ViT training tests
  c = test_vit_train.tiny_vit_config(steps=steps, devices=4)
  c.batch_size = 12
  c.dataset.synthetic_sizes = {"train": 48, "validation": 12}
  c.dataset.augment = "imagenet"
  for key, value in dict(rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25,
                         repeated_augmentations=3, mixup_alpha=0.8, cutmix_alpha=1.0).items():
    c.dataset[key] = value
  return c


def test_tiny_deit_trains_with_the_recipe_and_resumes_exactly(tmp_path):
  """DKD + GPD with the whole ViT data recipe: the mixing changes per step (a function of the
  step), and a run resumed from step 2 logs exactly the losses of the uninterrupted one."""
  import test_vit_train
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  for w in (straight, resumed):
    test_vit_train.make_vit_teacher(w)
  train.train_and_evaluate(recipe_vit_config(4), straight)
  train.train_and_evaluate(recipe_vit_config(2), resumed)
  train.train_and_evaluate(recipe_vit_config(4), resumed)
  logs = {w: {r["step"]: r for r in read_metrics(w, "train")} for w in (straight, resumed)}
  assert sorted(logs[straight]) == sorted(logs[resumed]) == [1, 2, 3, 4]
  for step in range(1, 5):
    for key in ("total", "ce_S", "kd_S", "sce_S", "mix_lam", "mix_cutmix"):
      assert logs[resumed][step][key] == logs[straight][step][key], (step, key)
  lams = [logs[straight][s]["mix_lam"] for s in range(1, 5)]
  assert len(set(lams)) == 4 and all(0.0 <= lam <= 1.0 for lam in lams)
