"""Vision transformers for GPD: DeiT/ViT and RVT, built as student or dynamic teacher (DT).

Like the CNNs, every module takes ``ratio`` (1 = student, r = its DT) and ``branches`` as static fields
and is given student widths. The DT rules for transformers (``docs/method.md`` §7):

* **Heads ×r, head width kept.** A DT attention layer has r·h heads of width d = C/h, so the softmax
  scale d^(-1/2) is unchanged. The qkv Dense is an ordinary middle layer whose tiled output is
  copy-major ``[q¹ k¹ v¹ | q² k² v² | ...]``; the forward reshapes it to (B, N, r, 3, h, d) and then to
  r·h heads, and multiplies q and k (not v) by s = r, which restores the student's attention logits.
* **Activation-scale rule.** The residual stream of a DT carries ``tile(x/r)``; LayerNorm, BatchNorm,
  GELU and biased grouped convs see ``s·x`` and return ``f(s·x)/s``.
* **Tokens and position embeddings** are added to the residual stream, so they are stored as
  ``tile(p/r)`` and read back as ``r·p[..., :C]``: they live in :class:`ResidualParams`, whose
  ``gpd_rescale`` tells ``derive_spec`` so.
* The patch embedding's first conv is the stem ('first' module) and the classifier heads are 'last'
  modules; ``derive_spec`` finds both from the shapes, as for the CNNs.

Models: ``deit_tiny``/``deit_small`` (:class:`VisionTransformer`: class token, learned position
embeddings, optional distillation token, as timm's DeiT) and ``rvt_tiny``/``rvt_small``
(:class:`RobustViT`: the RVT of GPD's reference code, with a conv stem, no class token and no position
embedding, a conv-FFN with BatchNorm and a depthwise conv, stride-2 grouped pooling convs between
stages, and a global-average-pool head).

Inputs are [B, H, W, C] images with H = W = ``image_size``; logits are float32 [B, num_classes].
Stochastic depth (``drop_path_rate`` > 0) draws from the ``'dropout'`` rng stream in train mode.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpd_jax.models.layers import batch_norm, conv, head

LN_EPSILON = 1e-6  # timm's ViT/DeiT and RVT
# RVT's copy of OREPA converts only 3×3 stride-1 convs with fewer output channels than this
# (``docs/method.md`` §4.1); RVT-Ti's conv-FFN depthwise convs (768, 1536) are all above it.
RVT_OREPA_MAX_CHANNELS = 700

trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def _module_path(module: nn.Module) -> str:
  return "/".join(module.scope.path) if module.scope is not None else type(module).__name__


def check_ratio_field(ratio: Any, where: str) -> int:
  """A model's ``ratio`` must be a positive integer: a DT attention layer has ``ratio × heads`` heads."""
  if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
    raise ValueError(f"{where}: ratio must be a positive integer (a DT has ratio × num_heads whole "
                     f"attention heads of the student's head width), got {ratio!r}")
  return ratio


def layer_norm(x: jax.Array, *, scale: int, name: str, dtype: Any = jnp.float32) -> jax.Array:
  """LayerNorm over the last axis with the activation-scale rule: ``LN(s·x) / s``.

  ``x``: [..., C] (C = r·C_student in a DT). The mean and variance over the r·C channels of
  ``tile(y)`` equal those of y, so the epsilon is unchanged.
  """
  norm = nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, name=name)
  if scale == 1:
    return norm(x)
  return norm(x * scale) / scale


def gelu(x: jax.Array, *, scale: int) -> jax.Array:
  """Exact (erf) GELU, as PyTorch's ``nn.GELU``, with the activation-scale rule ``GELU(s·x)/s``."""
  if scale == 1:
    return nn.gelu(x, approximate=False)
  return nn.gelu(x * scale, approximate=False) / scale


def drop_path(x: jax.Array, branch: jax.Array, *, rate: float, train: bool,
              module: nn.Module) -> jax.Array:
  """Residual add with stochastic depth: ``x + mask·branch/(1-rate)``, one Bernoulli per example.

  Args:
    x, branch: [B, ...] residual stream and the block's branch output.
    module: the calling module, whose ``'dropout'`` rng stream draws the mask. The DT and its student
      view share module paths, so one key gives both the same mask (as the reference code's matched
      drop-path does).
  """
  if not train or rate == 0.0:
    return x + branch
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x + jnp.where(mask, branch / keep, jnp.zeros_like(branch))


