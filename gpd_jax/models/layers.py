"""Layers shared by every model, written once for the student and its dynamic teacher (DT).

A model is built in one of three modes, chosen by two static module fields (no mutable state):

* ``ratio=1, branches=False``: the plain student (what ``models.create`` returns and what CBR exports);
* ``ratio=1, branches=True``: the training-time student view of a DT with OREPA branches;
* ``ratio=r``: the dynamic teacher, every hidden width ×r (stem input and head output unchanged).

The activation-scale rule (``docs/method.md`` §3.4): inside a DT every hidden activation carries 1/r of
the student's value, so layers that are not positively homogeneous see ``s·x`` and return ``f(s·x)/s``
with ``s = ratio``. In student mode ``s = 1`` and the wrappers vanish.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# PyTorch BatchNorm defaults (momentum 0.1 == Flax momentum 0.9, eps 1e-5), as in the reference code.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Branch scalings v (branches 0..5) of an OREPA block trained from scratch [code OREPA.__init__].
OREPA_SCRATCH_SCALES = (0.25, 0.25, 0.0, 0.5, 0.05, 0.5)
# Pre-trained student: only the branch holding the original kernel is active.
OREPA_PRETRAINED_SCALES = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
OREPA_NUM_BRANCHES = 6
OREPA_DW_MULTIPLIER = 8  # channel multiplier of branch 5's depthwise conv

# How an OREPA block evaluates its branches (``OrepaConv.branch_path``): 'merge' folds all six into one
# k×k kernel (the reference behaviour); 'run' runs the two factored branches on the activations and
# merges the rest; 'auto' picks per branch from the static input shape (``orepa_path_plan``).
OREPA_BRANCH_PATHS = ("auto", "merge", "run")
# The branches whose kernel is a contraction of two trainable factors, so that folding them costs
# O(k²·I·T·O) or O(k²·8·I·O) MACs whatever the batch: 3 (1×1 conv e1 + J, then the k×k conv c2) and 5
# (depthwise dw, then pointwise pw). Branches 0, 1, 2 and 4 are a scaling, a broadcast or a product
# with the fixed prior of one factor, O(k²·I·O) to fold, and are always merged.
OREPA_RUNNABLE_BRANCHES = (3, 5)
# 'auto' runs a branch only when its run MACs times this factor are below its merge MACs. Running adds
# work that MACs do not count (an extra conv and 1×1, the intermediate activation kept for the
# backward, an add), and its convs on few activations are less efficient than the merge's single
# large GEMM. Measured on XLA:CPU (benchmarks/orepa_branch_cost.py), running branch 3 only pays off
# once it saves more than ~10-20 % of its MACs; re-measure on an accelerator.
OREPA_RUN_COST_FACTOR = 1.25

# Kaiming/He-uniform with a = 0 (PyTorch ``kaiming_uniform_``): U(-sqrt(6/fan_in), sqrt(6/fan_in)).
he_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)
# torchvision / mdistiller conv init: Kaiming-normal, fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(x: jax.Array, *, train: bool, scale: int, name: str, dtype: Any = jnp.float32):
  """BatchNorm with the activation-scale rule: ``BN(s·x) / s``.

  Args:
    x: [..., C] activations (C = r·C_student in a DT).
    train: batch statistics (and running-average update) when True, running statistics when False.
    scale: s; the model's ``ratio`` (1 for the student).
  """
  bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                    dtype=dtype, name=name)
  if scale == 1:
    return bn(x)
  return bn(x * scale) / scale


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style symmetric padding k//2 (differs from 'SAME' for stride 2 on even inputs)."""
  p = kernel_size // 2
  return ((p, p), (p, p))


_DEFAULT_BRANCH_PATH: contextvars.ContextVar[str] = contextvars.ContextVar(
    "gpd_jax_orepa_branch_path", default="auto")


