"""Tests for the models' feature taps (``return_features=True``).

* Shapes of every tap for every model family at its real size, for the student, the DT (×r wide)
  and the branched student view; the expected shapes are written out from the architectures.
* The option changes nothing else: same variable tree, same logits.
* The IR invariant holds for every tap: DT features = r copies of the student's / r (eval and train
  BN); the student view's features are the student's own (equal to the plain student's, and to the
  CBR-exported student's when the DT has OREPA branches).
* A feature loss's gradient reaches only what it should: the student slice of the DT's parameters
  (never the other copies), the connector, not the classifier, not the teacher.

Tiny variants with random parameters and BN statistics keep the numeric tests cheap; tolerances are
float32 ones relative to the tap's magnitude (``max|a - b| <= 1e-5 · max(1, max|b|)``).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import feature_losses as fl
from gpd_jax import models
from gpd_jax import transforms

TOL = 1e-5
NUM_CLASSES = 5
BATCH = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}

TAPS = ("stem", "preact_stem", "stages", "preact_stages", "pooled")


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def tap_list(features):
  """[(tap name, array)] of every tap of a ``Features``."""
  out = []
  for name in TAPS:
    value = getattr(features, name)
    if isinstance(value, tuple):
      out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    else:
      out.append((name, value))
  return out


# ---------------------------------------------------------------------------------------------
# Shapes at the real sizes (eval_shape: no compute)
# ---------------------------------------------------------------------------------------------

IMAGENET_RESNET_STAGES = ((56, 56), (28, 28), (14, 14), (7, 7))
CIFAR_STAGES = ((32, 32), (16, 16), (8, 8))
# name -> (image size, stem (H, W, C), stage widths, stage sizes)
EXPECTED = {
    "resnet18": (224, (112, 112, 64), (64, 128, 256, 512), IMAGENET_RESNET_STAGES),
    "resnet34": (224, (112, 112, 64), (64, 128, 256, 512), IMAGENET_RESNET_STAGES),
    "resnet50": (224, (112, 112, 64), (256, 512, 1024, 2048), IMAGENET_RESNET_STAGES),
    # MobileNetV1: the stem-resolution tap is block 0 (64 wide at 112×112), then blocks 2, 4, 10, 12.
    "mobilenet_v1": (224, (112, 112, 64), (128, 256, 512, 1024), IMAGENET_RESNET_STAGES),
    "resnet8": (32, (32, 32, 16), (16, 32, 64), CIFAR_STAGES),
    "resnet20": (32, (32, 32, 16), (16, 32, 64), CIFAR_STAGES),
    "resnet8x4": (32, (32, 32, 32), (64, 128, 256), CIFAR_STAGES),
    "resnet32x4": (32, (32, 32, 32), (64, 128, 256), CIFAR_STAGES),
    "wrn_16_2": (32, (32, 32, 16), (32, 64, 128), CIFAR_STAGES),
    "wrn_40_2": (32, (32, 32, 16), (32, 64, 128), CIFAR_STAGES),
}


@functools.lru_cache(maxsize=None)
def traced(name: str, ratio: int, branches: bool, return_features: bool):
  """(variable shapes, output shapes) of ``name`` on one image batch (eval_shape)."""
  size = EXPECTED[name][0]
  model = models.create(name, NUM_CLASSES, ratio=ratio, branches=branches,
                        return_features=return_features)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  return variables, out


# Every model as the student; one model per family as the DT (r = 2) and as the branched view.
SHAPE_CASES = ([(name, 1, False) for name in sorted(EXPECTED)]
               + [(name, ratio, branches) for name in ("resnet18", "mobilenet_v1", "resnet8x4",
                                                       "wrn_16_2")
                  for ratio, branches in ((2, False), (1, True))])


@pytest.mark.parametrize("name, ratio, branches", SHAPE_CASES)
def test_feature_shapes(name, ratio, branches):
  """Every tap's shape: the student's widths, ×r in the DT, the student's in the branched view."""
  _, stem, widths, sizes = EXPECTED[name]
  logits, feats = traced(name, ratio, branches, True)[1]
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  expected_stem = (2, stem[0], stem[1], stem[2] * ratio)
  assert feats.stem.shape == feats.preact_stem.shape == expected_stem
  expected_stages = tuple((2, h, w, c * ratio) for (h, w), c in zip(sizes, widths))
  assert tuple(s.shape for s in feats.stages) == expected_stages
  assert tuple(s.shape for s in feats.preact_stages) == expected_stages
  assert feats.pooled.shape == (2, widths[-1] * ratio)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v1", "resnet8x4", "wrn_16_2"])
