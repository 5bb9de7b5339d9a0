"""Vision transformers (DeiT, RVT) with GPD: models, IR, the student view, CBR export, bad input.

The GPD checks run on tiny variants of both families with random parameters (and random BatchNorm
statistics for RVT's conv stem and conv-FFN), through the public transforms API only:

* ``deit``: a distilled ViT (class and distillation tokens, learned positions, two heads), 8×8 inputs
  in 2×2 patches of 4 pixels;
* ``rvt``: two stages (widths 8 and 16, 2 and 4 heads) with the conv stem, conv-FFN (BN, depthwise
  conv) and the stride-2 grouped pooling conv between the stages, 32×32 inputs.

Tolerances (``docs/method.md`` §14): ``max|DT − S| <= 1e-10`` in float64 and ``<= 1e-5 · max(1,
max|S|)`` in float32, for r in {2, 3, 4}. Float64 logits are read from the heads' Dense outputs
(``capture_intermediates``) because ``layers.head`` casts logits to float32.
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
from gpd_jax.models import vit

TOL = {"float32": 1e-5, "float64": 1e-10}
RATIOS = (2, 3, 4)
NUM_CLASSES = 5
BATCH = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}

# family -> (registry name, tiny-variant kwargs, input size)
FAMILIES = {
    "deit": ("deit_tiny", dict(embed_dim=8, depth=2, num_heads=2, patch_size=4, image_size=8,
                               distilled=True), 8),
    "rvt": ("rvt_tiny", dict(base_dims=(4, 4), depths=(1, 1), heads=(2, 4), patch_size=8,
                             stem_width=4, image_size=32), 32),
}
HEADS = ("head", "head_dist")


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def precision(dtype_name: str):
  return jax.enable_x64(dtype_name == "float64")


def params_only(variables):
  return {c: v for c, v in variables.items() if c != "batch_stats"}


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def input_batch(family: str, dtype_name: str):
  size = FAMILIES[family][2]
  x = np.random.default_rng(1).normal(size=(BATCH, size, size, 3)).astype(np.float32)
  with precision(dtype_name):
    return jnp.asarray(x, dtype_name)


def random_variables(shapes, seed: int):
  """NumPy draws (float32-representable): kernels He-normal, norm scales U(0.5, 1.5), biases and
  tokens N(0, 0.1²)·(10 for tokens), BN means N(0, 0.1²), variances U(0.5, 2)."""
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
    elif name in ("cls_token", "dist_token", "pos_embed"):
      x = rs.normal(size=shape)  # O(1): the tokens must matter for the checks to bite
    else:
      fan_in = int(np.prod(shape[:-1]))
      x = rs.normal(size=shape) * np.sqrt(2.0 / fan_in)
    return np.asarray(x, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(dtype)), tree)


def perturb(tree, scale: float, seed: int):
  """Adds noise of ``scale`` × the leaf's RMS (at least 0.1) to every leaf (NumPy)."""
  rs = np.random.default_rng(seed)

  def add(a):
    a = np.asarray(a)
    std = scale * max(float(np.sqrt(np.mean(np.square(a)))), 0.1)
    return jnp.asarray(a + (std * rs.normal(size=a.shape)).astype(a.dtype))

  return jax.tree.map(add, tree)