def _check_branch_path(path: Any) -> str:
  if path not in OREPA_BRANCH_PATHS:
    raise ValueError(f"OREPA branch_path must be one of {OREPA_BRANCH_PATHS}, got {path!r}")
  return path


@contextlib.contextmanager
def orepa_branch_path(path: str) -> Iterator[None]:
  """Sets the ``branch_path`` of the OREPA blocks that :func:`conv` builds without an explicit one.

  The value is read when a model is traced (``init``/``apply``, or the first call of a jitted
  function), not when it runs: a jitted function keeps the path it was traced with. Every path gives
  the same function up to float rounding, so this only trades compute; its main use is forcing
  'merge' (the reference behaviour) or 'run' on a whole model for tests and benchmarks::

    with orepa_branch_path("merge"):
      logits = model.apply(variables, images)
  """
  token = _DEFAULT_BRANCH_PATH.set(_check_branch_path(path))
  try:
    yield
  finally:
    _DEFAULT_BRANCH_PATH.reset(token)


def conv(x: jax.Array, features: int, kernel_size: int, *, strides: int = 1, name: str,
         ratio: int = 1, branches: bool = False, groups: int = 1, use_bias: bool = False,
         dtype: Any = jnp.float32, branch_path: str | None = None):
  """A k×k conv of the model family: a plain conv, or an OREPA block for 3×3 stride-1 convs.

  Args:
    x: [B, H, W, C_in] with C_in already in the current mode's width.
    features: output channels in the current mode (the caller multiplies by ``ratio``).
    groups: 1, or ``features`` for a depthwise conv (C_in == features).
    branches: replace the conv by a six-branch OREPA block when it is 3×3, stride 1 (§4.1).
    branch_path: the OREPA block's ``branch_path`` ('auto' | 'merge' | 'run'); None takes the
      default set by :func:`orepa_branch_path` ('auto' outside it). The models do not pass it, so
      the context manager is how a whole model is forced onto one path.
  Returns:
    [B, H', W', features].
  """
  depthwise = groups != 1
  if depthwise and not (groups == features == x.shape[-1]):
    raise ValueError(f"conv '{name}': only groups=1 or depthwise convs are supported, got groups={groups}")
  if branches and kernel_size == 3 and strides == 1:
    if branch_path is None:
      branch_path = _DEFAULT_BRANCH_PATH.get()
    return OrepaConv(features=features, depthwise=depthwise, use_bias=use_bias, scale=ratio,
                     dtype=dtype, branch_path=branch_path, name=name)(x)
  y = nn.Conv(features, (kernel_size, kernel_size), strides=strides,
              padding=torch_padding(kernel_size), feature_group_count=groups, use_bias=use_bias,
              kernel_init=conv_kernel_init, dtype=dtype, name=name)
  if depthwise and use_bias and ratio != 1:
    # Depthwise conv with bias: (conv(s·x) + b) / s. Without a bias the wrapper is the identity.
    return y(x * ratio) / ratio
  return y(x)


def frequency_prior(out_features: int, kernel_size: int = 3) -> jax.Array:
  """OREPA's fixed frequency prior P, shape [k, k, O] [code ``OREPA.fre_init``]."""
  h = jnp.arange(kernel_size, dtype=jnp.float32)[:, None, None]
  w = jnp.arange(kernel_size, dtype=jnp.float32)[None, :, None]
  o = jnp.arange(out_features, dtype=jnp.float32)[None, None, :]
  half = out_features / 2
  by_row = jnp.cos(jnp.pi * (h + 0.5) * (o + 1) / 3)
  by_col = jnp.cos(jnp.pi * (w + 0.5) * (o + 1 - half) / 3)
  return jnp.where(o < half, by_row, by_col) * jnp.ones((kernel_size, kernel_size, 1))


def identity_prior(in_features: int, depthwise: bool) -> jax.Array:
  """OREPA's identity J added to the 1×1 conv of branch 3: [I, I] (groups 1) or [1, I] (depthwise)."""
  if depthwise:
    return jnp.ones((1, in_features), jnp.float32)
  return jnp.eye(in_features, dtype=jnp.float32)


