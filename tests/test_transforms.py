"""Tests for gpd_jax.transforms: IR (``expand``), the student view and CBR export.

Every model family (ImageNet ResNet with basic and bottleneck blocks, MobileNetV1, CIFAR ResNet, WRN)
is tested through a tiny variant with random parameters and random BatchNorm statistics, so that
preservation is not trivial. Student parameters are drawn with NumPy (float32-representable values);
the float64 cases reuse the same numbers.

Speed (the file must stay cheap on a 2-core CPU): the transforms and every apply run under ``jax.jit``
with XLA's CPU backend optimisations off (``FAST_COMPILE``); students, branch IR, expansions and
jitted functions are cached per process, so tests of one family share their compilations; IR keys
are ``unsafe_rbg`` keys, whose draws compile much faster than threefry's on XLA:CPU.

Tolerances: ``max|DT - S| <= 1e-5`` in float32 and ``<= 1e-10`` in float64 (``docs/method.md`` §14).
Float64 logits are read from the head's Dense output (``capture_intermediates``) because ``head``
casts logits to float32.
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import models
from gpd_jax import transforms
from gpd_jax.models import layers

TOL = {"float32": 1e-5, "float64": 1e-10}
NUM_CLASSES = 5
BATCH = 8
# Expansion ratios per precision. Float64 checks exactness for every ratio. Float32 checks rounding
# at r = 3, whose 1/r is inexact in binary, and r = 4, the longest sums over copies; r = 2 is left
# out to keep the file fast (its float32 error is the smallest: 1/2 is exact, sums are shortest).
RATIOS = {"float64": (2, 3, 4), "float32": (3, 4)}

# family -> (registry name, tiny-variant kwargs, input size). The ImageNet models' last stage sees
# 4×4 maps (×8 images), enough elements per channel for train-mode BatchNorm in float32: the measured
# max|DT - S| is <= 3e-6 for every family and ratio (the 1e-5 bound is not loosened to get there).
FAMILIES = {
    "resnet_basic": ("resnet18", dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=4), 32),
    "resnet_bottleneck": ("resnet50", dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=8), 32),
    "mobilenet_v1": ("mobilenet_v1", dict(stem_width=4, blocks=((8, 1), (16, 2))), 32),
    "cifar_resnet": ("resnet8", dict(widths=(4, 4, 8)), 16),
    "wrn": ("wrn_16_1", dict(depth=10), 16),
}
# Branch IR modes: none, pre-trained (zero-scaled new branches), from scratch (OREPA's scalings).
BRANCH_MODES = ("none", "zero", "scratch")

# XLA:CPU's backend optimisations and fusion emitters dominate the compile time of these tiny programs
# (and take ~7 s per shape for the default threefry PRNG); the tests compile without them, about 3×
# faster. Numerics stay IEEE float; only the evaluation order of some reductions may change.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def root_key():
  """The tests' IR key. ``unsafe_rbg``: its draws compile several times faster than threefry's on CPU."""
  return jax.random.key(7, impl="unsafe_rbg")


def keys():
  """(branch key, noise key): what ``expand(rng=root_key())`` uses for its two IR steps."""
  return tuple(jax.random.split(root_key()))


# ---------------------------------------------------------------------------------------------
# Shared helpers (cached per process so tests reuse models, expansions and compilations)
# ---------------------------------------------------------------------------------------------


def precision(dtype_name: str):
  """Context for ``dtype_name`` work: x64 on for float64, off for float32 (scoped to the block).

  Shared float32 values are always built with x64 off, so that they do not depend on which test
  (float32 or float64) happened to build them first.
  """
  return jax.enable_x64(dtype_name == "float64")


def random_variables(shapes, seed: int):
  """Random values for a variable tree of ShapeDtypeStructs (NumPy, float32-representable).

  Kernels are He-normal, BN scales U(0.5, 1.5), biases N(0, 0.1²), BN means N(0, 0.1²) and variances
  U(0.5, 2), so that eval-mode BN is far from the identity.
  """
  rs = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = s.shape
    if name == "var":
      x = rs.uniform(0.5, 2.0, shape)
    elif name == "scale":
      x = rs.uniform(0.5, 1.5, shape)
    elif name in ("bias", "mean"):
      x = 0.1 * rs.normal(size=shape)
    else:
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
      x = rs.normal(size=shape) * np.sqrt(2.0 / fan_in)
    return np.asarray(x, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def cast(tree, dtype):
  """Every leaf as a ``dtype`` array (converted in NumPy: eager JAX ops compile per shape)."""
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(dtype)), tree)


def perturb(tree, scale: float, seed: int):
  """Adds noise of ``scale`` × the leaf's RMS (at least 0.1) to every leaf (in NumPy)."""
  rs = np.random.default_rng(seed)

  def add(a):
    a = np.asarray(a)
    std = scale * max(float(np.sqrt(np.mean(np.square(a)))), 0.1)
    return jnp.asarray(a + (std * rs.normal(size=a.shape)).astype(a.dtype))

  return jax.tree.map(add, tree)