@functools.lru_cache(maxsize=None)
def student(family: str, dtype_name: str):
  """(model, variables) of the family's tiny student; float64 reuses the float32 numbers."""
  name, kwargs, size = FAMILIES[family]
  model = models.create(name, NUM_CLASSES, dtype=jnp.dtype(dtype_name), **kwargs)
  with precision("float32"):
    shapes = jax.eval_shape(lambda: model.clone(dtype=jnp.float32).init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  with precision(dtype_name):
    return model, cast(random_variables(shapes, sorted(FAMILIES).index(family)), dtype_name)


def _capture(module, method_name):
  return method_name == "__call__" and (module.name in HEADS or isinstance(module, vit.Block))


def apply(model: nn.Module, train: bool, variables, x):
  """(head outputs {name: [B, K]}, block outputs {path: [B, N, C]}, updated stats)."""
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  _, state = model.apply(variables, x, train=train, capture_intermediates=_capture, mutable=mutable)
  flat = transforms.flatten(state["intermediates"])
  heads = {k.split("/")[0]: v for k, v in flat.items() if k.split("/")[0] in HEADS}
  blocks = {k: v for k, v in flat.items() if k.split("/")[0] not in HEADS}
  return heads, blocks, state.get("batch_stats", {})


@functools.lru_cache(maxsize=None)
def forward(model: nn.Module, train: bool):
  """:func:`apply` under jit."""
  return jit(functools.partial(apply, model, train))


@functools.lru_cache(maxsize=None)
def expanded(family: str, dtype_name: str, ratio: int, noise_std: float = 0.0):
  """(dt_model, dt_variables, view_params) with view_params = student_view(expand(student))."""
  model, variables = student(family, dtype_name)
  modules = []

  def run(v, key):
    dt_model, dt_variables = transforms.expand(model, v, ratio=ratio, rng=key, noise_std=noise_std)
    modules.append(dt_model)
    _, view_params = transforms.student_view(dt_model, params_only(dt_variables))
    return dt_variables, view_params

  with precision(dtype_name):
    dt_variables, view_params = jit(run)(variables, jax.random.key(3, impl="unsafe_rbg"))
  return modules[0], dt_variables, view_params


def copies(x, rule, ratio):
  """The r copies of a DT leaf along its tiled axes."""
  x = np.asarray(x)
  out = []
  for j in range(ratio):
    y = x
    for axis in rule.tiled_axes:
      c = y.shape[axis] // ratio
      y = np.take(y, np.arange(j * c, (j + 1) * c), axis=axis)
    out.append(y)
  return out


def spec_of(family: str, ratio: int):
  model, _ = student(family, "float32")
  return transforms.derive_spec(model, ratio, tuple(input_batch(family, "float32").shape))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def vit_param_count(dim, depth, patch, tokens, num_classes=1000, distilled=False):
  """timm's ViT/DeiT, counted by hand: patch conv, tokens, positions, blocks, final LN, head(s)."""
  per_block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim \
      + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
  extra = 2 if distilled else 1
  heads = (2 if distilled else 1) * (dim * num_classes + num_classes)
  return (3 * patch * patch * dim + dim + extra * dim + (tokens + extra) * dim + depth * per_block
          + 2 * dim + heads)


def rvt_param_count(dims, depths, num_classes=1000, stem=32):
  """RVT as in GPD's reference code, counted by hand (BN counts scale and bias, as PyTorch)."""
  total = 7 * 7 * 3 * stem + stem + 2 * stem + 4 * 4 * stem * dims[0] + dims[0]
  for i, (c, depth) in enumerate(zip(dims, depths)):
    h = 4 * c
    attn = (3 * c * c + 3 * c) + (c * c + c)
    ffn = (c * h + h) + 2 * h + (9 * h + h) + 2 * h + (h * c + c) + 2 * c
    total += depth * (4 * c + attn + ffn)
    if i + 1 < len(dims):
      total += 9 * dims[i + 1] + dims[i + 1]
  return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes


# name, kwargs, exact count (timm's for DeiT), published count in millions (DeiT, RVT papers)
PUBLISHED = [
    ("deit_tiny", {}, 5_717_416, 5.7),
    ("deit_tiny", {"distilled": True}, 5_910_800, 5.9),
    ("deit_small", {}, 22_050_664, 22.1),
    ("deit_small", {"distilled": True}, 22_436_432, 22.4),
    ("rvt_tiny", {}, rvt_param_count((192, 384), (10, 2)), 8.6),
    ("rvt_small", {}, rvt_param_count((384,), (12,)), 22.1),
]


def param_count(model, size=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])), shapes


@pytest.mark.parametrize("name,kwargs,exact,millions", PUBLISHED,
                         ids=[f"{n}{'_distilled' if k else ''}" for n, k, _, _ in PUBLISHED])