class OrepaConv(nn.Module):
  """Six-branch online-reparameterized 3×3 stride-1 conv (OREPA, as shipped in GPD's ``orepa_ft.py``).

  Factors (Flax layout, groups 1 / depthwise): ``kernel`` (branch 0, the original conv) [3,3,I,O] /
  [3,3,1,O]; ``a1``, ``a2`` [I,O] / [1,O]; ``e1`` [I,I] / [1,I]; ``c2`` [3,3,I,O] / [3,3,1,O];
  ``w4`` [3,3,I,O] / [3,3,1,O]; ``dw`` [3,3,1,8I]; ``pw`` [8I,O] / [8,O]; ``v`` [6,O]; optional ``bias``
  [O]. Constants in the ``consts`` collection: ``prior`` P [3,3,O] and ``identity`` J.

  The block's kernel is merged from its factors at every forward. The merged kernel is linear in each
  factor, so a DT (factors IR-expanded) and its student view (factors sliced) each merge their own
  kernel; the student is never a slice of the DT's merged kernel (§4.5).

  Merging branch 3 (and 5) costs the same at every step whatever the batch (O(k²·I·T·O), ~10 GMAC for
  a 1024-channel block), while running it on the activations costs O(B·H·W·(I·T + k²·T·O)).
  ``branch_path`` picks how branches 3 and 5 are evaluated: 'merge' folds all six branches into one
  kernel (one conv, the reference behaviour); 'run' runs 3 and 5 as their own convs on the
  activations and folds the rest; 'auto' (default) decides per branch at trace time from the static
  input shape, with :func:`orepa_path_plan`. All paths compute the same function up to float rounding,
  with the same parameters; CBR export always merges (:func:`merge_orepa_kernel`).

  The reference block always has a bias and drops it at export. Our block has a bias only when the
  converted conv had one (never in the shipped models): before a train-mode BatchNorm that bias gets a
  zero loss gradient, so it only carries IR noise, and leaving it out keeps CBR export exact.
  """
  features: int
  depthwise: bool = False
  use_bias: bool = False
  scale: int = 1  # the activation scale s; matters only for a depthwise block with a bias
  dtype: Any = jnp.float32
  branch_path: str = "auto"  # 'auto' | 'merge' | 'run', see the class docstring

  FACTORS = ("kernel", "a1", "a2", "e1", "c2", "w4", "dw", "pw", "v", "bias")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    if self.depthwise and in_features != self.features:
      raise ValueError(f"depthwise OrepaConv needs C_in == features, got {in_features} != {self.features}")
    if x.ndim != 4:
      raise ValueError(f"OrepaConv needs [B, H, W, C] inputs, got shape {x.shape}")
    plan = self.path_plan(x.shape)
    factors, consts = self.make_factors(in_features)
    if plan.run:
      kernel = _merge_branch_kernels(factors, consts, depthwise=self.depthwise, branches=plan.merged)
    else:
      kernel = merge_orepa_kernel(factors, consts, depthwise=self.depthwise)
    kernel = kernel.astype(self.dtype)
    groups = in_features if self.depthwise else 1
    bias = factors.get("bias")
    s = self.scale if self.depthwise else 1  # for groups 1, conv(s·x)/s + s·b/s is the identity
    xs = (x * s if s != 1 else x).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        xs, kernel, window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
    for b in plan.run:  # the same s·x input as the merged conv: the /s below covers every branch
      y = y + run_orepa_branch(b, xs, factors, consts, depthwise=self.depthwise)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y / s if s != 1 else y

  def path_plan(self, input_shape: Sequence[int]) -> "OrepaPathPlan":
    """The branch plan of this block for an input of static shape [B, H, W, C_in]."""
    batch, height, width, in_features = (int(d) for d in input_shape)
    return orepa_path_plan(self.features, in_features, self.depthwise, batch, height, width,
                           policy=self.branch_path)

  def make_factors(self, in_features: int):
    """Declares the factors (params) and constants; returns two dicts of arrays."""
    o = self.features
    i_g = 1 if self.depthwise else in_features
    mult = OREPA_DW_MULTIPLIER
    f = {
        "kernel": self.param("kernel", conv_kernel_init, (3, 3, i_g, o)),
        "a1": self.param("a1", he_uniform, (i_g, o)),
        "a2": self.param("a2", he_uniform, (i_g, o)),
        "e1": self.param("e1", nn.initializers.zeros, (i_g, in_features)),
        "c2": self.param("c2", he_uniform, (3, 3, i_g, o)),
        "w4": self.param("w4", he_uniform, (3, 3, i_g, o)),
        "dw": self.param("dw", he_uniform, (3, 3, 1, mult * in_features)),
        "pw": self.param("pw", he_uniform, (mult * i_g, o)),
        "v": self.param("v", lambda _, shape: jnp.tile(
            jnp.asarray(OREPA_SCRATCH_SCALES, jnp.float32)[:, None], (1, shape[1])),
            (OREPA_NUM_BRANCHES, o)),
    }
    if self.use_bias:
      f["bias"] = self.param("bias", nn.initializers.zeros, (o,))
    consts = {
        "prior": self.variable("consts", "prior", frequency_prior, o).value,
        "identity": self.variable("consts", "identity", identity_prior, in_features,
                                  self.depthwise).value,
    }
    return f, consts

  def gpd_rescale(self, name: str, collection: str) -> bool:
    """Whether IR divides this leaf by r (and the student view multiplies its slice by r).

    Only the factors of a groups-1 block that act as linear maps along an expanded output axis are
    rescaled (§4.4); the caller also requires that the leaf's last axis is expanded. ``dw``, ``v`` and
    the prior are never rescaled, nor is anything in a depthwise block.
    """
    del collection
    if self.depthwise:
      return False
    return name in ("kernel", "a1", "a2", "e1", "identity", "c2", "w4", "pw", "bias")