def input_batch(family: str, dtype_name: str):
  size = FAMILIES[family][2]
  x = np.random.default_rng(1).normal(size=(BATCH, size, size, 3)).astype(np.float32)
  return jnp.asarray(x, dtype_name)


def params_only(variables):
  return {c: v for c, v in variables.items() if c != "batch_stats"}


def jit_transform(fn, *args):
  """Runs ``fn(*args) -> (module, tree)`` under jit; the module is captured while tracing."""
  modules = []

  def run(*a):
    module, tree = fn(*a)
    modules.append(module)
    return tree

  tree = jit(run)(*args)
  return modules[0], tree


@functools.lru_cache(maxsize=None)
def student(family: str, dtype_name: str):
  """(model, variables) of the family's tiny plain student with random params and BN statistics.

  The running statistics are the batch statistics of ``input_batch`` (so that eval-mode activations
  and logits stay O(1), which gives the absolute tolerances their meaning) perturbed at random: means
  shifted by N(0, (0.2·σ)²), variances scaled by U(0.5, 2). Float64 reuses the float32 values.
  """
  name, kwargs, _ = FAMILIES[family]
  model = models.create(name, NUM_CLASSES, dtype=jnp.dtype(dtype_name), **kwargs)
  if dtype_name != "float32":
    float32_variables = student(family, "float32")[1]
    with precision(dtype_name):
      return model, cast(float32_variables, dtype_name)
  with precision("float32"):
    return model, _random_student_variables(model, family)


def _random_student_variables(model, family):
  size = FAMILIES[family][2]
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  seed = sorted(FAMILIES).index(family)
  variables = random_variables(shapes, seed)
  # One train-mode step from the initial statistics s0 gives 0.9·s0 + 0.1·(batch statistics).
  updated = transforms.flatten(forward(model)(variables, input_batch(family, "float32"))[2])
  initial = transforms.flatten(variables["batch_stats"])
  batch = {k: (np.asarray(updated[k]) - 0.9 * initial[k]) / 0.1 for k in initial}
  rs = np.random.default_rng(seed + 100)
  stats = {}
  for key in sorted(k for k in batch if k.endswith("/mean")):
    module = key[:-len("/mean")]
    var = np.maximum(batch[module + "/var"], 0.0) + 0.05
    stats[key] = batch[key] + 0.2 * np.sqrt(var) * rs.normal(size=var.shape)
    stats[module + "/var"] = var * rs.uniform(0.5, 2.0, var.shape)
  return cast({**variables, "batch_stats": transforms.unflatten(stats)}, "float32")


@functools.lru_cache(maxsize=None)
def _branched_float32(family: str):
  """{pretrained: (model, variables)} after branch IR.

  ``add_branches`` runs once (pretrained=False); the pre-trained variant only differs in the branch
  scalings v = (1, 0, 0, 0, 0, 0), set here (``test_expand_is_branch_ir_then_channel_ir`` checks
  that this is what ``expand(..., pretrained=True)`` builds). In the from-scratch variant, ``e1``
  (zero at OREPA's init) is drawn at random so that its IR rule is exercised too.
  """
  model, variables = student(family, "float32")
  x = input_batch(family, "float32")
  with precision("float32"):
    branched_model, scratch = jit_transform(lambda v, k: transforms.add_branches(
        model, v, rng=k, pretrained=False, sample_input=x), variables, keys()[0])
  flat = transforms.flatten(scratch)
  pretrained_scales = np.asarray(layers.OREPA_PRETRAINED_SCALES, np.float32)[:, None]
  zero = {k: np.broadcast_to(pretrained_scales, a.shape) if k.endswith("/v") else a
          for k, a in flat.items()}
  rs = np.random.default_rng(sorted(FAMILIES).index(family) + 200)
  scratch = {k: 0.3 * rs.normal(size=a.shape) if k.endswith("/e1") else a for k, a in flat.items()}
  return {False: (branched_model, cast(transforms.unflatten(scratch), "float32")),
          True: (branched_model, cast(transforms.unflatten(zero), "float32"))}