def test_return_features_keeps_the_variables_and_the_default_output(name):
  """Same variable tree (names, shapes) with or without the option; the default returns logits."""
  plain_vars, plain_out = traced(name, 1, False, False)
  feat_vars, (logits, _) = traced(name, 1, False, True)
  assert jax.tree.structure(plain_vars) == jax.tree.structure(feat_vars)
  assert jax.tree.map(lambda s: s.shape, plain_vars) == jax.tree.map(lambda s: s.shape, feat_vars)
  assert isinstance(plain_out, jax.ShapeDtypeStruct) and plain_out.shape == logits.shape


# ---------------------------------------------------------------------------------------------
# Numerics on tiny variants
# ---------------------------------------------------------------------------------------------

# family -> (registry name, tiny-variant kwargs, input size); every family of the zoo.
FAMILIES = {
    "resnet_basic": ("resnet18", dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=4), 32),
    "resnet_bottleneck": ("resnet50", dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=8), 32),
    "mobilenet_v1": ("mobilenet_v1", dict(stem_width=4, blocks=((8, 1), (8, 2), (16, 1))), 32),
    "cifar_resnet": ("resnet8", dict(widths=(4, 4, 8, 8)), 16),
    "wrn": ("wrn_16_1", dict(depth=10), 16),
}


def input_batch(family: str):
  size = FAMILIES[family][2]
  return jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, size, size, 3)), jnp.float32)