class ResidualParams(nn.Module):
  """Learned tensors that are concatenated to or added to the residual stream (tokens, positions).

  Each entry of ``shapes`` is a parameter of shape ``(*lead, C)`` with C the current mode's width.
  In a DT the residual stream is ``tile(x/r)``, so IR stores these as ``tile(p/r)`` and the student
  view reads ``r·p[..., :C]`` (:meth:`gpd_rescale`).
  """
  shapes: Sequence[tuple[str, tuple[int, ...]]]
  dtype: Any = jnp.float32

  gpd_role = "residual"  # the spec's role label: 'residual:<name>'

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {name: self.param(name, trunc_normal_02, tuple(shape)).astype(self.dtype)
            for name, shape in self.shapes}

  def gpd_rescale(self, name: str, collection: str) -> bool:
    """Residual-stream parameters are divided by r in the DT (``derive_spec`` protocol)."""
    del name, collection
    return True


class Attention(nn.Module):
  """Multi-head self-attention whose DT has ``ratio × num_heads`` heads of the same width.

  ``dim`` and ``num_heads`` are the student's; the input is [B, N, ratio·dim] and so is the output.
  """
  dim: int
  num_heads: int
  ratio: int = 1
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    where = f"attention layer '{_module_path(self)}'"
    ratio = check_ratio_field(self.ratio, where)
    if self.num_heads < 1 or self.dim % self.num_heads:
      raise ValueError(f"{where}: embedding width {self.dim} is not divisible by num_heads="
                       f"{self.num_heads}; choose a head count that divides the width")
    if x.shape[-1] != ratio * self.dim:
      raise ValueError(f"{where}: input width {x.shape[-1]} != ratio × dim = {ratio} × {self.dim}")
    batch, tokens, width = x.shape
    head_dim = self.dim // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal_02)
    qkv = dense(3 * width, use_bias=self.qkv_bias, name="qkv")(x)
    # Copy-major layout of the tiled qkv output: (copy, q/k/v, head, head_dim).
    qkv = qkv.reshape(batch, tokens, ratio, 3, self.num_heads, head_dim)
    q, k, v = (qkv[:, :, :, i].reshape(batch, tokens, ratio * self.num_heads, head_dim)
               for i in range(3))
    if ratio != 1:  # each DT copy holds q/r and k/r: rescaling both restores the student's logits
      q, k = q * ratio, k * ratio
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
    # Softmax in at least float32 (bfloat16 compute would lose the small weights).
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    weights = weights.astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
    return dense(width, name="proj")(out)


class Mlp(nn.Module):
  """fc1 (×mlp_ratio) -> GELU -> fc2 on [B, N, ratio·dim]."""
  dim: int
  hidden: int
  ratio: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal_02)
    y = gelu(dense(self.hidden * self.ratio, name="fc1")(x), scale=self.ratio)
    return dense(self.dim * self.ratio, name="fc2")(y)