def test_parameter_counts(name, kwargs, exact, millions):
  count, _ = param_count(models.create(name, 1000, **kwargs))
  if name.startswith("deit"):
    assert exact == vit_param_count(192 if "tiny" in name else 384, 12, 16, 196, **kwargs)
  assert count == exact
  assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("name", ["deit_tiny", "rvt_tiny"])
def test_dt_builds_from_static_fields(name):
  """``create(name, ratio=r)`` has exactly the shapes that IR produces; the DT has r·h heads."""
  model = models.create(name, 10)
  _, shapes = param_count(model)
  dt_shapes = jax.eval_shape(lambda v: transforms.expand(
      model, v, ratio=2, rng=jax.random.key(0), noise_std=0.0)[1], shapes)
  _, want = param_count(models.create(name, 10, ratio=2))
  assert jax.tree.map(lambda s: s.shape, dt_shapes) == jax.tree.map(lambda s: s.shape, want)
  qkv = "blocks_0" if name == "deit_tiny" else "stage0_block0"
  assert want["params"][qkv]["attn"]["qkv"]["kernel"].shape == (384, 3 * 384)


def test_vit_fashion_builds():
  model = models.create("vit_fashion", 10)
  x = jnp.zeros((2, 28, 28, 1))
  logits = jax.jit(lambda: model.apply(model.init(jax.random.key(0), x), x))()
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# IR: function preservation, view ∘ expand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expand_preserves_function(family, dtype_name):
  """noise 0, r in {2, 3, 4}, eval and train mode:

  * every head's logits: DT == student;
  * every block's output in the DT is ``tile(h_S / r)`` (copy-major), so the attention heads, the
    tokens and the positions follow the 1/r-replica convention inside, not only at the logits;
  * the DT's updated BN statistics (RVT) are r copies of the student's;
  * ``student_view(expand(v)) == v`` (bitwise in float64 except for rounding of ×r·/r).
  """
  tol = TOL[dtype_name]
  model, variables = student(family, dtype_name)
  x = input_batch(family, dtype_name)
  with precision(dtype_name):
    for ratio in RATIOS:
      dt_model, dt_variables, view_params = expanded(family, dtype_name, ratio)
      assert dt_model == model.clone(ratio=ratio)
      rules = spec_of(family, ratio).leaves
      for train in (False, True):
        s_heads, s_blocks, s_stats = forward(model, train)(variables, x)
        d_heads, d_blocks, d_stats = forward(dt_model, train)(dt_variables, x)
        assert set(s_heads) == ({"head", "head_dist"} if family == "deit" else {"head"})
        for name in s_heads:
          scale = max(1.0, float(np.max(np.abs(s_heads[name]))))
          err = max_abs_diff(d_heads[name], s_heads[name])
          assert d_heads[name].dtype == x.dtype
          assert err <= tol * scale, (name, ratio, train, err)
        assert set(d_blocks) == set(s_blocks) and len(s_blocks) == 2
        for key, h in s_blocks.items():
          want = np.concatenate([np.asarray(h) / ratio] * ratio, axis=-1)
          scale = max(1.0, float(np.max(np.abs(h))))
          assert max_abs_diff(d_blocks[key], want) <= tol * scale, (key, ratio, train)
        s_flat = transforms.flatten({"batch_stats": s_stats})
        assert bool(s_flat) == (family == "rvt" and train)
        for key, leaf in transforms.flatten({"batch_stats": d_stats}).items():
          for copy in copies(leaf, rules[key], ratio):
            assert max_abs_diff(copy, s_flat[key]) <= tol * max(1.0, np.max(np.abs(s_flat[key])))
      chex.assert_trees_all_close(view_params, params_only(variables),
                                  rtol={"float32": 1e-6, "float64": 1e-15}[dtype_name], atol=0)