def merge_orepa_kernel(factors: dict, consts: dict, *, depthwise: bool) -> jax.Array:
  """Merges OREPA factors into one 3×3 kernel (``docs/method.md`` §4.2).

  Args:
    factors: ``kernel`` [3,3,I_g,O], ``a1``/``a2`` [I_g,O], ``e1`` [I_g,T], ``c2`` [3,3,I_g,O],
      ``w4`` [3,3,I_g,O], ``dw`` [3,3,1,8·I], ``pw`` [8·I_g,O], ``v`` [6,O] (I_g = 1 when depthwise).
    consts: ``prior`` [3,3,O], ``identity`` like ``e1``.
  Returns:
    The merged kernel [3, 3, I_g, O].
  """
  return _merge_branch_kernels(factors, consts, depthwise=depthwise,
                               branches=tuple(range(OREPA_NUM_BRANCHES)))


def _merge_branch_kernels(factors: dict, consts: dict, *, depthwise: bool,
                          branches: Sequence[int]) -> jax.Array:
  """Σ_{b in branches} v[b]·K_b (§4.2), summed in branch order; only the listed K_b are built."""
  w0, v = factors["kernel"], factors["v"]
  k = w0.shape[0]
  mult = OREPA_DW_MULTIPLIER
  hi = jax.lax.Precision.HIGHEST

  def branch_kernel(b: int) -> jax.Array:
    if b == 0:
      return w0
    if b == 1:
      return jnp.broadcast_to(factors["a1"] / (k * k), w0.shape)
    if b == 2:
      return factors["a2"][None, None] * consts["prior"][:, :, None, :]
    if b == 4:
      return factors["w4"]
    e1, c2, dw, pw = factors["e1"], factors["c2"], factors["dw"], factors["pw"]
    if depthwise:
      if b == 3:
        return (e1 + consts["identity"])[0][None, None, None, :] * c2
      channels = w0.shape[-1]
      dw_ = dw.reshape(k, k, channels, mult)  # dw[..., 8c + u] -> [..., c, u]
      return jnp.einsum("hwcu,uc->hwc", dw_, pw, precision=hi)[:, :, None, :]
    if b == 3:
      return jnp.einsum("it,hwto->hwio", e1 + consts["identity"], c2, precision=hi)
    in_features = w0.shape[2]
    dw_ = dw.reshape(k, k, in_features, mult)
    pw_ = pw.reshape(in_features, mult, -1)
    return jnp.einsum("hwiu,iuo->hwio", dw_, pw_, precision=hi)

  return sum(v[b] * branch_kernel(b) for b in sorted(branches))