class ConvMlp(nn.Module):
  """RVT's conv-FFN on a square token grid: 1×1 conv-BN-GELU, depthwise 3×3 conv-BN-GELU, 1×1 conv-BN.

  Input/output [B, N, ratio·dim] with N = H·W, H = W. With ``branches`` the depthwise conv becomes a
  depthwise OREPA block when its student width is below RVT's limit (``RVT_OREPA_MAX_CHANNELS``).
  """
  dim: int
  hidden: int
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batch, tokens, width = x.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
      raise ValueError(f"conv-FFN '{_module_path(self)}' needs a square token grid, got {tokens} tokens")
    hidden = self.hidden * self.ratio
    conv_ = functools.partial(conv, ratio=self.ratio, use_bias=True, dtype=self.dtype)
    bn = functools.partial(batch_norm, train=train, scale=self.ratio, dtype=self.dtype)
    y = x.reshape(batch, side, side, width)
    y = gelu(bn(conv_(y, hidden, 1, name="fc1"), name="bn1"), scale=self.ratio)
    branched = self.branches and self.hidden < RVT_OREPA_MAX_CHANNELS
    y = conv_(y, hidden, 3, groups=hidden, branches=branched, name="dwconv")
    y = gelu(bn(y, name="bn2"), scale=self.ratio)
    y = bn(conv_(y, width, 1, name="fc2"), name="bn3")
    return y.reshape(batch, tokens, width)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)), with optional drop-path."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  conv_mlp: bool = False  # RVT's conv-FFN instead of the Dense MLP
  drop_path_rate: float = 0.0
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(layer_norm, scale=self.ratio, dtype=self.dtype)
    residual = functools.partial(drop_path, rate=self.drop_path_rate, train=train, module=self)
    y = Attention(self.dim, self.num_heads, ratio=self.ratio, dtype=self.dtype,
                  name="attn")(norm(x, name="norm1"))
    x = residual(x, y)
    hidden = int(self.dim * self.mlp_ratio)
    y = norm(x, name="norm2")
    if self.conv_mlp:
      y = ConvMlp(self.dim, hidden, ratio=self.ratio, branches=self.branches, dtype=self.dtype,
                  name="mlp")(y, train)
    else:
      y = Mlp(self.dim, hidden, ratio=self.ratio, dtype=self.dtype, name="mlp")(y)
    return residual(x, y)