@functools.lru_cache(maxsize=None)
def student_in_mode(family: str, dtype_name: str, mode: str):
  """The student before channel IR: plain (``none``) or after branch IR (``zero``/``scratch``).

  Branch IR runs once per family in float32 (the new factors are float32 draws); the float64 variant
  casts every leaf so that the float64 DT is exact.
  """
  if mode == "none":
    return student(family, dtype_name)
  model, variables = _branched_float32(family)[mode == "zero"]
  with precision(dtype_name):
    return model.clone(dtype=jnp.dtype(dtype_name)), cast(variables, dtype_name)


@functools.lru_cache(maxsize=None)
def _expand_fn(model: nn.Module, ratio: int, noise_std: float, sample_shape: tuple[int, ...]):
  """Jitted channel IR and, in the same program, the student view of its result."""
  sample = np.zeros(sample_shape, np.float32)

  def run(variables, key):
    dt_model, dt_variables = transforms.expand_channels(
        model, variables, ratio=ratio, rng=key, noise_std=noise_std, sample_input=sample)
    # The spec that expand_channels derived (cached): skips re-tracing the DT to validate its tree.
    spec = transforms.derive_spec(model, ratio, sample_shape)
    _, view_params = transforms.student_view(dt_model, params_only(dt_variables), spec=spec)
    return dt_variables, view_params

  return jit(run)


@functools.lru_cache(maxsize=None)
def expanded(family: str, dtype_name: str, ratio: int, mode: str, noise_std: float = 0.0):
  """IR of the family's student, ``mode`` in BRANCH_MODES (== ``expand(..., rng=root_key())``).

  Returns:
    (dt_model, dt_variables, view_params): view_params = ``student_view(dt_model, dt_variables)``.
  """
  model, variables = student_in_mode(family, dtype_name, mode)
  with precision(dtype_name):
    shape = tuple(input_batch(family, dtype_name).shape)
    dt_variables, view_params = _expand_fn(model, ratio, noise_std, shape)(variables, keys()[1])
  return model.clone(ratio=ratio), dt_variables, view_params


def view(dt_model, dt_params, **kwargs):
  """``transforms.student_view`` under jit."""
  return jit_transform(lambda p: transforms.student_view(dt_model, p, **kwargs), dt_params)


def _is_head(module, method_name):
  return module.name == "fc" and method_name == "__call__"


@functools.lru_cache(maxsize=None)
def forward(model: nn.Module):
  """Jitted (variables, x) -> (eval logits, train logits, updated batch_stats).

  Logits are the head Dense's raw output (float64 stays float64).
  """

  def logits_of(out, state):
    captured = state.get("intermediates", {}).get("fc", {}).get("__call__")
    return captured[0] if captured else out

  def run(variables, x):
    out, state = model.apply(variables, x, train=False, capture_intermediates=_is_head,
                             mutable=["intermediates"])
    z_eval = logits_of(out, state)
    out, state = model.apply(variables, x, train=True, capture_intermediates=_is_head,
                             mutable=["intermediates", "batch_stats"])
    return z_eval, logits_of(out, state), state["batch_stats"]

  return jit(run)


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def student_rules(dt_model, sample_input):
  """The DT's expansion spec (rules of every leaf, keyed 'collection/.../name')."""
  return transforms.derive_spec(dt_model.clone(ratio=1), dt_model.ratio, tuple(sample_input.shape))


def copies(x, rule, ratio):
  """The r copies of a DT leaf along its tiled axes (copy j = [j·C, (j+1)·C) on every tiled axis)."""
  x = np.asarray(x)
  out = []
  for j in range(ratio):
    y = x
    for axis in rule.tiled_axes:
      c = y.shape[axis] // ratio
      y = np.take(y, np.arange(j * c, (j + 1) * c), axis=axis)
    out.append(y)
  return out


