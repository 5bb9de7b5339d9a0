"""Model zoo. ``create(name, num_classes, **kw)`` returns the plain student module.

Every model is a Linen module with static fields ``ratio`` (1 = student; r = its dynamic teacher) and
``branches`` (OREPA blocks on 3×3 stride-1 convs), applied flax-examples style:
``model.apply(variables, images, train=bool)`` with images [B, H, W, C] (any C).

Your own model trains through the same config field ``config.model.name`` in one of two ways:

* ``'my_package.my_module:MyNet'``: a module path and a callable in it, imported when the model is built
  (so a later ``launch/eval.py`` or ``checkpoint.load_export`` finds it too, given the same ``PYTHONPATH``);
* ``models.register('my_net', MyNet)`` in the config file (or before ``train_and_evaluate``), then
  ``config.model.name = 'my_net'``.

The module must follow docs/custom_models.md §1 (a ``ratio`` field and the activation-scale rule).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

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

MODEL_NAMES = tuple(sorted(_REGISTRY))  # the models shipped with gpd_jax

# Models added at run time by ``register``; kept apart so the shipped names cannot be shadowed.
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Makes ``create(name, ...)`` (and so ``config.model.name = name``) build ``constructor``.

  Args:
    name: a new model name; not a shipped one and without ':' (reserved for module paths).
    constructor: called as ``constructor(num_classes=K, dtype=..., **config.model.kwargs)``; returns
      the plain student, a Linen module with a ``ratio`` field (docs/custom_models.md §1). A Linen
      module class with ``num_classes`` and ``dtype`` fields is such a callable.

  Registering the same constructor twice is a no-op (config files may run more than once); another
  constructor under a taken name is an error.
  """
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"models.register: the name must be a non-empty string without ':', got {name!r}")
  if name in _REGISTRY:
    raise ValueError(f"models.register: {name!r} is a shipped model; pick another name")
  if not callable(constructor):
    raise ValueError(f"models.register({name!r}, ...): the constructor must be callable (e.g. a Linen "
                     f"module class), got {constructor!r}")
  if _REGISTERED.get(name, constructor) is not constructor:
    raise ValueError(f"models.register: {name!r} is already registered to {_REGISTERED[name]!r}")
  _REGISTERED[name] = constructor


def available_names() -> tuple[str, ...]:
  """The shipped and the registered model names (module paths ``pkg.mod:Callable`` work as well)."""
  return tuple(sorted({*_REGISTRY, *_REGISTERED}))


def _import_constructor(name: str) -> Callable[..., nn.Module]:
  """``'pkg.module:Callable'`` -> the callable, with errors that say what to fix."""
  module_path, _, attr = name.partition(":")
  if not module_path or not attr:
    raise ValueError(f"model name {name!r}: a module path must read 'package.module:Callable'")
  try:
    module = importlib.import_module(module_path)
  except ImportError as e:
    raise ValueError(f"model name {name!r}: cannot import {module_path!r} ({e}); put its directory on "
                     "PYTHONPATH or install it") from None
  constructor = module
  for part in attr.split("."):
    constructor = getattr(constructor, part, None)
  if not callable(constructor):
    raise ValueError(f"model name {name!r}: {module_path!r} has no callable {attr!r}")
  return constructor


def _constructor(name: str) -> Callable[..., nn.Module]:
  if not isinstance(name, str):
    raise ValueError(f"model name must be a string, got {name!r}")
  if name in _REGISTRY:
    return _REGISTRY[name]
  if name in _REGISTERED:
    return _REGISTERED[name]
  if ":" in name:
    return _import_constructor(name)
  raise ValueError(f"unknown model name {name!r}; choose one of: {', '.join(available_names())}; or "
                   "register your own (models.register, or a 'package.module:Callable' name)")


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the plain student module ``name`` with ``num_classes`` outputs.

  ``name``: a shipped model (``MODEL_NAMES``), a ``register``-ed one, or ``'package.module:Callable'``.
  Extra keyword arguments override module fields (e.g. ``widths=(8, 8, 16, 32)`` for a tiny test
  variant, ``dtype=jnp.bfloat16`` for mixed-precision compute).
  """
  constructor = _constructor(name)
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  if name in _REGISTRY:
    return constructor(num_classes=num_classes, **kwargs)
  try:
    module = constructor(num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise TypeError(f"model {name!r}: {e}. A model constructor takes num_classes, dtype and the fields "
                    "in config.model.kwargs (a Linen module with those fields does)") from None
  if not isinstance(module, nn.Module):
    raise TypeError(f"model {name!r}: the constructor returned {type(module).__name__}, not a Linen "
                    "module")
  return module


__all__ = ["create", "register", "available_names", "MODEL_NAMES", "ResNet", "CifarResNet", "WideResNet",
           "MobileNetV1", "BasicBlock", "Bottleneck", "WideBasicBlock", "VisionTransformer",
           "RobustViT"]