def _drop_path_rates(rate: float, depth: int, *, inclusive: bool) -> list[float]:
  """Stochastic-depth rates rising linearly over the blocks.

  ``inclusive``: DeiT's ``linspace(0, rate, depth)`` (the last block gets ``rate``); otherwise RVT's
  ``rate·i/depth``.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"drop_path_rate must be in [0, 1), got {rate!r}")
  if inclusive:
    return [rate * i / max(depth - 1, 1) for i in range(depth)]
  return [rate * i / depth for i in range(depth)]


class VisionTransformer(nn.Module):
  """ViT / DeiT: patch embedding, [class token (+ distillation token)] + positions, pre-LN blocks.

  The logits are the head on the class token; with ``distilled`` the mean of ``head`` (class token)
  and ``head_dist`` (distillation token), as DeiT evaluates. Input [B, image_size, image_size, C].
  """
  num_classes: int
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  patch_size: int = 16
  image_size: int = 224
  distilled: bool = False
  drop_path_rate: float = 0.0
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    name = type(self).__name__
    ratio = check_ratio_field(self.ratio, name)
    if self.branches:
      raise ValueError(f"{name} has no 3×3 convs, so it takes no OREPA branches: set branches=False "
                       "(config.gpd.branches=False)")
    if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
      raise ValueError(f"{name} was built for [B, {self.image_size}, {self.image_size}, C] inputs "
                       f"(field image_size, which sizes the position embedding), got {x.shape}")
    if self.image_size % self.patch_size:
      raise ValueError(f"{name}: image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    width = self.embed_dim * ratio
    p = self.patch_size
    x = nn.Conv(width, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                name="patch_embed")(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, width)
    num_tokens = 2 if self.distilled else 1
    shapes = [("cls_token", (1, 1, width))]
    if self.distilled:
      shapes.append(("dist_token", (1, 1, width)))
    shapes.append(("pos_embed", (1, x.shape[1] + num_tokens, width)))
    extra = ResidualParams(tuple(shapes), dtype=self.dtype, name="tokens")()
    lead = [jnp.broadcast_to(extra[n], (x.shape[0], 1, width)) for n, _ in shapes[:num_tokens]]
    x = jnp.concatenate(lead + [x], axis=1) + extra["pos_embed"]
    for i, rate in enumerate(_drop_path_rates(self.drop_path_rate, self.depth, inclusive=True)):
      x = Block(self.embed_dim, self.num_heads, self.mlp_ratio, drop_path_rate=rate, ratio=ratio,
                dtype=self.dtype, name=f"blocks_{i}")(x, train)
    x = layer_norm(x, scale=ratio, name="norm", dtype=self.dtype)
    logits = head(x[:, 0], self.num_classes, dtype=self.dtype, name="head")
    if not self.distilled:
      return logits
    return (logits + head(x[:, 1], self.num_classes, dtype=self.dtype, name="head_dist")) / 2


class RobustViT(nn.Module):
  """RVT (Mao et al., CVPR 2022) as in GPD's reference code.

  Conv stem (7×7/2 conv with bias -> BN -> 3×3/2 max pool -> (patch/4)×(patch/4) conv with bias), then
  per stage ``depths[i]`` pre-LN blocks of width ``base_dims[i]·heads[i]`` with a conv-FFN, a stride-2
  grouped conv (kernel 3, one group per input channel, bias) between stages, global average pooling,
  LayerNorm and the head. Input [B, H, W, C] with the token grid square at every stage.
  """
  num_classes: int
  base_dims: Sequence[int] = (32, 32)
  depths: Sequence[int] = (10, 2)
  heads: Sequence[int] = (6, 12)
  mlp_ratio: float = 4.0
  patch_size: int = 16
  stem_width: int = 32
  image_size: int = 224  # the training resolution; any size with a square token grid works
  drop_path_rate: float = 0.0
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    name = type(self).__name__
    ratio = check_ratio_field(self.ratio, name)
    if not len(self.base_dims) == len(self.depths) == len(self.heads):
      raise ValueError(f"{name}: base_dims, depths and heads need one entry per stage, got "
                       f"{self.base_dims}, {self.depths}, {self.heads}")
    if self.patch_size % 4:
      raise ValueError(f"{name}: patch_size must be a multiple of 4 (stem stride 4), got {self.patch_size}")
    bn = functools.partial(batch_norm, train=train, scale=ratio, dtype=self.dtype)
    x = nn.Conv(self.stem_width * ratio, (7, 7), strides=2, padding=((2, 2), (2, 2)),
                dtype=self.dtype, name="stem_conv")(x.astype(self.dtype))
    x = bn(x, name="stem_bn")
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    k = self.patch_size // 4
    dims = [d * h for d, h in zip(self.base_dims, self.heads)]
    x = nn.Conv(dims[0] * ratio, (k, k), strides=k, padding="VALID", dtype=self.dtype,
                name="patch_proj")(x)
    rates = iter(_drop_path_rates(self.drop_path_rate, sum(self.depths), inclusive=False))
    for stage, (dim, depth, num_heads) in enumerate(zip(dims, self.depths, self.heads)):
      b, h, w, c = x.shape
      tokens = x.reshape(b, h * w, c)
      for i in range(depth):
        tokens = Block(dim, num_heads, self.mlp_ratio, conv_mlp=True, drop_path_rate=next(rates),
                       ratio=ratio, branches=self.branches, dtype=self.dtype,
                       name=f"stage{stage}_block{i}")(tokens, train)
      x = tokens.reshape(b, h, w, c)
      if stage + 1 < len(dims):
        if dims[stage + 1] % dim:
          raise ValueError(f"{name}: pooling conv 'pool{stage}' maps {dim} to {dims[stage + 1]} "
                           "channels with one group per input channel; the width must grow by an "
                           "integer factor")
        pool = nn.Conv(dims[stage + 1] * ratio, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                       feature_group_count=c, dtype=self.dtype, name=f"pool{stage}")
        # A grouped conv with a bias follows the rule (conv(s·x) + b)/s.
        x = pool(x * ratio) / ratio if ratio != 1 else pool(x)
    x = layer_norm(jnp.mean(x, axis=(1, 2)), scale=ratio, name="norm", dtype=self.dtype)
    return head(x, self.num_classes, dtype=self.dtype, name="head")


REGISTRY = {
    "deit_tiny": functools.partial(VisionTransformer, embed_dim=192, depth=12, num_heads=3),
    "deit_small": functools.partial(VisionTransformer, embed_dim=384, depth=12, num_heads=6),
    "rvt_tiny": functools.partial(RobustViT, base_dims=(32, 32), depths=(10, 2), heads=(6, 12)),
    "rvt_small": functools.partial(RobustViT, base_dims=(64,), depths=(12,), heads=(6,)),
    # A small ViT for 28×28 Fashion-MNIST (patch 4: 49 tokens), for CPU experiments.
    "vit_fashion": functools.partial(VisionTransformer, embed_dim=64, depth=4, num_heads=2,
                                     patch_size=4, image_size=28),
}