def randomise(variables, seed: int):
  """Random BN affine and running statistics (so that no BN is the identity); kernels keep init."""
  rs = np.random.default_rng(seed)

  def fill(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return jnp.asarray(rs.uniform(0.5, 2.0, a.shape), a.dtype)
    if name == "scale":
      return jnp.asarray(rs.uniform(0.5, 1.5, a.shape), a.dtype)
    if name in ("bias", "mean"):
      return jnp.asarray(0.1 * rs.normal(size=a.shape), a.dtype)
    return a

  return jax.tree_util.tree_map_with_path(fill, variables)


@functools.lru_cache(maxsize=None)
def student(family: str):
  """(feature-returning student module, random variables)."""
  name, kwargs, _ = FAMILIES[family]
  model = models.create(name, NUM_CLASSES, return_features=True, **kwargs)
  variables = model.init(jax.random.key(0), input_batch(family), train=False)
  return model, randomise(variables, sorted(FAMILIES).index(family))


@functools.lru_cache(maxsize=None)
def apply_fn(model):
  """Jitted (variables, x) -> (eval (logits, feats), train (logits, feats))."""
  def run(variables, x):
    eval_out = model.apply(variables, x, train=False)
    train_out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return eval_out, train_out
  return jit(run)


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = float(np.max(np.abs(actual - expected)))
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert err <= TOL * scale, f"{what}: max abs diff {err:.3g} > {TOL * scale:.3g}"


def tile_over_copies(x, ratio):
  """The IR invariant for an activation: r copies of x / r along channels, copy-major."""
  return np.concatenate([np.asarray(x) / ratio] * ratio, axis=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dt_features_are_r_copies_of_the_students_over_r(family):
  """Function-preserving IR (noise 0, r = 3): every DT tap = tile(student tap / r), eval and train."""
  model, variables = student(family)
  x = input_batch(family)
  ratio = 3
  dt_variables = jit(lambda v: transforms.expand(
      model, v, ratio=ratio, rng=jax.random.key(3), noise_std=0.0, sample_input=x)[1])(variables)
  dt_model = model.clone(ratio=ratio)
  for mode, (s_out, d_out) in zip(("eval", "train"), zip(apply_fn(model)(variables, x),
                                                          apply_fn(dt_model)(dt_variables, x))):
    assert_close(d_out[0], s_out[0], f"{mode} logits")
    s_taps, d_taps = tap_list(s_out[1]), tap_list(d_out[1])
    assert [n for n, _ in s_taps] == [n for n, _ in d_taps]
    for (tap, s), (_, d) in zip(s_taps, d_taps):
      assert d.shape[-1] == ratio * s.shape[-1]
      assert_close(d, tile_over_copies(s, ratio), f"{mode} {tap}")


@pytest.mark.parametrize("branches", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_student_view_features_are_the_students_own(family, branches):
  """The student view of a DT returns the student's features (student widths, student values).

  Without branches (IR noise 0) they equal the original student's, in eval and train mode. With
  OREPA branches and IR noise, they equal those of the plain student that CBR exports (eval mode).
  """
  model, variables = student(family)
  x = input_batch(family)
  stats = variables["batch_stats"]
  ratio = 2

  def view_of_expanded(v):
    dt_model, dt_vars = transforms.expand(model, v, ratio=ratio, rng=jax.random.key(5),
                                          noise_std=1e-3 if branches else 0.0, branches=branches,
                                          pretrained=False, sample_input=x)
    dt_params = {c: a for c, a in dt_vars.items() if c != "batch_stats"}
    view_model, view_params = transforms.student_view(dt_model, dt_params, sample_input=x)
    plain_model, plain_vars = transforms.export_student(dt_model, dt_vars, stats, sample_input=x)
    modules.extend([view_model, plain_model])
    return view_params, plain_vars

  modules = []
  view_params, plain_vars = jit(view_of_expanded)(variables)
  view_model, plain_model = modules
  assert view_model.ratio == 1 and view_model.branches == branches and view_model.return_features
  view_out = apply_fn(view_model)({**view_params, "batch_stats": stats}, x)
  if branches:
    references = {"eval": apply_fn(plain_model)(plain_vars, x)[0]}
  else:
    references = dict(zip(("eval", "train"), apply_fn(model)(variables, x)))
  for mode, ref in references.items():
    got = view_out[0] if mode == "eval" else view_out[1]
    assert_close(got[0], ref[0], f"{mode} logits")
    for (tap, v), (_, r) in zip(tap_list(got[1]), tap_list(ref[1])):
      assert_close(v, r, f"{mode} {tap}")


# Two blocks per stage, so that "the stage's last block" is not also its first.
TAP_MODELS = {
    "resnet_basic": ("resnet18", dict(stage_sizes=(2, 1), widths=(4, 8), stem_width=4), 32),
    "resnet_bottleneck": ("resnet50", dict(stage_sizes=(2, 1), widths=(4, 8), stem_width=8), 32),
    "cifar_resnet": ("resnet14", dict(widths=(4, 4, 8, 8)), 16),
    "wrn": ("wrn_16_1", dict(), 16),
    # Strides of the standard MobileNetV1 pattern, small widths: taps after blocks 0 (stem), 2, 4, 7, 9.
    "mobilenet_v1": ("mobilenet_v1", dict(stem_width=4, blocks=(
        (8, 1), (8, 2), (8, 1), (16, 2), (16, 1), (16, 2), (16, 1), (16, 1), (32, 2), (32, 1))), 32),
}


@pytest.mark.parametrize("family", sorted(TAP_MODELS))
def test_taps_are_the_published_tensors(family):
  """Each tap is the tensor the reference code taps, read off the module outputs Flax captures."""
  name, kwargs, size = TAP_MODELS[family]
  model = models.create(name, NUM_CLASSES, return_features=True, **kwargs)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, size, size, 3)), jnp.float32)
  variables = randomise(model.init(jax.random.key(0), x, train=False), 7)
  (logits, feats), state = jit(lambda v: model.apply(
      v, x, train=False, capture_intermediates=True, mutable=["intermediates"]))(variables)
  out = lambda *path: functools.reduce(lambda d, k: d[k], path, state["intermediates"])["__call__"][0]
  if family in ("resnet_basic", "resnet_bottleneck", "cifar_resnet"):
    last_blocks = (["layer1_1", "layer2_0"] if family != "cifar_resnet" else
                   ["layer1_1", "layer2_1", "layer3_1"])
    assert_close(feats.preact_stem, out("bn1"), "preact_stem")
    for i, block in enumerate(last_blocks):
      assert_close(feats.stages[i], out(block)[0], f"stages[{i}]")
    expected_pooled = np.mean(np.asarray(feats.stages[-1]), axis=(1, 2))
  elif family == "wrn":
    assert_close(feats.stem, out("conv1"), "stem")
    assert_close(feats.preact_stem, feats.stem, "preact_stem")
    for i, block in enumerate(["block1_1", "block2_1", "block3_1"]):
      assert_close(feats.stages[i], out(block)[0], f"stages[{i}]")
    # Pre-activations: the BN in front of the next ReLU (next group's first block, then the final BN).
    for i, bn in enumerate([("block2_0", "bn1"), ("block3_0", "bn1"), ("bn",)]):
      assert_close(feats.preact_stages[i], out(*bn), f"preact_stages[{i}]")
    expected_pooled = np.mean(np.maximum(np.asarray(feats.preact_stages[-1]), 0), axis=(1, 2))
  else:
    assert_close(feats.preact_stem, out("block0_pw_bn"), "preact_stem")
    for i, block in enumerate([2, 4, 7, 9]):
      assert_close(feats.preact_stages[i], out(f"block{block}_pw_bn"), f"preact_stages[{i}]")
    expected_pooled = np.mean(np.asarray(feats.stages[-1]), axis=(1, 2))
  if family != "wrn":  # stages end in a ReLU: the preact is its input and has negative entries
    pairs = [("stem", feats.stem, feats.preact_stem)] + [
        (f"stages[{i}]", s, p) for i, (s, p) in enumerate(zip(feats.stages, feats.preact_stages))]
    for tap, post, pre in pairs:
      assert float(np.min(pre)) < 0, tap
      assert_close(post, np.maximum(np.asarray(pre), 0), tap)
  assert_close(feats.pooled, expected_pooled, "pooled")
  fc = variables["params"]["fc"]
  assert_close(logits, np.asarray(feats.pooled) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]),
               "logits from pooled")