def test_derived_spec_learns_the_transformer_rules():
  """The rules come from layer types and shapes, not names: heads, q/k, norms, tokens, first, last."""
  deit, rvt = spec_of("deit", 2).leaves, spec_of("rvt", 2).leaves
  role = lambda rules, key: (rules[key].role, rules[key].tiled_axes, rules[key].rescale)
  assert role(deit, "params/patch_embed/kernel") == ("stem", (3,), True)  # first module
  assert role(deit, "params/head/kernel") == ("head", (0,), False)  # last modules
  assert role(deit, "params/head_dist/kernel") == ("head", (0,), False)
  assert role(deit, "params/head/bias") == ("fixed", (), False)
  assert role(deit, "params/blocks_0/attn/qkv/kernel") == ("middle", (1, 0), True)
  assert role(deit, "params/blocks_0/attn/qkv/bias") == ("bias", (0,), True)
  assert role(deit, "params/blocks_1/norm2/scale") == ("norm", (0,), False)
  for token in ("cls_token", "dist_token", "pos_embed"):
    assert role(deit, f"params/tokens/{token}") == (f"residual:{token}", (2,), True)
  assert role(rvt, "params/stem_conv/kernel") == ("stem", (3,), True)
  assert role(rvt, "params/patch_proj/kernel") == ("middle", (3, 2), True)
  assert role(rvt, "params/pool0/kernel") == ("depthwise", (3,), False)  # grouped-conv rule
  assert role(rvt, "params/pool0/bias") == ("depthwise", (0,), False)
  assert role(rvt, "params/stage1_block0/mlp/dwconv/kernel") == ("depthwise", (3,), False)
  assert role(rvt, "batch_stats/stage0_block0/mlp/bn2/var")[0] == "stats"
  assert not rvt["batch_stats/stem_bn/mean"].noise


def test_tokens_need_the_division_by_r():
  """Negative control (§7, §14 T10): tiling the tokens and positions *without* /r, as the reference
  code's FAN path does, breaks preservation; the derived spec (with /r) preserves exactly."""
  model, variables = student("deit", "float64")
  x = input_batch("deit", "float64")
  derived = spec_of("deit", 2)
  no_division = transforms.ExpansionSpec(leaves={
      k: (transforms.LeafRule(r.role, r.tiled_axes, False) if r.role.startswith("residual:") else r)
      for k, r in derived.leaves.items()})
  with precision("float64"):
    z_s = forward(model, False)(variables, x)[0]["head"]
    errors = []
    for spec in (derived, no_division):
      dt_model, dt_variables = transforms.expand(model, variables, ratio=2, rng=jax.random.key(0),
                                                 noise_std=0.0, spec=spec, sample_input=x)
      errors.append(max_abs_diff(forward(dt_model, False)(dt_variables, x)[0]["head"], z_s))
  assert errors[0] <= TOL["float64"]
  assert errors[1] > 1e-2, errors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expand_noise_is_small_but_nonzero(family):
  """σ = 1e-6: the copies differ, the function moves by far less than 1e-3, and the view is within a
  few r·σ of the student (exactly the student for the head bias, which IR leaves unchanged)."""
  ratio = 3
  model, variables = student(family, "float32")
  x = input_batch(family, "float32")
  dt_model, dt_variables, view_params = expanded(family, "float32", ratio, noise_std=1e-6)
  z_s = forward(model, False)(variables, x)[0]["head"]
  z_d = forward(dt_model, False)(dt_variables, x)[0]["head"]
  assert 0.0 < max_abs_diff(z_d, z_s) < 1e-3
  want = transforms.flatten(params_only(variables))
  for key, leaf in transforms.flatten(view_params).items():
    err = max_abs_diff(leaf, want[key])
    assert err <= 10 * ratio * 1e-6 * max(1.0, np.max(np.abs(want[key]))), key
    if key == "params/head/bias":
      assert err == 0.0
    if key.endswith("qkv/kernel"):
      assert err > 0.0


