"""Layers shared by every model, written once for the student and its dynamic teacher (DT).

A model is built in one of three modes, chosen by two static module fields (no mutable state):

* ``ratio=1, branches=False``: the plain student (what ``models.create`` returns and what CBR exports);
* ``ratio=1, branches=True``: the training-time student view of a DT with OREPA branches;
* ``ratio=r``: the dynamic teacher, every hidden width ×r (stem input and head output unchanged).

The activation-scale rule (``gpd_method.md`` §3.4): inside a DT every hidden activation carries 1/r of
the student's value, so layers that are not positively homogeneous see ``s·x`` and return ``f(s·x)/s``
with ``s = ratio``. In student mode ``s = 1`` and the wrappers vanish.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
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


def conv(x: jax.Array, features: int, kernel_size: int, *, strides: int = 1, name: str,
         ratio: int = 1, branches: bool = False, groups: int = 1, use_bias: bool = False,
         dtype: Any = jnp.float32):
  """A k×k conv of the model family: a plain conv, or an OREPA block for 3×3 stride-1 convs.

  Args:
    x: [B, H, W, C_in] with C_in already in the current mode's width.
    features: output channels in the current mode (the caller multiplies by ``ratio``).
    groups: 1, or ``features`` for a depthwise conv (C_in == features).
    branches: replace the conv by a six-branch OREPA block when it is 3×3, stride 1 (§4.1).
  Returns:
    [B, H', W', features].
  """
  depthwise = groups != 1
  if depthwise and not (groups == features == x.shape[-1]):
    raise ValueError(f"conv '{name}': only groups=1 or depthwise convs are supported, got groups={groups}")
  if branches and kernel_size == 3 and strides == 1:
    return OrepaConv(features=features, depthwise=depthwise, use_bias=use_bias, scale=ratio,
                     dtype=dtype, name=name)(x)
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

  The block's kernel is merged from its factors at every forward (one conv per forward). The merged
  kernel is linear in each factor, so a DT (factors IR-expanded) and its student view (factors sliced)
  each merge their own kernel; the student is never a slice of the DT's merged kernel (§4.5).

  The reference block always has a bias and drops it at export. Our block has a bias only when the
  converted conv had one (never in the shipped models): before a train-mode BatchNorm that bias gets a
  zero loss gradient, so it only carries IR noise, and leaving it out keeps CBR export exact.
  """
  features: int
  depthwise: bool = False
  use_bias: bool = False
  scale: int = 1  # the activation scale s; matters only for a depthwise block with a bias
  dtype: Any = jnp.float32

  FACTORS = ("kernel", "a1", "a2", "e1", "c2", "w4", "dw", "pw", "v", "bias")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    if self.depthwise and in_features != self.features:
      raise ValueError(f"depthwise OrepaConv needs C_in == features, got {in_features} != {self.features}")
    factors, consts = self.make_factors(in_features)
    kernel = merge_orepa_kernel(factors, consts, depthwise=self.depthwise).astype(self.dtype)
    groups = in_features if self.depthwise else 1
    bias = factors.get("bias")
    s = self.scale if self.depthwise else 1  # for groups 1, conv(s·x)/s + s·b/s is the identity
    y = jax.lax.conv_general_dilated(
        (x * s if s != 1 else x).astype(self.dtype), kernel, window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y / s if s != 1 else y

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
  """Merges OREPA factors into one 3×3 kernel (``gpd_method.md`` §4.2).

  Args:
    factors: ``kernel`` [3,3,I_g,O], ``a1``/``a2`` [I_g,O], ``e1`` [I_g,T], ``c2`` [3,3,I_g,O],
      ``w4`` [3,3,I_g,O], ``dw`` [3,3,1,8·I], ``pw`` [8·I_g,O], ``v`` [6,O] (I_g = 1 when depthwise).
    consts: ``prior`` [3,3,O], ``identity`` like ``e1``.
  Returns:
    The merged kernel [3, 3, I_g, O].
  """
  w0, a1, a2, e1 = factors["kernel"], factors["a1"], factors["a2"], factors["e1"]
  c2, w4, dw, pw, v = factors["c2"], factors["w4"], factors["dw"], factors["pw"], factors["v"]
  prior, ident = consts["prior"], consts["identity"]
  k = w0.shape[0]
  mult = OREPA_DW_MULTIPLIER
  hi = jax.lax.Precision.HIGHEST
  k0 = w0
  k1 = jnp.broadcast_to(a1 / (k * k), w0.shape)
  k2 = a2[None, None] * prior[:, :, None, :]
  if depthwise:
    channels = w0.shape[-1]
    k3 = (e1 + ident)[0][None, None, None, :] * c2
    dw_ = dw.reshape(k, k, channels, mult)  # dw[..., 8c + u] -> [..., c, u]
    k5 = jnp.einsum("hwcu,uc->hwc", dw_, pw, precision=hi)[:, :, None, :]
  else:
    in_features = w0.shape[2]
    k3 = jnp.einsum("it,hwto->hwio", e1 + ident, c2, precision=hi)
    dw_ = dw.reshape(k, k, in_features, mult)
    pw_ = pw.reshape(in_features, mult, -1)
    k5 = jnp.einsum("hwiu,iuo->hwio", dw_, pw_, precision=hi)
  branches = (k0, k1, k2, k3, w4, k5)
  return sum(v[b] * kb for b, kb in enumerate(branches))


def orepa_branch_outputs(x: jax.Array, factors: dict, consts: dict, *, depthwise: bool):
  """Runs the six OREPA branches as separate convs on x (test oracle for the merged kernel).

  Returns:
    List of six [B, H, W, O] outputs, already scaled by ``v``; their sum equals
    ``conv(x, merge_orepa_kernel(...))``.
  """
  k = factors["kernel"].shape[0]
  channels = x.shape[-1]
  groups = channels if depthwise else 1
  mult = OREPA_DW_MULTIPLIER
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