@dataclasses.dataclass(frozen=True)
class OrepaPathPlan:
  """How one OREPA block evaluates its branches for a static input shape, and what it costs.

  Costs are leading-order multiply-accumulates of one forward (the backward of either path costs about
  twice its forward, so the comparison holds for training too); ``v`` scalings, additions and the bias
  are O(k²·I·O) or O(B·H·W·O) and left out. ``merge_macs[b]`` is the cost of folding branch b into the
  merged kernel (independent of the batch), ``run_macs[b]`` that of running it as its own convs on the
  activations. Only the branches in ``OREPA_RUNNABLE_BRANCHES`` can run; the others always merge.
  """
  features: int
  in_features: int
  depthwise: bool
  batch: int
  height: int
  width: int
  policy: str
  run_cost_factor: float
  merge_macs: tuple[int, ...]
  run_macs: tuple[int, ...]
  run: tuple[int, ...]  # branches run on the activations, the others are merged

  @property
  def merged(self) -> tuple[int, ...]:
    return tuple(b for b in range(OREPA_NUM_BRANCHES) if b not in self.run)

  @property
  def conv_macs(self) -> int:
    """The conv with the merged kernel, run on every path."""
    i_g = 1 if self.depthwise else self.in_features
    return self.batch * self.height * self.width * 9 * i_g * self.features

  def macs(self, run: Sequence[int] | None = None) -> int:
    """Total forward MACs when the branches in ``run`` (default: this plan's) run on activations."""
    run = self.run if run is None else tuple(run)
    return (self.conv_macs + sum(self.run_macs[b] for b in run)
            + sum(self.merge_macs[b] for b in range(OREPA_NUM_BRANCHES) if b not in run))