# ---------------------------------------------------------------------------------------------
# The student view: gradients; CBR export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_lands_in_the_student_slice(family):
  """For L_S(view(θ)): zero outside copy 0 of every leaf, r·∂L_S/∂W_S on rescaled leaves (tokens,
  qkv, ...) and ∂L_S/∂W_S on the others (norms, heads, grouped convs); ∂L_D reaches every copy."""
  ratio = 3
  model, variables = student(family, "float64")
  x = input_batch(family, "float64")
  dt_model, dt_variables, _ = expanded(family, "float64", ratio)
  rules = spec_of(family, ratio).leaves
  stats = variables.get("batch_stats", {})
  with precision("float64"):
    dt_variables = {**dt_variables, "params": perturb(dt_variables["params"], 0.05, seed=5)}
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, NUM_CLASSES)))

  def loss(m, variables_):
    heads = apply(m, False, variables_, x)[0]
    return sum(jnp.sum(weights * z) for z in heads.values())

  def student_loss(params):
    view_model, view = transforms.student_view(dt_model, {"params": params})
    return loss(view_model, {**view, "batch_stats": stats})

  with precision("float64"):
    grads = jit(jax.grad(student_loss))(dt_variables["params"])
    _, view = transforms.student_view(dt_model, {"params": dt_variables["params"]})
    grads_s = jit(jax.grad(lambda p: loss(model, {"params": p, "batch_stats": stats})))(view["params"])
    grads_d = jit(jax.grad(lambda p: loss(dt_model, {**dt_variables, "params": p})))(
        dt_variables["params"])
  want = transforms.flatten({"params": grads_s})
  dense = transforms.flatten({"params": grads_d})
  for key, g in transforms.flatten({"params": grads}).items():
    rule = rules[key]
    parts = copies(g, rule, ratio)
    expected = (ratio if rule.rescale else 1) * np.asarray(want[key])
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert max_abs_diff(parts[0], expected) <= 1e-10 * scale, key
    assert np.max(np.abs(expected)) > 0, key
    if rule.tiled_axes:
      for part in parts[1:]:
        assert not np.any(part), key
      assert any(np.any(p) for p in copies(dense[key], rule, ratio)[1:]), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_equals_view(family):
  """After a perturbation of every DT leaf (as training would), CBR export gives the plain student
  module whose eval-mode logits equal the training-time view's (float64, ≤ 1e-10), r in {2, 3, 4}."""
  model, variables = student(family, "float64")
  x = input_batch(family, "float64")
  with precision("float64"):
    student_stats = perturb(variables.get("batch_stats", {}), 0.1, seed=6)
    for ratio in RATIOS:
      dt_model, dt_variables, _ = expanded(family, "float64", ratio)
      trained = {**dt_variables, "params": perturb(dt_variables["params"], 0.05, seed=ratio)}
      plain_model, plain_variables = transforms.export_student(dt_model, trained, student_stats)
      assert plain_model == model
      view_model, view_params = transforms.student_view(dt_model, params_only(trained))
      z_view = forward(view_model, False)({**view_params, "batch_stats": student_stats}, x)[0]
      z_plain = forward(plain_model, False)(plain_variables, x)[0]
      z_before = forward(model, False)(variables, x)[0]
      for name in z_view:
        assert max_abs_diff(z_plain[name], z_view[name]) <= TOL["float64"], (name, ratio)
        assert max_abs_diff(z_view[name], z_before[name]) > 1e-3  # the perturbation mattered


# ---------------------------------------------------------------------------------------------
# Drop-path (stochastic depth)
# ---------------------------------------------------------------------------------------------


