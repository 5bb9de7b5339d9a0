"""ResNets: torchvision's ImageNet layout and mdistiller's CIFAR layout, built as student or DT.

Every module takes ``ratio`` (DT width multiplier, also the activation scale s) and ``branches`` (OREPA
blocks on 3×3 stride-1 convs) as static fields; widths given to a module are student widths. A model
built with ``return_features=True`` returns ``(logits, Features)`` instead of the logits (same
variables; see ``layers.Features`` for the taps).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpd_jax.models.layers import (batch_norm, classifier_outputs, conv, global_avg_pool,
                                   max_pool_3x3_s2)


class BasicBlock(nn.Module):
  """3×3 conv-BN-ReLU, 3×3 conv-BN, projection shortcut (1×1 conv + BN) when the shape changes.

  Returns the block output [B, H', W', r·features]; with ``return_preact`` the pair (output, the sum
  before the final ReLU).
  """
  features: int  # student width
  strides: int = 1
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    width = self.features * self.ratio
    conv_ = functools.partial(conv, ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    bn = functools.partial(batch_norm, train=train, scale=self.ratio, dtype=self.dtype)
    y = nn.relu(bn(conv_(x, width, 3, strides=self.strides, name="conv1"), name="bn1"))
    y = bn(conv_(y, width, 3, name="conv2"), name="bn2")
    if self.strides != 1 or x.shape[-1] != width:
      x = bn(conv_(x, width, 1, strides=self.strides, name="downsample_conv"), name="downsample_bn")
    preact = x + y
    return (nn.relu(preact), preact) if self.return_preact else nn.relu(preact)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: 1×1, 3×3 (strided), 1×1 (×4), projection shortcut when needed.

  Returns [B, H', W', 4·r·features]; with ``return_preact`` the pair (output, sum before the ReLU).
  """
  features: int  # student inner width; output is 4× this
  strides: int = 1
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  expansion: int = 4
  return_preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    width = self.features * self.ratio
    out = width * self.expansion
    conv_ = functools.partial(conv, ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    bn = functools.partial(batch_norm, train=train, scale=self.ratio, dtype=self.dtype)
    y = nn.relu(bn(conv_(x, width, 1, name="conv1"), name="bn1"))
    y = nn.relu(bn(conv_(y, width, 3, strides=self.strides, name="conv2"), name="bn2"))
    y = bn(conv_(y, out, 1, name="conv3"), name="bn3")
    if self.strides != 1 or x.shape[-1] != out:
      x = bn(conv_(x, out, 1, strides=self.strides, name="downsample_conv"), name="downsample_bn")
    preact = x + y
    return (nn.relu(preact), preact) if self.return_preact else nn.relu(preact)


def _residual_stages(x, train, block_cls, widths, depths, **kw):
  """Blocks ``layer{i+1}_{j}`` (stage i, block j; stride 2 at the first block of every stage but
  the first), called inside the parent's compact ``__call__``.

  Returns ``(x, stages, preact_stages)``: the last output and, per stage, its output and its last
  block's pre-ReLU sum.
  """
  stages, preact_stages = [], []
  for i, (width, n) in enumerate(zip(widths, depths)):
    for j in range(n):
      x, preact = block_cls(width, 2 if i > 0 and j == 0 else 1, name=f"layer{i + 1}_{j}",
                            return_preact=True, **kw)(x, train)
    stages.append(x)
    preact_stages.append(preact)
  return x, tuple(stages), tuple(preact_stages)


class ResNet(nn.Module):
  """torchvision ImageNet ResNet: 7×7/2 stem, 3×3/2 max pool, four stages, global pool, fc.

  Input [B, H, W, C] (any C), output float32 logits [B, num_classes]; with ``return_features``,
  ``(logits, Features)``: the stem is the BN-ReLU output before the max pool (preact: the BN output),
  the stages are ``layer1..4`` (preact: the last block's sum before its ReLU).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"  # 'basic' | 'bottleneck'
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    kw = dict(ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    x = conv(x.astype(self.dtype), self.stem_width * self.ratio, 7, strides=2, name="conv1", **kw)
    preact_stem = batch_norm(x, train=train, scale=self.ratio, dtype=self.dtype, name="bn1")
    stem = nn.relu(preact_stem)
    x, stages, preact_stages = _residual_stages(max_pool_3x3_s2(stem), train, block_cls,
                                                self.widths, self.stage_sizes, **kw)
    return classifier_outputs(self, global_avg_pool(x), stem=stem, preact_stem=preact_stem, stages=stages,
                    preact_stages=preact_stages)


class CifarResNet(nn.Module):
  """mdistiller/RepDistiller CIFAR ResNet (depth 6n+2): 3×3 stem, three stages (strides 1, 2, 2).

  Shortcuts are projections whenever stride != 1 or the width changes. Input [B, H, W, C] (any C;
  28×28×1 works), output float32 logits [B, num_classes]; with ``return_features``,
  ``(logits, Features)``: the stem is conv1-BN-ReLU (preact: its BN output), the three stages are
  ``layer1..3`` (preact: the last block's sum before its ReLU), as mdistiller's ``feats`` and
  ``preact_feats`` (whose stem entry is post-ReLU in both lists).
  """
  num_classes: int
  depth: int = 20
  widths: Sequence[int] = (16, 16, 32, 64)  # [stem, stage1, stage2, stage3]
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f"CifarResNet depth must be 6n+2, got {self.depth}")
    n = (self.depth - 2) // 6
    kw = dict(ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    x = conv(x.astype(self.dtype), self.widths[0] * self.ratio, 3, name="conv1", **kw)
    preact_stem = batch_norm(x, train=train, scale=self.ratio, dtype=self.dtype, name="bn1")
    stem = nn.relu(preact_stem)
    x, stages, preact_stages = _residual_stages(stem, train, BasicBlock, self.widths[1:],
                                                (n,) * len(self.widths[1:]), **kw)
    return classifier_outputs(self, global_avg_pool(x), stem=stem, preact_stem=preact_stem, stages=stages,
                    preact_stages=preact_stages)


class WideBasicBlock(nn.Module):
  """Pre-activation WRN block: BN-ReLU-conv(stride)-BN-ReLU-conv; 1×1 conv shortcut (no BN) on the
  shared first BN-ReLU output when the width changes, identity otherwise.

  Returns [B, H', W', r·features]; with ``return_preact`` the pair (output, ``bn1(x)``): the block's
  *input* after its first BN, before the ReLU (the pre-activation of the previous stage's output).
  """
  features: int
  strides: int = 1
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    width = self.features * self.ratio
    conv_ = functools.partial(conv, ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    bn = functools.partial(batch_norm, train=train, scale=self.ratio, dtype=self.dtype)
    input_preact = bn(x, name="bn1")
    o = nn.relu(input_preact)
    y = nn.relu(bn(conv_(o, width, 3, strides=self.strides, name="conv1"), name="bn2"))
    y = conv_(y, width, 3, name="conv2")
    equal = x.shape[-1] == width and self.strides == 1
    shortcut = x if equal else conv_(o, width, 1, strides=self.strides, name="shortcut_conv")
    out = shortcut + y
    return (out, input_preact) if self.return_preact else out


class WideResNet(nn.Module):
  """mdistiller WRN-d-k (pre-activation, dropout 0): 3×3 stem without BN, three groups, BN-ReLU, fc.

  With ``return_features``, ``(logits, Features)`` as mdistiller's ``feats`` / ``preact_feats``: the
  stem is the conv1 output (no BN, no ReLU: preact_stem is the same tensor), the stages are the raw
  group outputs (no ReLU in a pre-activation block), and each stage's preact is the BN output that
  precedes the next ReLU: ``bn1`` of the next group's first block, ``bn`` for the last group. (These
  are the BNs the network itself runs; mdistiller re-applies them to the stage output, the same
  function, but in train mode it updates their running statistics a second time.)
  """
  num_classes: int
  depth: int = 16
  widen_factor: int = 2
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    kw = dict(ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    k = self.widen_factor
    x = stem = conv(x.astype(self.dtype), 16 * self.ratio, 3, name="conv1", **kw)
    stages, preact_stages = [], []
    for i, width in enumerate((16 * k, 32 * k, 64 * k)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x, input_preact = WideBasicBlock(width, strides, name=f"block{i + 1}_{j}",
                                         return_preact=True, **kw)(x, train)
        if i > 0 and j == 0:  # this block's first BN is the previous stage's pre-activation
          preact_stages.append(input_preact)
      stages.append(x)
    final_preact = batch_norm(x, train=train, scale=self.ratio, dtype=self.dtype, name="bn")
    preact_stages.append(final_preact)
    return classifier_outputs(self, global_avg_pool(nn.relu(final_preact)), stem=stem, preact_stem=stem,
                    stages=tuple(stages), preact_stages=tuple(preact_stages))