def assert_preserved(dt_model, dt_variables, ref_model, ref_variables, x, tol):
  """DT logits == reference logits (eval and train BN) and DT stats == r copies of the reference's."""
  dt_eval, dt_train, dt_stats = forward(dt_model)(dt_variables, x)
  ref_eval, ref_train, ref_stats = forward(ref_model)(ref_variables, x)
  assert dt_eval.shape == ref_eval.shape == (x.shape[0], ref_model.num_classes)
  assert dt_eval.dtype == x.dtype
  err_eval, err_train = max_abs_diff(dt_eval, ref_eval), max_abs_diff(dt_train, ref_train)
  assert err_eval <= tol, f"eval-mode max|DT - S| = {err_eval:.3g} > {tol}"
  assert err_train <= tol, f"train-mode max|DT - S| = {err_train:.3g} > {tol}"
  # Updated running statistics: every DT copy equals the student's update.
  rules = student_rules(dt_model, x).leaves
  ref_flat = transforms.flatten({"batch_stats": ref_stats})
  for key, leaf in transforms.flatten({"batch_stats": dt_stats}).items():
    for j, copy in enumerate(copies(leaf, rules[key], dt_model.ratio)):
      err = max_abs_diff(copy, ref_flat[key])
      assert err <= tol * max(1.0, float(np.max(np.abs(ref_flat[key])))), (key, j, err)
  return err_eval, err_train


# ---------------------------------------------------------------------------------------------
# Function preservation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expand_preserves_function(family, dtype_name):
  """noise 0, eval and train-mode BN, every ratio of RATIOS[dtype_name]:

  * no branches, and zero-scaled branches (pretrained=True): the DT equals the plain student;
  * branches with OREPA's from-scratch scalings (pretrained=False): the DT equals its own multi-branch
    student view (which differs from the plain student);
  * in every mode, ``student_view(expand(v))`` gives back v's params (and consts) to float rounding.

  One test per family and precision, so that its expansions and compilations stay in one process.
  """
  rtol = {"float32": 1e-6, "float64": 1e-14}[dtype_name]
  with precision(dtype_name):
    model, variables = student(family, dtype_name)
    x = input_batch(family, dtype_name)
    for mode in BRANCH_MODES:
      mode_model, mode_variables = student_in_mode(family, dtype_name, mode)
      for ratio in RATIOS[dtype_name]:
        dt_model, dt_variables, view_params = expanded(family, dtype_name, ratio, mode)
        assert dt_model == mode_model.clone(ratio=ratio)
        assert dt_model.branches == (mode != "none")
        if mode == "scratch":
          ref_model = dt_model.clone(ratio=1)
          ref_variables = {**view_params, "batch_stats": variables["batch_stats"]}
        else:
          ref_model, ref_variables = model, variables
        assert_preserved(dt_model, dt_variables, ref_model, ref_variables, x, TOL[dtype_name])
        assert set(view_params) == set(params_only(mode_variables)), (mode, ratio)
        chex.assert_trees_all_close(view_params, params_only(mode_variables), rtol=rtol, atol=0)
    # OREPA's from-scratch scalings really change the function (the scratch check is not vacuous).
    assert max_abs_diff(forward(ref_model)(ref_variables, x)[0],
                        forward(model)(variables, x)[0]) > 1e-2


@pytest.mark.parametrize("family", ["cifar_resnet", "mobilenet_v1"])
def test_expand_is_branch_ir_then_channel_ir(family):
  """``expand(pretrained=True)`` == add_branches with v = (1, 0, ..., 0), then expand_channels.

  This is how the tests build their pre-trained DTs (``_branched_float32``), with expand's own split
  of its key into a branch key and a noise key.
  """
  model, variables = student(family, "float32")
  x = input_batch(family, "float32")
  dt_model, dt_variables = jit_transform(lambda v, k: transforms.expand(
      model, v, ratio=3, rng=k, noise_std=0.0, branches=True, pretrained=True, sample_input=x),
                                         variables, root_key())
  want_model, want, _ = expanded(family, "float32", 3, "zero")
  assert dt_model == want_model == model.clone(ratio=3, branches=True)
  chex.assert_trees_all_close(dt_variables, want, rtol=1e-6, atol=1e-12)
  v = transforms.flatten(dt_variables["params"])
  assert any(k.endswith("/v") for k in v)
  for key in (k for k in v if k.endswith("/v")):
    np.testing.assert_array_equal(v[key][:, 0], layers.OREPA_PRETRAINED_SCALES)