def test_drop_path_is_matched_between_dt_and_view():
  """With one 'dropout' key, the DT and its student view drop the same blocks for the same examples
  (module paths match), so train-mode preservation holds with drop-path on; the drop is real."""
  model, variables = student("deit", "float64")
  model = model.clone(drop_path_rate=0.5)
  x = input_batch("deit", "float64")
  rngs = {"dropout": jax.random.key(4)}
  with precision("float64"):
    dt_model, dt_variables = transforms.expand(model, variables, ratio=2, rng=jax.random.key(0),
                                               noise_std=0.0)
    apply = lambda m, v, **kw: m.apply(v, x, train=True, capture_intermediates=_capture,
                                       mutable=["intermediates"], **kw)[1]["intermediates"]["head"]
    z_s = apply(model, variables, rngs=rngs)["__call__"][0]
    z_d = apply(dt_model, dt_variables, rngs=rngs)["__call__"][0]
    z_full = apply(model.clone(drop_path_rate=0.0), variables)["__call__"][0]
    z_other = apply(model, variables, rngs={"dropout": jax.random.key(5)})["__call__"][0]
  assert max_abs_diff(z_d, z_s) <= TOL["float64"]
  assert max_abs_diff(z_s, z_full) > 1e-3 and max_abs_diff(z_s, z_other) > 1e-3
  with precision("float64"), pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_ratio_that_does_not_give_whole_heads():
  model, _ = student("deit", "float32")
  x = input_batch("deit", "float32")
  with pytest.raises(ValueError, match=r"ratio must be a positive integer.*whole attention heads"):
    model.clone(ratio=1.5).init(jax.random.key(0), x)

  class UserBlock(nn.Module):
    ratio: float = 1

    @nn.compact
    def __call__(self, tokens):
      return vit.Attention(8, 2, ratio=self.ratio, name="my_attn")(tokens)

  tokens = jnp.zeros((1, 4, 12))
  with pytest.raises(ValueError, match=r"attention layer 'my_attn'.*ratio.*whole attention heads.*1\.5"):
    UserBlock(ratio=1.5).init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="ratio must be an integer"):
    transforms.expand(model, student("deit", "float32")[1], ratio=2.5, rng=jax.random.key(0))


def test_width_not_divisible_by_heads():
  model = models.create("deit_tiny", 10, embed_dim=10, depth=1, num_heads=4, image_size=32)
  with pytest.raises(ValueError, match=r"attention layer 'blocks_0/attn'.*width 10.*num_heads=4"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rvt = models.create("rvt_tiny", 10, base_dims=(5, 4), depths=(1, 1), heads=(2, 4))
  with pytest.raises(ValueError, match=r"pooling conv 'pool0'"):
    jax.eval_shape(lambda: rvt.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_wrong_image_size_and_branches():
  model, variables = student("deit", "float32")
  with pytest.raises(ValueError, match=r"image_size"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"no OREPA branches"):
    transforms.expand(model, variables, ratio=2, rng=jax.random.key(0), branches=True)


class UserTransformer(nn.Module):
  """A user's transformer block built on Flax's own attention, which has no GPD head rule."""
  num_classes: int = 3
  width: int = 8
  ratio: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = self.width * self.ratio
    x = nn.Dense(width, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=1))


def test_unsupported_attention_in_a_user_transformer():
  model = UserTransformer()
  x = jnp.zeros((1, 4, 4, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"DenseGeneral layer 'attn/(query|key|value)'.*gpd_jax\.models\.vit\.Attention"):
    transforms.expand(model, variables, ratio=2, rng=jax.random.key(0), sample_input=x)


def test_rvt_with_orepa_branches():
  """RVT's OREPA rule: with ``branches`` the conv-FFN depthwise convs under 700 channels become OREPA
  blocks (with their bias). Pre-trained branch IR + channel IR preserves the function (float64), and
  after a perturbation export (branches merged) equals the multi-branch view."""
  model, variables = student("rvt", "float64")
  x = input_batch("rvt", "float64")
  with precision("float64"):
    dt_model, dt_variables = transforms.expand(model, variables, ratio=2, rng=jax.random.key(0),
                                               noise_std=0.0, branches=True, pretrained=True)
    assert dt_model.branches and "v" in dt_variables["params"]["stage0_block0"]["mlp"]["dwconv"]
    z_s = forward(model, False)(variables, x)[0]["head"]
    assert max_abs_diff(forward(dt_model, False)(dt_variables, x)[0]["head"], z_s) <= TOL["float64"]
    trained = {**dt_variables, "params": perturb(dt_variables["params"], 0.05, seed=9)}
    plain_model, plain_variables = transforms.export_student(dt_model, trained, variables["batch_stats"])
    assert plain_model == model
    view_model, view_params = transforms.student_view(dt_model, params_only(trained))
    z_view = forward(view_model, False)({**view_params, "batch_stats": variables["batch_stats"]}, x)[0]
    z_plain = forward(plain_model, False)(plain_variables, x)[0]
    assert max_abs_diff(z_plain["head"], z_view["head"]) <= TOL["float64"]
    assert max_abs_diff(z_view["head"], z_s) > 1e-3