# ---------------------------------------------------------------------------------------------
# Where a feature loss's gradient goes
# ---------------------------------------------------------------------------------------------


def copy0_mask(shape, tiled_axes, ratio):
  """True on the student's slice (copy 0 along every tiled axis) of a DT leaf."""
  mask = np.ones(shape, bool)
  for axis in tiled_axes:
    index = [slice(None)] * len(shape)
    index[axis] = slice(shape[axis] // ratio, None)
    mask[tuple(index)] = False
  return mask


@pytest.mark.parametrize("family", ["cifar_resnet", "mobilenet_v1"])
def test_reviewkd_gradient_reaches_only_the_student_slice_and_the_connector(family):
  """ReviewKD on the student view of a branched DT: d loss / d DT params is zero outside the
  student's slice and on the classifier, nonzero on the stages; the connector learns; the teacher
  gets nothing."""
  model, variables = student(family)
  x = input_batch(family)
  ratio = 2
  dt_vars = jit(lambda v: transforms.expand(model, v, ratio=ratio, rng=jax.random.key(1),
                                            noise_std=1e-3, branches=True, pretrained=False,
                                            sample_input=x)[1])(variables)
  dt_model = model.clone(ratio=ratio, branches=True)
  dt_params = {c: a for c, a in dt_vars.items() if c != "batch_stats"}
  stats = variables["batch_stats"]
  view_model = dt_model.clone(ratio=1)
  s_levels = jax.eval_shape(lambda: fl.review_levels(view_model.apply(
      {**transforms.student_view(dt_model, dt_params, sample_input=x)[1], "batch_stats": stats},
      x, train=False)[1], preact=True))
  rs = np.random.default_rng(0)
  t_levels = tuple(jnp.asarray(rs.normal(size=(*a.shape[:-1], 2 * a.shape[-1])), jnp.float32)
                   for a in s_levels)  # a teacher twice as wide
  fusion = fl.ReviewKDFusion(out_features=tuple(a.shape[-1] for a in t_levels), mid_features=8)
  fusion_vars = jit(lambda: fusion.init(
      jax.random.key(2), tuple(jnp.zeros(a.shape) for a in s_levels), train=False))()

  def loss_fn(dt_p, fusion_p, teacher):
    _, view_p = transforms.student_view(dt_model, dt_p, sample_input=x)
    (_, feats), _ = view_model.apply({**view_p, "batch_stats": stats}, x, train=True,
                                     mutable=["batch_stats"])
    fused, _ = fusion.apply({**fusion_vars, "params": fusion_p},
                            fl.review_levels(feats, preact=True), train=True,
                            mutable=["batch_stats"])
    return fl.hcl_loss(fused, teacher)

  g_dt, g_fusion, g_teacher = jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(
      dt_params, fusion_vars["params"], t_levels)
  spec = transforms.derive_spec(model.clone(branches=True), ratio, tuple(x.shape))
  nonzero_outside, nonzero_inside = [], []
  for key, g in transforms.flatten(g_dt).items():
    g = np.asarray(g)
    mask = copy0_mask(g.shape, spec.leaves[key].tiled_axes, ratio)
    if np.any(g[~mask] != 0):
      nonzero_outside.append(key)
    if np.any(g[mask] != 0):
      nonzero_inside.append(key)
  assert not nonzero_outside, f"gradient outside the student slice: {nonzero_outside[:5]}"
  assert not [k for k in nonzero_inside if "/fc/" in k], "the classifier got a feature-loss gradient"
  assert "params/conv1/kernel" in nonzero_inside
  assert len(nonzero_inside) > len(transforms.flatten(g_dt)) // 2
  for key, g in transforms.flatten(g_fusion).items():
    if key.endswith("kernel"):
      assert np.any(np.asarray(g) != 0), key
  assert all(not np.any(np.asarray(g)) for g in g_teacher)

  # The DT's own term (its ×r features through its own connector) reaches every copy, not the head.
  dt_levels = jax.eval_shape(lambda: fl.review_levels(
      dt_model.apply({**dt_params, "batch_stats": dt_vars["batch_stats"]}, x, train=False)[1],
      preact=True))
  dt_fusion_vars = jit(lambda: fusion.init(
      jax.random.key(3), tuple(jnp.zeros(a.shape) for a in dt_levels), train=False))()

  def dt_loss_fn(dt_p):
    (_, feats), _ = dt_model.apply({**dt_p, "batch_stats": dt_vars["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
    fused, _ = fusion.apply(dt_fusion_vars, fl.review_levels(feats, preact=True), train=True,
                            mutable=["batch_stats"])
    return fl.hcl_loss(fused, t_levels)

  g_dt = transforms.flatten(jit(jax.grad(dt_loss_fn))(dt_params))
  assert not [k for k, g in g_dt.items() if "/fc/" in k and np.any(np.asarray(g))]
  kernel = np.asarray(g_dt["params/conv1/kernel"])
  assert np.any(kernel[..., kernel.shape[-1] // ratio:] != 0), "the DT's other copies got nothing"


# ---------------------------------------------------------------------------------------------
# ReviewKD connectors of the published GPD recipes (shapes only)
# ---------------------------------------------------------------------------------------------


def abf_param_count(c_in, mid, out, fuse):
  """conv1 (1×1, no bias) + BN, [attention 1×1 conv 2·mid -> 2 with bias], conv2 (3×3) + BN."""
  return c_in * mid + 2 * mid + (2 * mid * 2 + 2 if fuse else 0) + 9 * mid * out + 2 * out


@pytest.mark.parametrize("student, teacher, in_widths, out_widths, mid", [
    ("resnet18", "resnet34", (64, 128, 256, 512, 512), (64, 128, 256, 512, 512), 512),
    ("mobilenet_v1", "resnet50", (128, 256, 512, 1024, 1024), (256, 512, 1024, 2048, 2048), 256),
])
def test_reviewkd_gpd_connectors_fit_the_published_pairs(student, teacher, in_widths, out_widths, mid):
  """The student's and the DT's (×2 inputs) ABF stacks map their levels onto the teacher's
  pre-ReLU levels, with the reference's parameter count."""
  x = jnp.zeros((2, 224, 224, 3))
  levels = {}
  for key, name, ratio in (("student", student, 1), ("dt", student, 2), ("teacher", teacher, 1)):
    model = models.create(name, 1000, ratio=ratio, return_features=True)
    levels[key] = traced_levels(model, x)
  assert tuple(a.shape[-1] for a in levels["student"]) == in_widths
  assert tuple(a.shape[-1] for a in levels["dt"]) == tuple(2 * c for c in in_widths)
  assert tuple(a.shape[-1] for a in levels["teacher"]) == out_widths
  fusion = fl.ReviewKDFusion(out_features=out_widths, mid_features=mid)
  for key, ratio in (("student", 1), ("dt", 2)):
    inputs = tuple(jnp.zeros(a.shape) for a in levels[key])
    variables = jax.eval_shape(lambda: fusion.init(jax.random.key(0), inputs, train=False))
    fused = jax.eval_shape(lambda v: fusion.apply(v, inputs, train=False), variables)
    assert [f.shape for f in fused] == [a.shape for a in levels["teacher"]]
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(variables["params"]))
    expected = sum(abf_param_count(ratio * c, mid, o, fuse=i < len(in_widths) - 1)
                   for i, (c, o) in enumerate(zip(in_widths, out_widths)))
    assert count == expected


def traced_levels(model, x):
  """ReviewKD levels (pre-ReLU stages + pooled 1×1) of ``model`` on ``x``, as ShapeDtypeStructs."""
  def run():
    variables = model.init(jax.random.key(0), x, train=False)
    return fl.review_levels(model.apply(variables, x, train=False)[1], preact=True)
  return jax.eval_shape(run)