@pytest.mark.parametrize("family", ["cifar_resnet", "mobilenet_v1"])
def test_expand_noise_is_small_but_nonzero(family):
  """noise_std = 1e-6 breaks the copies' symmetry but keeps the function to well below 1e-3.

  Two plain families only, as every noisy leaf costs a PRNG kernel to compile: stem, middle and head
  convs/dense, BN and projection shortcuts (cifar_resnet), depthwise convs (mobilenet_v1).
  """
  model, variables = student(family, "float32")
  x = input_batch(family, "float32")
  dt_model, dt_variables, _ = expanded(family, "float32", 3, "none", noise_std=1e-6)
  _, exact, _ = expanded(family, "float32", 3, "none")
  z_dt = forward(dt_model)(dt_variables, x)[0]
  z_s = forward(model)(variables, x)[0]
  assert 0.0 < max_abs_diff(z_dt, z_s) < 1e-3
  # Every copy of every widened parameter is perturbed by O(1e-6); the head bias (not widened) is
  # copied unchanged, and BN statistics carry no noise.
  rules = student_rules(dt_model, x).leaves
  noisy = transforms.flatten(params_only(dt_variables))
  unchanged = set()
  for key, leaf in transforms.flatten(params_only(exact)).items():
    if not rules[key].tiled_axes:
      np.testing.assert_array_equal(noisy[key], leaf, err_msg=key)
      unchanged.add(key)
      continue
    for copy, exact_copy in zip(copies(noisy[key], rules[key], 3), copies(leaf, rules[key], 3)):
      assert 0 < max_abs_diff(copy, exact_copy) < 1e-5, key
  assert unchanged == {"params/fc/bias"}
  chex.assert_trees_all_equal(dt_variables["batch_stats"], exact["batch_stats"])


# ---------------------------------------------------------------------------------------------
# The student view
# ---------------------------------------------------------------------------------------------


def expected_rescale(key: str, ndim: int, rule, spec) -> bool:
  """§3.2 / §4.5 for the gpd_jax models, independently of the spec: is the student's slice ×r?

  Groups-1 kernels and biases whose output axis is widened are (stem, middle, their biases, and the
  linear factors of a groups-1 OREPA block, e1/J included when the block's input is widened); the
  head, norms, depthwise kernels, the scalings v, the prior P, ``dw`` and everything in a depthwise
  OREPA block are not.
  """
  collection, *path, name = key.split("/")
  widened_out = ndim - 1 in rule.tiled_axes
  if collection == "batch_stats":
    return False
  block = "/".join(path)
  if block in spec.branch_blocks:
    linear = ("kernel", "a1", "a2", "e1", "identity", "c2", "w4", "pw", "bias")
    return not spec.branch_blocks[block] and name in linear and widened_out
  if "bn" in path[-1] or path[-1].endswith("_dw"):  # BatchNorms; MobileNet's depthwise convs
    return False
  return name in ("kernel", "bias") and widened_out