def orepa_path_plan(features: int, in_features: int, depthwise: bool, batch: int, height: int,
                    width: int, *, policy: str = "auto",
                    run_cost_factor: float = OREPA_RUN_COST_FACTOR) -> OrepaPathPlan:
  """Per-branch cost of merging vs running a 3×3 OREPA block's branches, and the chosen path.

  With I the input width, O = ``features``, T = I the internal width of branch 3, N = B·H·W and
  k² = 9 (I_g = T_g = 1 for a depthwise block, where I = O):

  * branch 3 (1×1 e1 + J, then k×k c2): merge k²·I_g·T·O, run N·(I·T_g + k²·T_g·O);
  * branch 5 (depthwise dw ×8, then pointwise pw): merge k²·8·I_g·O, run N·(k²·8·I + 8·I_g·O);
  * branches 0, 2, 4 (k×k kernels): merge k²·I_g·O, run N·k²·I_g·O; branch 1 (1×1 then average
    pool): merge k²·I_g·O, run N·(I_g·O + k²·O). These always merge.

  For a groups-1 block with I = T = O = C, running branch 3 costs fewer MACs iff N < 0.9·C, and
  'auto' (with the default ``run_cost_factor`` 1.25) runs it iff N < 0.72·C: e.g. the 1024-channel
  convs of a ResNet-18 DT (r = 2) at 7×7 run it for B ≤ 15 and merge it above.

  Args:
    policy: 'auto' runs each runnable branch b with ``run_cost_factor · run_macs[b] <
      merge_macs[b]``; 'merge' runs none; 'run' runs all of ``OREPA_RUNNABLE_BRANCHES``.
    run_cost_factor: weight of the run path's MACs in 'auto' (``OREPA_RUN_COST_FACTOR``).
  """
  _check_branch_path(policy)
  o, i = int(features), int(in_features)
  i_g = t_g = 1 if depthwise else i
  mult = OREPA_DW_MULTIPLIER
  kk = 9
  n = int(batch) * int(height) * int(width)
  merge_macs = (kk * i_g * o, kk * i_g * o, kk * i_g * o, kk * i_g * t_g * o, kk * i_g * o,
                kk * mult * i_g * o)
  full_conv = n * kk * i_g * o
  run_macs = (full_conv, n * (i_g * o + kk * o), full_conv, n * (i * t_g + kk * t_g * o), full_conv,
              n * (kk * mult * i + mult * i_g * o))
  if policy == "merge":
    run = ()
  elif policy == "run":
    run = OREPA_RUNNABLE_BRANCHES
  else:
    run = tuple(b for b in OREPA_RUNNABLE_BRANCHES
                if run_cost_factor * run_macs[b] < merge_macs[b])
  return OrepaPathPlan(features=o, in_features=i, depthwise=bool(depthwise), batch=int(batch),
                       height=int(height), width=int(width), policy=policy,
                       run_cost_factor=float(run_cost_factor), merge_macs=merge_macs,
                       run_macs=run_macs, run=run)


