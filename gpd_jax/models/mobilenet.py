"""MobileNetV1 (the ImageNet model of GPD's ResNet50 -> MobileNet pair), built as student or DT."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpd_jax.models.layers import batch_norm, classifier_outputs, conv, global_avg_pool

# (output width, stride) of the 13 depthwise-separable blocks.
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                       (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
  """3×3/2 stem conv-BN-ReLU, 13 × (depthwise 3×3 conv-BN-ReLU, pointwise 1×1 conv-BN-ReLU), pool, fc.

  Input [B, H, W, C], output float32 logits [B, num_classes]. In a DT the depthwise convs have r·C
  groups; with branches the 9 stride-1 depthwise convs become depthwise OREPA blocks.

  With ``return_features``, ``(logits, Features)``. Taps are the last block at each resolution (the
  block before a stride-2 block, and the last block): the one at the stem's resolution is ``stem``
  (the stem conv's output if no block runs there), the others are the stages (blocks 2, 4, 10, 12 of
  the standard model: widths 128, 256, 512, 1024, the four taps of the reference ReviewKD code).
  Every preact is the tap's pointwise BN output, before its ReLU.
  """
  num_classes: int
  stem_width: int = 32
  blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
  ratio: int = 1
  branches: bool = False
  dtype: Any = jnp.float32
  return_features: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    conv_ = functools.partial(conv, ratio=self.ratio, branches=self.branches, dtype=self.dtype)
    bn = functools.partial(batch_norm, train=train, scale=self.ratio, dtype=self.dtype)
    preact = bn(conv_(x.astype(self.dtype), self.stem_width * self.ratio, 3, strides=2,
                      name="conv1"), name="bn1")
    x = nn.relu(preact)
    taps = []  # (output, preact) at the end of each resolution
    for i, (width, strides) in enumerate(self.blocks):
      if strides != 1:
        taps.append((x, preact))
      c = x.shape[-1]
      x = nn.relu(bn(conv_(x, c, 3, strides=strides, groups=c, name=f"block{i}_dw"),
                     name=f"block{i}_dw_bn"))
      preact = bn(conv_(x, width * self.ratio, 1, name=f"block{i}_pw"), name=f"block{i}_pw_bn")
      x = nn.relu(preact)
    taps.append((x, preact))
    (stem, preact_stem), stages = taps[0], taps[1:]
    return classifier_outputs(self, global_avg_pool(x), stem=stem, preact_stem=preact_stem,
                              stages=tuple(s for s, _ in stages),
                              preact_stages=tuple(p for _, p in stages))