@pytest.mark.parametrize("family", ["cifar_resnet", "mobilenet_v1", "resnet_bottleneck"])
def test_view_gradient_lives_in_the_student_slice(family):
  """grad of L_S(view(θ)) is 0 outside the slice and r·(or 1·) grad L_S on it (float64, branches).

  Three families cover every kind of leaf: the 7×7 stem, bottleneck and projection convs, BN and the
  head (resnet_bottleneck); an OREPA stem on the image and groups-1 OREPA blocks (cifar_resnet);
  depthwise convs and a depthwise OREPA block (mobilenet_v1).
  """
  ratio = 3
  with precision("float64"):
    _, variables = student(family, "float64")
    x = input_batch(family, "float64")
    dt_model, dt_variables, _ = expanded(family, "float64", ratio, "scratch")
    dt_params = perturb(dt_variables["params"], 0.05, seed=3)  # every factor and scaling non-trivial
    consts = dt_variables["consts"]
    view_model = dt_model.clone(ratio=1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, NUM_CLASSES)))

    def student_loss(params, view_consts):
      logits, _ = view_model.apply({"params": params, "consts": view_consts,
                                    "batch_stats": variables["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
      return jnp.sum(weights * logits)

    def loss_through_view(params):
      _, view = transforms.student_view(dt_model, {"params": params, "consts": consts})
      return student_loss(view["params"], view["consts"])

    def both_gradients(params):
      _, view = transforms.student_view(dt_model, {"params": params, "consts": consts})
      return (jax.grad(loss_through_view)(params),
              jax.grad(student_loss)(view["params"], view["consts"]))

    g_dt, g_s = jit(both_gradients)(dt_params)
    g_dt, g_s = transforms.flatten({"params": g_dt}), transforms.flatten({"params": g_s})
    spec = student_rules(dt_model, x)
    rules = spec.leaves
    assert set(g_dt) == set(g_s)
    for key, g in g_dt.items():
      rule = rules[key]
      assert rule.rescale == expected_rescale(key, g.ndim, rule, spec), key
      factor = ratio if rule.rescale else 1
      first, *others = copies(g, rule, ratio)
      np.testing.assert_allclose(first, factor * np.asarray(g_s[key]), rtol=1e-12, atol=1e-15,
                                 err_msg=key)
      # Outside the student's slice [:C] of every tiled axis: exactly zero.
      mask = np.ones(g.shape, bool)
      mask[tuple(slice(0, n // ratio) if a in rule.tiled_axes else slice(None)
                 for a, n in enumerate(g.shape))] = False
      assert not np.any(np.asarray(g)[mask]), key
      assert len(others) == ratio - 1
    # Both kinds of leaves occur, and the student's gradient is not trivially zero.
    assert {rules[k].rescale for k in g_dt} == {True, False}
    assert all(float(np.max(np.abs(g_s[k]))) > 0 for k in g_s), [
        k for k in g_s if float(np.max(np.abs(g_s[k]))) == 0]


# ---------------------------------------------------------------------------------------------
# CBR export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_matches_view(family):
  """After perturbing every DT leaf, the exported plain student == the training-time view (eval).

  With and without branches, r = 3, float32; the plain module is what ``models.create`` builds.
  """
  model, variables = student(family, "float32")
  x = input_batch(family, "float32")
  stats_s = jax.tree.map(jnp.abs, perturb(variables["batch_stats"], 0.1, seed=6))  # var > 0
  for mode in ("none", "zero"):
    dt_model, dt_variables, _ = expanded(family, "float32", 3, mode)
    # Perturb every DT leaf but the statistics by 10% of its RMS: factors, scalings v (so every branch
    # is active), and the constants P and J. The logits stay O(1), so that the absolute float32
    # bound means what it says.
    dt_variables = {**dt_variables, **perturb(params_only(dt_variables), 0.1, seed=5)}
    plain_model, plain_variables = jit_transform(
        lambda v, s: transforms.export_student(dt_model, v, s, sample_input=x), dt_variables, stats_s)
    assert type(plain_model) is type(model) and plain_model == model
    assert plain_model == models.create(FAMILIES[family][0], NUM_CLASSES, **FAMILIES[family][1])
    assert set(plain_variables) == {"params", "batch_stats"}
    chex.assert_trees_all_equal_shapes(plain_variables, variables)
    chex.assert_trees_all_equal(plain_variables["batch_stats"], stats_s)
    view_model, view_params = view(dt_model, params_only(dt_variables), sample_input=x)
    z_view = forward(view_model)({**view_params, "batch_stats": stats_s}, x)[0]
    z_plain = forward(plain_model)(plain_variables, x)[0]
    assert max_abs_diff(z_plain, z_view) <= TOL["float32"], mode
    # The perturbation moved the student away from the original (the check is not vacuous).
    assert max_abs_diff(z_plain, forward(model)(variables, x)[0]) > 1e-2, mode


# ---------------------------------------------------------------------------------------------
# OREPA merge
# ---------------------------------------------------------------------------------------------


def _orepa_block(depthwise: bool, in_features: int, out_features: int, scales=None, seed=0):
  block = layers.OrepaConv(features=out_features, depthwise=depthwise)
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 6, 6, in_features)), jnp.float32)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x))
  variables = random_variables(shapes, seed)
  consts = {"prior": layers.frequency_prior(out_features),
            "identity": layers.identity_prior(in_features, depthwise)}
  params = dict(variables["params"])
  params["e1"] = params["e1"] + 0.3  # non-zero so branch 3 differs from identity·c2
  if scales is not None:
    params["v"] = jnp.tile(jnp.asarray(scales, jnp.float32)[:, None], (1, out_features))
  return block, x, jax.tree.map(jnp.asarray, params), consts


def _conv(x, kernel, groups):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("depthwise", [False, True], ids=["regular", "depthwise"])
def test_orepa_merge_equals_sum_of_branches(depthwise):
  """conv(x, merged kernel) == Σ of the six branch convs run separately, and == the block."""
  c_in, c_out = (5, 5) if depthwise else (4, 6)
  block, x, params, consts = _orepa_block(depthwise, c_in, c_out)
  kernel = layers.merge_orepa_kernel(params, consts, depthwise=depthwise)
  groups = c_in if depthwise else 1
  merged = _conv(x, kernel, groups)
  outputs = layers.orepa_branch_outputs(x, params, consts, depthwise=depthwise)
  assert len(outputs) == 6 and all(float(np.max(np.abs(o))) > 1e-3 for o in outputs)
  np.testing.assert_allclose(merged, sum(outputs), rtol=1e-5, atol=1e-5)
  out = block.apply({"params": params, "consts": consts}, x)
  np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True], ids=["regular", "depthwise"])
