"""Model zoo. ``create(name, num_classes, **kw)`` returns the plain student module.

Every model is a Linen module with static fields ``ratio`` (1 = student; r = its dynamic teacher) and
``branches`` (OREPA blocks on 3×3 stride-1 convs), applied flax-examples style:
``model.apply(variables, images, train=bool)`` with images [B, H, W, C] (any C).
"""
from __future__ import annotations

import functools

import flax.linen as nn

from gpd_jax.models.mobilenet import MobileNetV1
from gpd_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet, WideBasicBlock, WideResNet
from gpd_jax.models.vit import REGISTRY as _VIT_REGISTRY
from gpd_jax.models.vit import RobustViT, VisionTransformer

_REGISTRY = {
    # ImageNet family (torchvision layout).
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "mobilenet_v1": MobileNetV1,
    # CIFAR family (mdistiller / RepDistiller definitions).
    "resnet8": functools.partial(CifarResNet, depth=8),
    "resnet14": functools.partial(CifarResNet, depth=14),
    "resnet20": functools.partial(CifarResNet, depth=20),
    "resnet32": functools.partial(CifarResNet, depth=32),
    "resnet44": functools.partial(CifarResNet, depth=44),
    "resnet56": functools.partial(CifarResNet, depth=56),
    "resnet110": functools.partial(CifarResNet, depth=110),
    "resnet8x4": functools.partial(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    "resnet32x4": functools.partial(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    "wrn_16_1": functools.partial(WideResNet, depth=16, widen_factor=1),
    "wrn_16_2": functools.partial(WideResNet, depth=16, widen_factor=2),
    "wrn_40_1": functools.partial(WideResNet, depth=40, widen_factor=1),
    "wrn_40_2": functools.partial(WideResNet, depth=40, widen_factor=2),
    # Vision transformers: deit_tiny, deit_small, rvt_tiny, rvt_small, vit_fashion.
    **_VIT_REGISTRY,
}

MODEL_NAMES = tuple(sorted(_REGISTRY))


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the plain student module ``name`` with ``num_classes`` outputs.

  Extra keyword arguments override module fields (e.g. ``widths=(8, 8, 16, 32)`` for a tiny test
  variant, ``dtype=jnp.bfloat16`` for mixed-precision compute).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model name {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


__all__ = ["create", "MODEL_NAMES", "ResNet", "CifarResNet", "WideResNet", "MobileNetV1",
           "BasicBlock", "Bottleneck", "WideBasicBlock", "VisionTransformer", "RobustViT"]
