"""Expansion specs: the per-leaf rules that IR, the student view and CBR export follow.

A spec maps every variable leaf of a model, keyed ``"collection/module/.../name"`` (e.g.
``"params/layer1_0/conv1/kernel"``), to a :class:`LeafRule`:

* ``tiled_axes``: the axes that are r× wider in the DT, in the order IR tiles them (output axis first);
* ``rescale``: IR divides the leaf by r and the student view multiplies its slice by r (kernels and
  biases of groups-1 convs/dense layers whose output is widened; ``docs/method.md`` §3.2, §5.1);
* ``noise``: IR adds fresh N(0, σ²) noise after each tiling (everything but BN running statistics).

It also lists the OREPA blocks (``branch_blocks``: module path -> depthwise?) so export can merge them.

``derive_spec`` builds the spec from a model instead of from name lists: it compares the variable shapes
of the model at ratio 1 and ratio r (which axes grew) and asks each owning layer how its leaves scale
(groups-1 ``nn.Conv``/``nn.Dense``: rescaled along a widened output axis; norms and depthwise convs:
replicated; any other layer: its ``gpd_rescale(name, collection)`` method). A model of your own works
if it follows the same protocol (see ``docs/custom_models.md``), or you can write the spec by hand.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax.models.layers import OrepaConv

STATS_COLLECTIONS = ("batch_stats",)


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """How one variable leaf is expanded (IR) and read back (student view)."""
  role: str  # human-readable: 'middle', 'stem', 'head', 'fixed', 'depthwise', 'norm', 'stats', 'branch:<f>'
  tiled_axes: tuple[int, ...]  # non-negative axes, output axis first
  rescale: bool
  noise: bool = True


@dataclasses.dataclass(frozen=True)
class ExpansionSpec:
  """Per-leaf rules of a model plus its OREPA blocks."""
  leaves: Mapping[str, LeafRule]
  branch_blocks: Mapping[str, bool] = dataclasses.field(default_factory=dict)  # path -> depthwise


def leaf_key(path) -> str:
  """'collection/module/.../name' from a ``tree_flatten_with_path`` key path."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def flatten(tree) -> dict[str, Any]:
  """Nested variable dict -> {'collection/.../name': leaf}."""
  return {leaf_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten` (plain nested dicts)."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, name = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = value
  return out


def check_ratio(ratio: Any) -> int:
  """IR needs an integer ratio >= 2 (the reference code's integer-r scheme, docs/method.md §3.6)."""
  if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)) or ratio < 2:
    raise ValueError(f"ratio must be an integer >= 2 (the DT is r× wider than the student), got {ratio!r}")
  return int(ratio)


def _abstract_init(model: nn.Module, sample_shape: tuple[int, ...], record: dict | None = None):
  """Variable shapes of ``model`` for inputs of ``sample_shape``; optionally records module instances."""
  def init():
    return model.init(jax.random.key(0), jnp.zeros(sample_shape, jnp.float32), train=False)

  if record is None:
    return jax.eval_shape(init)

  def interceptor(next_fun, args, kwargs, context):
    record.setdefault(context.module.path, context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return jax.eval_shape(init)


def infer_sample_shape(model: nn.Module, variables, *, argument: str = "variables") -> tuple[int, ...]:
  """Finds an input shape [1, S, S, C] consistent with ``variables`` (C = image channels).

  S is the model's ``image_size`` field when it has one (a ViT's position embedding fixes it), else 32.
  CNN variables depend on the input only through the stem's input channels, so C is read off the leaves
  whose shapes change between C=1 and C=2. Models that need another spatial size take an explicit
  ``sample_input`` in the transforms.
  """
  size = int(getattr(model, "image_size", 32))
  given = {k: tuple(np.shape(x)) for k, x in flatten(variables).items()}
  try:
    one = {k: x.shape for k, x in flatten(_abstract_init(model, (1, size, size, 1))).items()}
    two = {k: x.shape for k, x in flatten(_abstract_init(model, (1, size, size, 2))).items()}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"could not trace {type(model).__name__} on [1, {size}, {size}, C] inputs ({e}); "
                     "pass sample_input=<an input batch> explicitly") from e
  channels = 1
  for key in one:
    if one[key] != two[key] and key in given:
      axis = next(a for a, (p, q) in enumerate(zip(one[key], two[key])) if p != q)
      if axis < len(given[key]) and given[key][axis] % one[key][axis] == 0:
        channels = given[key][axis] // one[key][axis]
        break
  return (1, size, size, channels)


def check_variables_match(model: nn.Module, variables, sample_shape, *, argument: str,
                          ignore_collections: tuple[str, ...] = ()) -> None:
  """Raises a ValueError naming ``argument`` if ``variables`` do not fit ``model``."""
  expected = {k: tuple(x.shape) for k, x in flatten(_abstract_init(model, sample_shape)).items()
              if k.split("/", 1)[0] not in ignore_collections}
  given = {k: tuple(np.shape(x)) for k, x in flatten(variables).items()}
  missing = sorted(set(expected) - set(given))
  extra = sorted(set(given) - set(expected))
  wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
  if missing or extra or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
      details.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if wrong:
      k = wrong[0]
      details.append(f"{len(wrong)} with wrong shapes, e.g. {k}: {given[k]} vs expected {expected[k]}")
    raise ValueError(f"{argument} do not match the model {type(model).__name__}"
                     f"(ratio={getattr(model, 'ratio', '?')}, branches={getattr(model, 'branches', '?')}): "
                     + "; ".join(details))


def _layer_rescales(module: nn.Module, key: str) -> tuple[str, bool]:
  """(kind, rescale-if-output-widened) of the leaf ``key`` from the layer that owns it.

  Layers with a ``gpd_rescale`` method answer for themselves; their kind is ``'<gpd_role>:<name>'``
  (``gpd_role`` defaults to 'branch', the OREPA block; e.g. 'residual' for tokens and positions).
  """
  collection, *_, name = key.split("/")
  if collection in STATS_COLLECTIONS:
    return "stats", False
  custom = getattr(module, "gpd_rescale", None)
  if custom is not None:
    return f"{getattr(module, 'gpd_role', 'branch')}:{name}", bool(custom(name, collection))
  if isinstance(module, nn.Conv) and module.feature_group_count != 1:
    return "depthwise", False
  if isinstance(module, (nn.Conv, nn.Dense)):
    return "linear", True
  if isinstance(module, (nn.BatchNorm, nn.LayerNorm)):
    return "norm", False
  hint = ""
  if isinstance(module, (nn.DenseGeneral, nn.MultiHeadDotProductAttention)):
    hint = (" Multi-head attention needs the GPD head rule (r·h heads of the student's head width, "
            "copy-major qkv, q and k multiplied by r): build it with gpd_jax.models.vit.Attention.")
  raise ValueError(
      f"cannot derive the GPD rule for leaf '{key}' owned by the {type(module).__name__} layer "
      f"'{'/'.join(module.path) or '<root>'}': give that layer a method "
      "gpd_rescale(self, name, collection) -> bool, or pass an explicit spec=ExpansionSpec(...) "
      f"(see docs/custom_models.md).{hint}")


@functools.lru_cache(maxsize=64)
def derive_spec(model: nn.Module, ratio: int, sample_shape: tuple[int, ...]) -> ExpansionSpec:
  """Derives the expansion spec of ``model`` (the student, ratio 1) for a DT of ``ratio``.

  Args:
    model: the student-width module (any ``branches`` setting); must have an int field ``ratio``.
    ratio: the DT's ratio (>= 2).
    sample_shape: an input shape the model accepts, e.g. (1, 32, 32, 3).
  """
  ratio = check_ratio(ratio)
  if not hasattr(model, "ratio"):
    raise ValueError(f"{type(model).__name__} has no 'ratio' field; GPD models must build their DT "
                     "as model.clone(ratio=r) (see docs/custom_models.md)")
  student = model.clone(ratio=1)
  modules: dict = {}
  s_shapes = {k: x.shape for k, x in flatten(_abstract_init(student, sample_shape, modules)).items()}
  d_shapes = {k: x.shape for k, x in flatten(_abstract_init(model.clone(ratio=ratio), sample_shape)).items()}
  if set(s_shapes) != set(d_shapes):
    raise ValueError(f"{type(model).__name__}: the DT (ratio={ratio}) has other variables than the student")
  leaves = {}
  branch_blocks = {}
  for key, s_shape in s_shapes.items():
    d_shape = d_shapes[key]
    collection, *owner_path, name = key.split("/")
    tiled = []
    for axis, (a, b) in enumerate(zip(s_shape, d_shape)):
      if b == ratio * a and a > 0:
        tiled.append(axis)
      elif b != a:
        raise ValueError(f"{key}: DT shape {d_shape} is not the student shape {s_shape} widened ×{ratio}")
    tiled = tuple(sorted(tiled, reverse=True))  # output axis (last) first, as IR replicates
    module = modules[tuple(owner_path)]
    if isinstance(module, OrepaConv):
      branch_blocks["/".join(owner_path)] = module.depthwise
    kind, rescales = _layer_rescales(module, key)
    last = len(s_shape) - 1
    rescale = rescales and last in tiled
    if kind == "linear":
      kind = {(last, last - 1): "middle", (last,): "stem" if len(s_shape) > 1 else "bias",
              (last - 1,): "head", (): "fixed"}.get(tiled, "linear")
    leaves[key] = LeafRule(role=kind, tiled_axes=tiled, rescale=rescale,
                           noise=collection not in STATS_COLLECTIONS)
  return ExpansionSpec(leaves=leaves, branch_blocks=branch_blocks)