def test_orepa_single_branch_is_plain_conv(depthwise):
  """v = (1, 0, 0, 0, 0, 0) gives exactly the original conv with ``kernel``."""
  c_in, c_out = (5, 5) if depthwise else (4, 6)
  block, x, params, consts = _orepa_block(depthwise, c_in, c_out,
                                          scales=layers.OREPA_PRETRAINED_SCALES)
  expected = _conv(x, params["kernel"], c_in if depthwise else 1)
  out = block.apply({"params": params, "consts": consts}, x)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  kernel = layers.merge_orepa_kernel(params, consts, depthwise=depthwise)
  np.testing.assert_array_equal(kernel, params["kernel"])


def test_frequency_prior_matches_cosine_formula():
  out = 6
  prior = np.asarray(layers.frequency_prior(out))
  for h in range(3):
    for w in range(3):
      for o in range(out):
        want = (np.cos(np.pi * (h + 0.5) * (o + 1) / 3) if o < out / 2 else
                np.cos(np.pi * (w + 0.5) * (o + 1 - out / 2) / 3))
        assert abs(prior[h, w, o] - want) < 1e-6


# ---------------------------------------------------------------------------------------------
# A user-defined model
# ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
  """conv -> BN -> ReLU -> conv -> global average pool -> dense, written for GPD by hand.

  The only GPD-specific parts: a ``ratio`` field that multiplies the hidden widths, and the
  activation-scale rule ``BN(ratio·x) / ratio`` for the BatchNorm.
  """
  num_classes: int = 3
  width: int = 6
  ratio: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = self.width * self.ratio
    x = nn.Conv(width, (3, 3), strides=2, dtype=self.dtype, name="conv1")(x)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="bn1")
    x = nn.relu(bn(x * self.ratio) / self.ratio)
    x = nn.Conv(2 * width, (3, 3), dtype=self.dtype, name="conv2")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def tiny_net_spec() -> transforms.ExpansionSpec:
  """TinyNet's expansion spec written by hand (what ``derive_spec`` should find)."""
  rule = transforms.LeafRule
  return transforms.ExpansionSpec(leaves={
      "params/conv1/kernel": rule("stem", (3,), True),
      "params/conv1/bias": rule("bias", (0,), True),
      "params/bn1/scale": rule("norm", (0,), False),
      "params/bn1/bias": rule("norm", (0,), False),
      "batch_stats/bn1/mean": rule("stats", (0,), False, noise=False),
      "batch_stats/bn1/var": rule("stats", (0,), False, noise=False),
      "params/conv2/kernel": rule("middle", (3, 2), True),
      "params/conv2/bias": rule("bias", (0,), True),
      "params/fc/kernel": rule("head", (0,), False),
      "params/fc/bias": rule("fixed", (), False),
  })


@pytest.mark.parametrize("spec_source", ["derived", "hand_written"])
def test_custom_model(spec_source):
  """A user CNN: derived and hand-written specs agree, preserve the function, and export exactly."""
  ratio = 3
  with precision("float64"):
    model = TinyNet(dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 16, 16, 2)))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = cast(random_variables(shapes, 11), "float64")
    derived = transforms.derive_spec(model, ratio, tuple(x.shape))
    assert {k: (r.tiled_axes, r.rescale, r.noise) for k, r in derived.leaves.items()} == {
        k: (r.tiled_axes, r.rescale, r.noise) for k, r in tiny_net_spec().leaves.items()}
    spec = tiny_net_spec() if spec_source == "hand_written" else None
    dt_model, dt_variables = transforms.expand(model, variables, ratio=ratio, rng=jax.random.key(1),
                                               noise_std=0.0, spec=spec, sample_input=x)
    assert dt_model == model.clone(ratio=ratio)
    assert dt_variables["params"]["conv2"]["kernel"].shape == (3, 3, 18, 36)
    assert_preserved(dt_model, dt_variables, model, variables, x, TOL["float64"])
    view_model, view_params = transforms.student_view(dt_model, params_only(dt_variables),
                                                      spec=spec, sample_input=x)
    assert view_model == model
    chex.assert_trees_all_close(view_params, params_only(variables), rtol=1e-14, atol=0)
    # Export after perturbing the DT equals the view.
    dt_variables = {**dt_variables, "params": perturb(dt_variables["params"], 0.05, seed=4)}
    plain_model, plain_variables = transforms.export_student(
        dt_model, dt_variables, variables["batch_stats"], spec=spec, sample_input=x)
    _, view_params = transforms.student_view(dt_model, params_only(dt_variables), spec=spec,
                                             sample_input=x)
    z_view = forward(model)({**view_params, "batch_stats": variables["batch_stats"]}, x)[0]
    z_plain = forward(plain_model)(plain_variables, x)[0]
    assert max_abs_diff(z_plain, z_view) <= TOL["float64"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1, 0, 2.5, -2, True])
