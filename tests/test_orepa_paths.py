"""OREPA branch paths: merging branches into the kernel vs running them on the activations.

``OrepaConv(branch_path=...)`` evaluates branches 3 (1×1 → 3×3) and 5 (depthwise → pointwise) either
folded into the merged 3×3 kernel ('merge', the reference behaviour) or as their own convs on the
activations ('run'); 'auto' picks per branch from the static input shape (``orepa_path_plan``). All
three must compute the same function, with the same parameters and the same gradients. The reference
here is ``orepa_branch_outputs`` (six separate convs). Shapes are tiny: the file runs in seconds.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import models
from gpd_jax.models import layers
from gpd_jax.models.layers import (OREPA_BRANCH_PATHS, OrepaConv, merge_orepa_kernel,
                                   orepa_branch_outputs, orepa_branch_path, orepa_path_plan)

PATHS = OREPA_BRANCH_PATHS  # ('auto', 'merge', 'run')

# (depthwise, input shape, branches that 'auto' runs). For groups 1 with I = T = O = C, 'auto' runs
# branch 3 iff B·H·W < 0.72·C; branch 5 and depthwise blocks practically always merge.
CASES = [
    (False, (1, 3, 3, 64), (3,)),  # N = 9 < 46: 'auto' runs branch 3
    (False, (2, 6, 6, 16), ()),  # N = 72 > 11.5: 'auto' merges everything
    (True, (2, 5, 5, 12), ()),  # depthwise: merging costs O(k²·C), always cheaper
]
CASE_IDS = ["regular-run", "regular-merge", "depthwise"]


def _random_variables(module, x, seed=0, dtype=np.float32):
  """Random values for every variable of ``module`` (factors, v, bias, prior and J, BN statistics).

  Shapes come from an abstract ``init``; values from NumPy (compiling jax.random is slow on CPU).
  Random consts are on purpose: in a DT, J and P are no longer an identity and a cosine (§4.4).
  """
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if "var" == getattr(path[-1], "key", None):  # BatchNorm running variance: positive
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _normal(shape, seed, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _reference(x, variables, *, depthwise, scale):
  """(Σ_b branch_b(s·x) + bias) / s with the six branches run as separate convs."""
  s = scale if depthwise else 1

  def f(variables, x):
    params = variables["params"]
    y = sum(orepa_branch_outputs(x * s, params, variables["consts"], depthwise=depthwise))
    if "bias" in params:
      y = y + params["bias"]
    return y / s

  return jax.jit(f)(variables, x)


def _apply(module, variables, x):
  """Jitted ``module.apply``, traced afresh: the path is read (and the plan made) at trace time.

  A fresh closure matters when a default set by ``orepa_branch_path`` changes: jax may reuse an
  earlier trace of an equal function (such as another ``jax.jit(model.apply)``).
  """
  return jax.jit(lambda variables, x: module.apply(variables, x))(variables, x)


def _module(channels, depthwise, use_bias, scale, path, dtype=jnp.float32):
  return OrepaConv(features=channels, depthwise=depthwise, use_bias=use_bias, scale=scale,
                   branch_path=path, dtype=dtype)


def _assert_close(actual, expected, rel):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rel,
                             atol=rel * float(np.abs(expected).max()))


@pytest.mark.parametrize("use_bias,scale", [(False, 1), (True, 2)], ids=["plain", "bias-s2"])
@pytest.mark.parametrize("depthwise,shape,auto_run", CASES, ids=CASE_IDS)
def test_paths_give_the_same_output(depthwise, shape, auto_run, use_bias, scale):
  x = _normal(shape, 1)
  channels = shape[-1]
  variables = _random_variables(_module(channels, depthwise, use_bias, scale, "merge"), x)
  ref = _reference(x, variables, depthwise=depthwise, scale=scale)
  plans = {}
  for path in PATHS:
    module = _module(channels, depthwise, use_bias, scale, path)
    plans[path] = module.path_plan(shape).run
    _assert_close(_apply(module, variables, x), ref, 1e-5)
  assert plans == {"auto": auto_run, "merge": (), "run": (3, 5)}


@pytest.mark.parametrize("depthwise,shape,auto_run", CASES, ids=CASE_IDS)
def test_paths_give_the_same_gradients(depthwise, shape, auto_run):
  del auto_run
  x = _normal(shape, 2)
  channels = shape[-1]
  cotangent = _normal(shape[:-1] + (channels,), 3)
  variables = _random_variables(_module(channels, depthwise, True, 2, "merge"), x, seed=5)

  def grads(path):
    module = _module(channels, depthwise, True, 2, path)
    loss = lambda params, x: jnp.sum(module.apply({"params": params, "consts": variables["consts"]},
                                                  x) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)

  ref_params, ref_x = grads("merge")
  for path in ("auto", "run"):
    g_params, g_x = grads(path)
    assert set(g_params) == set(ref_params)
    for name in ref_params:
      _assert_close(g_params[name], ref_params[name], 1e-5)
    _assert_close(g_x, ref_x, 1e-5)


@pytest.mark.parametrize("depthwise", [False, True], ids=["regular", "depthwise"])
def test_paths_agree_in_float64(depthwise):
  shape = (1, 3, 3, 10)
  with jax.enable_x64(True):
    x = _normal(shape, 1, np.float64)
    variables = _random_variables(_module(10, depthwise, True, 2, "merge", jnp.float64), x,
                                  dtype=jnp.float64)
    ref = _reference(x, variables, depthwise=depthwise, scale=2)
    for path in PATHS:
      y = _apply(_module(10, depthwise, True, 2, path, jnp.float64), variables, x)
      assert y.dtype == jnp.float64
      _assert_close(y, ref, 1e-10)


def test_merge_path_is_the_reference_merged_conv():
  """'merge' is bit-for-bit one conv with ``merge_orepa_kernel`` (what CBR export produces)."""
  shape = (2, 5, 5, 8)
  x = _normal(shape, 1)
  module = _module(8, False, False, 1, "merge")
  variables = _random_variables(module, x)

  def merged_conv(variables, x):
    kernel = merge_orepa_kernel(variables["params"], variables["consts"], depthwise=False)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y = jax.jit(merged_conv)(variables, x)
  np.testing.assert_array_equal(np.asarray(_apply(module, variables, x)), np.asarray(y))


def test_auto_under_jit_uses_the_static_shape():
  x = _normal((1, 3, 3, 64), 1)
  module = _module(64, False, False, 1, "auto")
  variables = _random_variables(module, x)
  y_jit = jax.jit(module.apply)(variables, x)
  _assert_close(y_jit, _reference(x, variables, depthwise=False, scale=1), 1e-5)
  # The jitted program contains branch 3's 1×1 conv (a dot) and its own 3×3 conv.
  hlo = jax.jit(module.apply).lower(variables, x).as_text()
  assert hlo.count("stablehlo.convolution") == 2
  hlo_merge = jax.jit(_module(64, False, False, 1, "merge").apply).lower(variables, x).as_text()
  assert hlo_merge.count("stablehlo.convolution") == 1


def test_run_branch_matches_each_oracle_branch():
  shape = (2, 4, 4, 6)
  x = _normal(shape, 1)
  for depthwise in (False, True):
    variables = _random_variables(_module(6, depthwise, False, 1, "merge"), x)
    oracle = jax.jit(lambda v, x: orepa_branch_outputs(x, v["params"], v["consts"],
                                                       depthwise=depthwise))(variables, x)
    for b in layers.OREPA_RUNNABLE_BRANCHES:
      y = jax.jit(lambda v, x: layers.run_orepa_branch(b, x, v["params"], v["consts"],
                                                       depthwise=depthwise))(variables, x)
      _assert_close(y, oracle[b], 1e-5)
    with pytest.raises(ValueError, match="branches"):
      layers.run_orepa_branch(1, x, variables["params"], variables["consts"], depthwise=depthwise)


# ---------------------------------------------------------------------------- the cost model

def test_plan_runs_branch_3_for_wide_layers_on_small_inputs():
  # A 1024-channel ResNet-18 DT conv (r = 2) at 7×7 with batch 8: merging branch 3 is ~9.7 GMAC.
  plan = orepa_path_plan(1024, 1024, False, 8, 7, 7)
  assert plan.run == (3,)
  assert plan.merged == (0, 1, 2, 4, 5)
  assert plan.merge_macs[3] == 9 * 1024 ** 3
  assert plan.run_macs[3] == 8 * 7 * 7 * (1024 * 1024 + 9 * 1024 * 1024)
  assert plan.merge_macs[5] == 9 * 8 * 1024 * 1024
  assert plan.run_macs[5] == 8 * 7 * 7 * (9 * 8 * 1024 + 8 * 1024 * 1024)
  assert plan.macs() < plan.macs(run=())
  assert plan.macs(run=()) - plan.macs() == plan.merge_macs[3] - plan.run_macs[3]
  # Threshold for I = T = O = C: run iff 1.25·N·10·C² < 9·C³, i.e. N < 0.72·C ...
  assert layers.OREPA_RUN_COST_FACTOR == 1.25
  assert orepa_path_plan(1000, 1000, False, 1, 1, 719).run == (3,)
  assert orepa_path_plan(1000, 1000, False, 1, 1, 720).run == ()
  # ... and N < 0.9·C (plain MAC break-even) without the run-path factor.
  assert orepa_path_plan(1000, 1000, False, 1, 1, 899, run_cost_factor=1.0).run == (3,)
  assert orepa_path_plan(1000, 1000, False, 1, 1, 900, run_cost_factor=1.0).run == ()
  # ResNet-18 DT, 1024 channels at 7×7: runs up to batch 15.
  assert orepa_path_plan(1024, 1024, False, 15, 7, 7).run == (3,)
  assert orepa_path_plan(1024, 1024, False, 16, 7, 7).run == ()


def test_plan_merges_for_narrow_layers_on_large_inputs():
  for args in [(64, 64, False, 32, 56, 56), (1024, 1024, False, 32, 7, 7),
               (512, 512, False, 8, 14, 14)]:
    plan = orepa_path_plan(*args)
    assert plan.run == (), args
    assert plan.macs() == plan.macs(run=())


def test_plan_depthwise_always_merges_in_auto():
  for n in (1, 2, 64):
    assert orepa_path_plan(1024, 1024, True, 1, 1, n).run == ()
  plan = orepa_path_plan(32, 32, True, 2, 4, 4)
  assert plan.merge_macs[3] == 9 * 32 and plan.run_macs[3] == 32 * (32 + 9 * 32)


def test_plan_policies():
  assert orepa_path_plan(1024, 1024, False, 1, 1, 1, policy="merge").run == ()
  assert orepa_path_plan(8, 8, False, 64, 56, 56, policy="run").run == (3, 5)
  with pytest.raises(ValueError, match="branch_path"):
    orepa_path_plan(8, 8, False, 1, 1, 1, policy="fastest")
  with pytest.raises(ValueError, match="branch_path"):
    jax.eval_shape(_module(8, False, False, 1, "fastest").init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 3, 3, 8)))


# ------------------------------------------------------------------------ models and conv()

def _orepa_plans(model, variables, x):
  """Applies ``model`` and returns {block name: branches run}, recorded by intercepting blocks."""
  plans = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, OrepaConv) and context.method_name == "__call__":
      plans[context.module.name] = context.module.path_plan(args[0].shape).run
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # runs while tracing: the closure below is traced afresh
    out = _apply(model, variables, x)
  return out, plans


def test_conv_helper_takes_the_context_default():
  x = jnp.zeros((1, 4, 4, 8))

  class Net(nn.Module):
    path: str | None = None

    @nn.compact
    def __call__(self, x):
      return layers.conv(x, 8, 3, name="c", branches=True, branch_path=self.path)

  def path_of(module):
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, OrepaConv):
        seen.append(context.module.branch_path)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
    return seen[0]

  assert path_of(Net()) == "auto"
  with orepa_branch_path("merge"):
    assert path_of(Net()) == "merge"
    assert path_of(Net(path="run")) == "run"  # an explicit argument wins
  assert path_of(Net()) == "auto"  # restored on exit
  with pytest.raises(ValueError, match="branch_path"):
    with orepa_branch_path("fastest"):
      pass


def test_branched_resnet_dt_logits_do_not_depend_on_the_path():
  model = models.create("resnet8x4", 10, ratio=2, branches=True, widths=(8, 16, 32, 64))
  x = _normal((1, 32, 32, 3), 0)
  variables = _random_variables(model, x)
  logits = {}
  for path in PATHS:
    with orepa_branch_path(path):
      logits[path], plans = _orepa_plans(model, variables, x)
    if path == "auto":
      # The 128-channel 8×8 stage has N = 64 < 0.72·128: it runs branch 3; the others merge.
      assert plans["conv1"] == ()
      assert any(run == (3,) for run in plans.values()) and any(run == () for run in plans.values())
    else:
      assert set(plans.values()) == {() if path == "merge" else (3, 5)}
  for path in ("auto", "run"):
    _assert_close(logits[path], logits["merge"], 1e-5)


def test_branched_mobilenet_dt_logits_do_not_depend_on_the_path():
  model = models.create("mobilenet_v1", 10, ratio=2, branches=True, stem_width=8,
                        blocks=((16, 1), (16, 2), (32, 1)))
  x = _normal((1, 16, 16, 3), 0)
  variables = _random_variables(model, x)
  with orepa_branch_path("merge"):
    ref = _apply(model, variables, x)
  with orepa_branch_path("run"):
    out, plans = _orepa_plans(model, variables, x)
  assert set(plans) == {"block0_dw", "block2_dw"} and set(plans.values()) == {(3, 5)}
  _assert_close(out, ref, 1e-5)
