"""Tests for gpd_jax.models: exact parameter counts, the registry and input/output shapes.

Counts use ``jax.eval_shape`` on ``init`` (shapes only, no compute) and cover the ``params``
collection: trainable parameters, BN affine included; BN running statistics and OREPA constants are
not parameters. The plain, DT and OREPA numbers are those of ``docs/method.md`` §12, except that our
OREPA blocks have no bias on bias-free convs (a documented deviation, ``layers.OrepaConv``): a branched
count is the §12 count minus the output channels of all OREPA blocks.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import models


@functools.lru_cache(maxsize=None)
def _variable_shapes(name: str, num_classes: int, image_size: int, kwargs: tuple):
  model = models.create(name, num_classes, **dict(kwargs))
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def variable_shapes(name: str, num_classes: int, image_size: int, **kwargs):
  """The variable tree of ShapeDtypeStructs (cached: several tests trace the same model)."""
  return _variable_shapes(name, num_classes, image_size, tuple(sorted(kwargs.items())))


def param_shapes(name: str, num_classes: int, image_size: int, **kwargs):
  return variable_shapes(name, num_classes, image_size, **kwargs)["params"]


def param_count(name: str, num_classes: int, image_size: int, **kwargs) -> int:
  shapes = param_shapes(name, num_classes, image_size, **kwargs)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def orepa_out_channels(name: str, num_classes: int, image_size: int, **kwargs) -> int:
  """Σ of the output channels of a branched model's OREPA blocks (the omitted biases)."""
  shapes = param_shapes(name, num_classes, image_size, **kwargs)
  return sum(s.shape[-1] for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]
             if str(getattr(p[-1], "key", "")) == "v")  # the branch scalings v: [6, O]


IMAGENET = (1000, 224)
CIFAR = (100, 32)


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("mobilenet_v1", 4_231_976),
])
def test_plain_imagenet_counts(name, expected):
  assert param_count(name, *IMAGENET) == expected


@pytest.mark.parametrize("name, expected", [
    ("resnet20", 278_324),
    ("resnet8x4", 1_233_540),
    ("resnet32x4", 7_433_860),
    ("wrn_16_2", 703_284),
    ("wrn_40_2", 2_255_156),
])
def test_plain_cifar_counts(name, expected):
  assert param_count(name, *CIFAR) == expected


@pytest.mark.parametrize("name, data, kwargs, expected", [
    # Dynamic teacher r = 2, no branches (§12).
    ("resnet18", IMAGENET, dict(ratio=2), 45_693_032),
    ("mobilenet_v1", IMAGENET, dict(ratio=2), 14_742_120),
    ("resnet8x4", CIFAR, dict(ratio=2), 4_875_428),
    # Training-time student view with OREPA branches (§12 count minus the omitted biases).
    ("resnet18", IMAGENET, dict(branches=True), 42_327_848),
    ("mobilenet_v1", IMAGENET, dict(branches=True), 4_659_976),
    ("resnet8x4", CIFAR, dict(branches=True), 3_827_109),
    # Dynamic teacher r = 2 with OREPA branches: what the optimizer sees.
    ("resnet18", IMAGENET, dict(ratio=2, branches=True), 167_787_112),
    ("mobilenet_v1", IMAGENET, dict(ratio=2, branches=True), 15_598_120),
    ("resnet8x4", CIFAR, dict(ratio=2, branches=True), 15_168_005),
])
def test_dt_and_orepa_counts(name, data, kwargs, expected):
  assert param_count(name, *data, **kwargs) == expected


@pytest.mark.parametrize("name, data, kwargs, spec_count", [
    ("resnet18", IMAGENET, dict(branches=True), 42_330_792),
    ("mobilenet_v1", IMAGENET, dict(branches=True), 4_663_976),
    ("resnet8x4", CIFAR, dict(branches=True), 3_827_653),
    ("resnet18", IMAGENET, dict(ratio=2, branches=True), 167_793_000),
    ("mobilenet_v1", IMAGENET, dict(ratio=2, branches=True), 15_606_120),
    ("resnet8x4", CIFAR, dict(ratio=2, branches=True), 15_169_093),
])
def test_orepa_counts_differ_from_spec_only_by_the_omitted_bias(name, data, kwargs, spec_count):
  """§12 counts a bias [O] per OREPA block; ours omit it for bias-free convs."""
  omitted = orepa_out_channels(name, *data, **kwargs)
  assert omitted > 0
  assert param_count(name, *data, **kwargs) == spec_count - omitted


def test_orepa_blocks_are_the_3x3_stride1_convs():
  """resnet18: 13 OREPA blocks (§4.1); mobilenet_v1: the 9 stride-1 depthwise convs."""
  for name, expected in (("resnet18", 13), ("mobilenet_v1", 9)):
    shapes = variable_shapes(name, *IMAGENET, branches=True)
    assert len(jax.tree.leaves(shapes["consts"])) == 2 * expected, name


def test_unknown_model_name_raises():
  with pytest.raises(ValueError, match="'resnet_19'"):
    models.create("resnet_19", 10)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_bad_num_classes_raises(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.create("resnet8", num_classes)


def test_registry_lists_every_model():
  assert {"resnet18", "resnet34", "resnet50", "mobilenet_v1", "resnet8x4", "resnet32x4", "wrn_16_2",
          "wrn_40_2"} <= set(models.MODEL_NAMES)
  assert list(models.MODEL_NAMES) == sorted(models.MODEL_NAMES)


@pytest.mark.parametrize("name, kwargs, input_shape", [
    # A CIFAR model takes any number of channels: 28×28×1 (Fashion-MNIST) works.
    ("resnet8", dict(widths=(4, 4, 8, 8)), (3, 28, 28, 1)),
    ("wrn_16_1", dict(depth=10), (3, 28, 28, 1)),
    ("resnet18", dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=4), (2, 32, 32, 5)),
    ("mobilenet_v1", dict(stem_width=4, blocks=((8, 1), (8, 2))), (2, 32, 32, 1)),
])
def test_output_shape_for_any_input_channels(name, kwargs, input_shape):
  """Logits are float32 [B, K]; the stem adapts to the input channels (eval_shape, no compute)."""
  model = models.create(name, 7, **kwargs)
  x = jnp.zeros(input_shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert variables["params"]["conv1"]["kernel"].shape[2] == input_shape[-1]
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (input_shape[0], 7) and out.dtype == jnp.float32
  out, _ = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
  assert out.shape == (input_shape[0], 7)


def test_28x28x1_forward_runs():
  """One real (jitted) forward of a tiny CIFAR ResNet on a 28×28×1 batch."""
  model = models.create("resnet8", 10, widths=(4, 4, 8, 8))
  x = jnp.ones((2, 28, 28, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rs = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rs.uniform(0.5, 1.0, s.shape), s.dtype), shapes)
  logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert logits.shape == (2, 10)
  assert bool(jnp.all(jnp.isfinite(logits)))