def test_bad_ratio(ratio):
  model, variables = student("cifar_resnet", "float32")
  with pytest.raises(ValueError, match="ratio"):
    transforms.expand(model, variables, ratio=ratio, rng=jax.random.key(0))


def test_view_of_a_student_is_rejected():
  model, variables = student("cifar_resnet", "float32")
  with pytest.raises(ValueError, match="ratio"):
    transforms.student_view(model, params_only(variables))


def test_unknown_model_name():
  with pytest.raises(ValueError, match="resnet_19"):
    models.create("resnet_19", 10)


def _cifar(depth: int, **kw):
  return models.create(f"resnet{depth}", NUM_CLASSES, widths=(4, 4, 8), **kw)


def test_expand_rejects_variables_of_another_model():
  """Variables of resnet8 passed with a resnet20 module, or with a leaf missing: error names them."""
  _, variables = student("cifar_resnet", "float32")
  with pytest.raises(ValueError, match=r"^variables .*missing"):
    transforms.expand(_cifar(20), variables, ratio=2, rng=jax.random.key(0))
  model = _cifar(8)
  params = transforms.flatten(variables)
  del params["params/layer1_0/conv2/kernel"]
  with pytest.raises(ValueError, match=r"^variables .*layer1_0/conv2/kernel"):
    transforms.expand(model, transforms.unflatten(params), ratio=2, rng=jax.random.key(0))


def test_transforms_need_a_ratio_field():
  """A module without ``ratio`` cannot have a DT, with a derived or a hand-written spec."""

  class NoRatio(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      del train
      return nn.Dense(3, name="fc")(jnp.mean(nn.Conv(4, (3, 3), name="conv1")(x), axis=(1, 2)))

  model = NoRatio()
  x = np.zeros((2, 8, 8, 3), np.float32)
  variables = random_variables(jax.eval_shape(lambda: model.init(jax.random.key(0), x)), 0)
  rule = transforms.LeafRule
  spec = transforms.ExpansionSpec(leaves={
      "params/conv1/kernel": rule("stem", (3,), True), "params/conv1/bias": rule("bias", (0,), True),
      "params/fc/kernel": rule("head", (0,), False), "params/fc/bias": rule("fixed", (), False)})
  for kwargs in ({}, {"spec": spec}):
    with pytest.raises(ValueError, match="NoRatio has no 'ratio' field"):
      transforms.expand(model, variables, ratio=2, rng=root_key(), sample_input=x, **kwargs)


def test_view_and_export_reject_mismatched_trees():
  model, variables = student("cifar_resnet", "float32")
  dt_model, dt_variables, _ = expanded("cifar_resnet", "float32", 2, "none")
  # DT params of the wrong ratio.
  _, dt3, _ = expanded("cifar_resnet", "float32", 3, "none")
  with pytest.raises(ValueError, match=r"^dt_params .*wrong shapes"):
    transforms.student_view(dt_model, params_only(dt3))
  with pytest.raises(ValueError, match=r"^dt_variables "):
    transforms.export_student(dt_model, dt3, variables["batch_stats"])
  # A student-width tree given as DT variables; a DT tree with a leaf missing.
  with pytest.raises(ValueError, match=r"^dt_params "):
    transforms.student_view(dt_model, params_only(variables))
  flat = transforms.flatten(params_only(dt_variables))
  del flat["params/layer2_0/downsample_conv/kernel"]
  with pytest.raises(ValueError, match=r"^dt_params .*missing.*downsample_conv/kernel"):
    transforms.student_view(dt_model, transforms.unflatten(flat))
  # Student statistics of the DT's width, or missing.
  with pytest.raises(ValueError, match=r"^student_batch_stats "):
    transforms.export_student(dt_model, dt_variables, dt_variables["batch_stats"])
  stats = transforms.flatten(variables["batch_stats"])
  stats.pop(next(iter(stats)))
  with pytest.raises(ValueError, match=r"^student_batch_stats .*missing"):
    transforms.export_student(dt_model, dt_variables, transforms.unflatten(stats))
  del model