def run_orepa_branch(branch: int, x: jax.Array, factors: dict, consts: dict, *,
                     depthwise: bool) -> jax.Array:
  """Runs one factored OREPA branch (3 or 5) on the activations, scaled by ``v``.

  Equals ``conv(x, v[branch]·K_branch)`` (§4.2) up to float rounding, at
  O(B·H·W·(I·T + k²·T·O)) (branch 3) or O(B·H·W·(k²·8·I + 8·I·O)) (branch 5) MACs instead of the
  batch-independent cost of building K_branch. Computes in ``x.dtype``, like the merged conv.

  Args:
    x: [B, H, W, I] (already multiplied by the activation scale s, if any).
  Returns:
    [B, H, W, O].
  """
  dtype = x.dtype
  channels = x.shape[-1]
  k = factors["kernel"].shape[0]
  v = factors["v"][branch]
  groups = channels if depthwise else 1

  def conv_kxk(inp, kern, group_count):
    return jax.lax.conv_general_dilated(
        inp, kern.astype(dtype), (1, 1), ((k // 2, k // 2), (k // 2, k // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=group_count)

  if branch == 3:
    inner = (factors["e1"] + consts["identity"]).astype(dtype)  # [I_g, T]
    # 1×1 conv x -> t (a per-channel scaling when depthwise), then the k×k conv v·c2.
    t = x * inner[0] if depthwise else jnp.matmul(x, inner)
    return conv_kxk(t, factors["c2"] * v, groups)
  if branch == 5:
    d = conv_kxk(x, factors["dw"], channels)  # [B, H, W, 8·I], channel 8i + u
    pw = (factors["pw"] * v).astype(dtype)  # [8·I_g, O]
    if depthwise:
      d = d.reshape(*d.shape[:-1], channels, OREPA_DW_MULTIPLIER)
      return jnp.einsum("bhwcu,uc->bhwc", d, pw)
    return jnp.matmul(d, pw)
  raise ValueError(f"only branches {OREPA_RUNNABLE_BRANCHES} can run on the activations, got {branch}")


def orepa_branch_outputs(x: jax.Array, factors: dict, consts: dict, *, depthwise: bool):
  """Runs the six OREPA branches as separate convs on x (test oracle for the merged kernel).

  Returns:
    List of six [B, H, W, O] outputs, already scaled by ``v``; their sum equals
    ``conv(x, merge_orepa_kernel(...))``.
  """
  k = factors["kernel"].shape[0]
  channels = x.shape[-1]
  groups = channels if depthwise else 1
  hi = jax.lax.Precision.HIGHEST

  def conv2d(inp, kern, group_count, padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(inp, kern, (1, 1), padding, dimension_numbers=(
        "NHWC", "HWIO", "NHWC"), feature_group_count=group_count, precision=hi)

  v = factors["v"]
  out0 = conv2d(x, factors["kernel"], groups)
  # Branch 1: 1×1 conv, then k×k average pooling (zero padding counted, as in OREPA's merge).
  y1 = conv2d(x, factors["a1"][None, None], groups, padding=((0, 0), (0, 0)))
  out1 = conv2d(y1, jnp.full((k, k, 1, y1.shape[-1]), 1.0 / (k * k), x.dtype), y1.shape[-1])
  # Branch 2: the prior-weighted conv.
  out2 = conv2d(x, factors["a2"][None, None] * consts["prior"][:, :, None, :], groups)
  # Branch 3: 1×1 conv (e1 + J) into the k×k conv c2.
  t = conv2d(x, (factors["e1"] + consts["identity"])[None, None], groups, padding=((0, 0), (0, 0)))
  out3 = conv2d(t, factors["c2"], groups)
  out4 = conv2d(x, factors["w4"], groups)
  # Branch 5: depthwise k×k with multiplier 8, then a (grouped) pointwise conv.
  d = conv2d(x, factors["dw"], channels)
  out5 = conv2d(d, factors["pw"][None, None], groups, padding=((0, 0), (0, 0)))
  return [v[b] * out for b, out in enumerate((out0, out1, out2, out3, out4, out5))]


def global_avg_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torchvision's stem max pool: 3×3, stride 2, padding 1 (pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def head(x: jax.Array, num_classes: int, *, dtype: Any = jnp.float32, name: str = "fc"):
  """Classifier head (the GPD 'last' layer): [B, C] -> float32 logits [B, num_classes]."""
  return nn.Dense(num_classes, dtype=dtype, name=name)(x).astype(jnp.float32)


def widths(base: Sequence[int], ratio: int) -> list[int]:
  """Hidden widths of the current mode."""
  return [int(c) * ratio for c in base]


@flax.struct.dataclass
class Features:
  """The feature taps of a model, returned next to the logits when ``return_features=True``.

  Shapes for a batch of B images; widths are the current mode's (×r in a DT, where every tap carries
  1/r of the student's activation, copy-major: the IR invariant). N is the number of stages (4 for the
  ImageNet models, 3 for the CIFAR ResNets and WRNs).

  Attributes:
    stem: [B, H0, W0, C0] the output at the stem's resolution, after its activation.
    preact_stem: [B, H0, W0, C0] the same tensor before its last ReLU (``stem`` where there is none).
    stages: N tensors [B, Hi, Wi, Ci], the output of each stage (the last block of each resolution).
    preact_stages: N tensors like ``stages``, taken before the stage's last ReLU. In a pre-activation
      network (WRN) a stage ends without a ReLU; there the tap is the BatchNorm output that precedes
      the next ReLU (the next stage's first BN, or the final BN for the last stage).
    pooled: [B, C_N] the globally pooled penultimate feature, the input of the classifier.
  """
  stem: jax.Array
  preact_stem: jax.Array
  stages: tuple[jax.Array, ...]
  preact_stages: tuple[jax.Array, ...]
  pooled: jax.Array


def classifier_outputs(module: nn.Module, pooled: jax.Array, **taps):
  """The classifier ``fc`` on ``pooled`` [B, C]: float32 logits [B, module.num_classes], or
  ``(logits, Features(pooled=pooled, **taps))`` when ``module.return_features``."""
  logits = head(pooled, module.num_classes, dtype=module.dtype)
  if not module.return_features:
    return logits
  return logits, Features(pooled=pooled, **taps)
