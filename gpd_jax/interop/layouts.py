"""PyTorch <-> gpd_jax name and layout maps, one table per model family (pure functions on arrays).

A PyTorch name is ``<torch module>.<torch leaf>``, ours is ``<collection>/<module path>/<leaf>``.
The two halves are mapped separately:

* modules: each family's :class:`Layout` is a list of ``(regex on our module path, torch module
  name)`` rules; the first rule whose regex matches the whole path gives the torch name (a
  ``re`` template, or a function of the match where an index has to shift);
* leaves (the same for every family): conv kernels HWIO <-> OIHW, dense kernels [in, out] <->
  [out, in], BN / LayerNorm ``scale``/``bias`` <-> ``weight``/``bias``, BN ``mean``/``var`` (our
  ``batch_stats``) <-> ``running_mean``/``running_var``, and the transformers' ``cls_token``,
  ``dist_token`` and ``pos_embed`` as they are (their module maps to the model's top level). BN's
  ``num_batches_tracked`` counter has no counterpart: it is ignored when reading and written as 0
  when exporting.

Transformers: timm packs the attention's q, k and v projections into one ``qkv`` Linear whose
output is ``(3, heads, head_dim)``-major, exactly our ``qkv`` Dense of a plain (ratio 1) model, so
no split or reordering is needed (a DT's copy-major qkv is never converted: its plain student is).

The map is built from the variables of our module (their paths and shapes), so every expected
PyTorch tensor, with its expected PyTorch shape, is known before a file is touched; a file that does
not fit is reported with its missing / unexpected keys and both shapes of mismatched tensors.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Callable, Mapping, Union

import numpy as np
from flax import traverse_util

NUM_BATCHES_TRACKED = "num_batches_tracked"
MAX_LISTED = 5  # offending keys listed per kind in an error message
HEAD_PREFIX = "fc."  # the CNN families' classifier; the transformers' is 'head.' (Layout.head)


class StateDictMismatchError(ValueError):
  """A state_dict does not fit the expected architecture; the message lists what differs."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """A PyTorch model definition: what it is, and how our module paths map onto its module names."""
  description: str
  modules: tuple[tuple[str, Union[str, Callable[[re.Match], str]]], ...]
  head: str = "fc"  # the classifier's PyTorch module name
  sample_size: int = 32  # an input side the whole family builds at (for shape-only tracing)

  def torch_module(self, our_module: str) -> str:
    for pattern, template in self.modules:
      match = re.fullmatch(pattern, our_module)
      if match:
        return template(match) if callable(template) else match.expand(template)
    raise StateDictMismatchError(
        f"module {our_module!r} has no counterpart in {self.description}")


# Our ResNets use torchvision's names with '_' between stage and block and flat shortcut names.
_RESNET_MODULES = (
    (r"conv1|bn1|fc", r"\g<0>"),
    (r"layer(\d+)_(\d+)/(conv\d|bn\d)", r"layer\1.\2.\3"),
    (r"layer(\d+)_(\d+)/downsample_conv", r"layer\1.\2.downsample.0"),
    (r"layer(\d+)_(\d+)/downsample_bn", r"layer\1.\2.downsample.1"),
)

LAYOUTS = {
    "torchvision_resnet": Layout("torchvision's ResNet (torchvision.models.resnet18/34/50)",
                                 _RESNET_MODULES),
    # RepDistiller / mdistiller models/resnet.py: the same names as torchvision.
    "cifar_resnet": Layout("RepDistiller/mdistiller's CIFAR ResNet (models/resnet.py)", _RESNET_MODULES),
    # RepDistiller / mdistiller models/wrn.py: blocks in NetworkBlock.layer, final BN named bn1.
    "wrn": Layout("RepDistiller/mdistiller's WideResNet (models/wrn.py)", (
        (r"conv1|fc", r"\g<0>"),
        (r"bn", "bn1"),
        (r"block(\d+)_(\d+)/(bn1|bn2|conv1|conv2)", r"block\1.layer.\2.\3"),
        (r"block(\d+)_(\d+)/shortcut_conv", r"block\1.layer.\2.convShortcut"),
    )),
    # GPD reference CNN/models/mobilenet.py: one nn.Sequential 'model'; entry 0 is conv-BN-ReLU,
    # entries 1..13 are (dw conv, BN, ReLU, pw conv, BN, ReLU); our block i is entry i + 1.
    "gpd_mobilenet_v1": Layout("the GPD reference MobileNetV1 (CNN/models/mobilenet.py)", (
        (r"conv1", "model.0.0"),
        (r"bn1", "model.0.1"),
        (r"block(\d+)_dw", lambda m: f"model.{int(m[1]) + 1}.0"),
        (r"block(\d+)_dw_bn", lambda m: f"model.{int(m[1]) + 1}.1"),
        (r"block(\d+)_pw", lambda m: f"model.{int(m[1]) + 1}.3"),
        (r"block(\d+)_pw_bn", lambda m: f"model.{int(m[1]) + 1}.4"),
        (r"fc", "fc"),
    )),
    # timm's VisionTransformer / DeiT (timm/models/vision_transformer.py, deit.py): tokens and
    # positions at the top level, blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.
    "timm_vit": Layout("timm's VisionTransformer / DeiT (deit_tiny_patch16_224, deit_small_patch16_224, "
                       "their *_distilled_* variants)", (
        (r"tokens", ""),
        (r"patch_embed", "patch_embed.proj"),
        (r"blocks_(\d+)/(norm1|norm2)", r"blocks.\1.\2"),
        (r"blocks_(\d+)/(attn|mlp)/(qkv|proj|fc1|fc2)", r"blocks.\1.\2.\3"),
        (r"norm|head|head_dist", r"\g<0>"),
    ), head="head", sample_size=224),
    # GPD's / RVT's robust_models.py PoolingTransformer (rvt_tiny, rvt_small): the conv stem is
    # patch_embed.proj.{0 conv, 1 BN, 3 conv}, stage s block i is transformers.<s>.blocks.<i>, the
    # conv-FFN keeps its names, the pooling conv between stages is pools.<s>.conv.
    "rvt": Layout("RVT's PoolingTransformer (GPD's RVT/robust_models.py rvt_tiny / rvt_small)", (
        (r"stem_conv", "patch_embed.proj.0"),
        (r"stem_bn", "patch_embed.proj.1"),
        (r"patch_proj", "patch_embed.proj.3"),
        (r"stage(\d+)_block(\d+)/(norm1|norm2)", r"transformers.\1.blocks.\2.\3"),
        (r"stage(\d+)_block(\d+)/(attn|mlp)/(qkv|proj|fc1|fc2|bn1|bn2|bn3|dwconv)",
         r"transformers.\1.blocks.\2.\3.\4"),
        (r"pool(\d+)", r"pools.\1.conv"),
        (r"norm|head", r"\g<0>"),
    ), head="head"),
}

MODEL_LAYOUTS = {
    **{name: "torchvision_resnet" for name in ("resnet18", "resnet34", "resnet50")},
    "mobilenet_v1": "gpd_mobilenet_v1",
    **{name: "cifar_resnet" for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                                         "resnet56", "resnet110", "resnet8x4", "resnet32x4")},
    **{name: "wrn" for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "deit_tiny": "timm_vit", "deit_small": "timm_vit",
    "rvt_tiny": "rvt", "rvt_small": "rvt",
}

# (collection, our leaf name, ndim) -> (torch leaf name, axes taking our array to PyTorch's layout).
LEAVES = {
    ("params", "kernel", 4): ("weight", (3, 2, 0, 1)),  # conv HWIO -> OIHW (depthwise: [3,3,1,C] -> [C,1,3,3])
    ("params", "kernel", 2): ("weight", (1, 0)),  # dense [in, out] -> [out, in]
    ("params", "bias", 1): ("bias", None),
    ("params", "scale", 1): ("weight", None),  # BN gamma
    ("batch_stats", "mean", 1): ("running_mean", None),
    ("batch_stats", "var", 1): ("running_var", None),
    ("params", "cls_token", 3): ("cls_token", None),  # [1, 1, C]
    ("params", "dist_token", 3): ("dist_token", None),
    ("params", "pos_embed", 3): ("pos_embed", None),  # [1, tokens, C]
}


def layout_of(model_name: str) -> Layout:
  if model_name not in MODEL_LAYOUTS:
    raise StateDictMismatchError(f"model {model_name!r} has no PyTorch layout; supported: "
                                 f"{', '.join(sorted(MODEL_LAYOUTS))}")
  return LAYOUTS[MODEL_LAYOUTS[model_name]]


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """Where one PyTorch tensor lives in our variables, and how its layout differs."""
  path: tuple[str, ...]  # flattened path of our variables, collection first
  axes: tuple[int, ...] | None  # ours -> PyTorch transpose (None: same layout)
  torch_shape: tuple[int, ...]


def _torch_shape(shape, axes):
  return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def torch_rules(model_name: str, variables: Mapping) -> "collections.OrderedDict[str, TensorRule]":
  """``{torch name: TensorRule}`` for every leaf of ``variables`` (arrays or ShapeDtypeStructs).

  Raises:
    StateDictMismatchError: a leaf has no PyTorch counterpart (e.g. OREPA factors).
  """
  layout = layout_of(model_name)
  rules = {}
  for path, leaf in traverse_util.flatten_dict(dict(variables)).items():
    collection, *module, name = path
    key = (collection, name, len(leaf.shape))
    if key not in LEAVES:
      raise StateDictMismatchError(
          f"variable {'/'.join(path)} (shape {list(leaf.shape)}) has no counterpart in "
          f"{layout.description}; only plain convs, dense layers and BatchNorm convert (a DT with "
          "OREPA branches converts with interop.dt_to_torch / launch/convert.py --dt, which merges "
          "them; or export its plain student)")
    torch_leaf, axes = LEAVES[key]
    torch_module = layout.torch_module("/".join(module))
    torch_name = f"{torch_module}.{torch_leaf}" if torch_module else torch_leaf
    rules[torch_name] = TensorRule(tuple(path), axes, _torch_shape(leaf.shape, axes))
  return collections.OrderedDict(sorted(rules.items(), key=lambda item: _torch_order(item[0])))


_LEAF_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def _torch_order(torch_name: str):
  """Sort key close to a PyTorch state_dict's order: modules by name with numbers compared as
  numbers (layer1.2 before layer1.10), then weight, bias, running_mean, running_var."""
  module, _, leaf = torch_name.rpartition(".")  # top-level tensors (cls_token) have no module
  parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._]", module))
  return parts, _LEAF_ORDER.get(leaf, len(_LEAF_ORDER))


def to_torch(model_name: str, variables: Mapping) -> "collections.OrderedDict[str, np.ndarray]":
  """Our plain model's ``{'params', 'batch_stats'}`` -> a PyTorch state_dict (NumPy arrays).

  BatchNorm modules also get ``num_batches_tracked = 0`` (int64), so that a strict
  ``load_state_dict`` accepts the result as is. Values are transposed copies: bitwise the same
  numbers.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  state_dict = collections.OrderedDict()
  for torch_name, rule in torch_rules(model_name, variables).items():
    value = np.asarray(flat[rule.path])
    state_dict[torch_name] = np.ascontiguousarray(
        value if rule.axes is None else np.transpose(value, rule.axes))
    if torch_name.endswith(".running_var"):
      state_dict[torch_name[:-len("running_var")] + NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
  return state_dict


def _listed(items) -> str:
  items = list(items)
  shown = ", ".join(items[:MAX_LISTED])
  return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _is_float(dtype) -> bool:
  """float16/32/64, and bfloat16 (an ml_dtypes type that NumPy does not count as floating)."""
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def check_state_dict(model_name: str, state_dict: Mapping[str, np.ndarray], abstract: Mapping, *,
                     source: str, num_classes: int | None = None) -> None:
  """Raises :class:`StateDictMismatchError` unless ``state_dict`` fits ``abstract`` exactly.

  The message names ``source``, the expected architecture, the first missing and unexpected keys
  and the first tensors whose shapes differ (PyTorch layout, file vs expected).
  """
  rules = torch_rules(model_name, abstract)
  present = {k for k in state_dict if not k.endswith("." + NUM_BATCHES_TRACKED)}
  missing = [k for k in rules if k not in present]
  unexpected = [k for k in state_dict if k not in rules and k in present]
  shapes = [f"{k}: file {list(np.shape(state_dict[k]))} vs expected {list(rules[k].torch_shape)}"
            for k in rules if k in present and tuple(np.shape(state_dict[k])) != rules[k].torch_shape]
  non_float = [f"{k} ({np.asarray(state_dict[k]).dtype})" for k in rules if k in present
               and not _is_float(np.asarray(state_dict[k]).dtype)]
  if not (missing or unexpected or shapes or non_float):
    return
  layout = layout_of(model_name)
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
  if shapes:
    parts.append(f"{len(shapes)} tensors with other shapes ({_listed(shapes)})")
  if non_float:
    parts.append(f"{len(non_float)} non-float tensors ({_listed(non_float)})")
  message = (f"{source}: not a {model_name!r} state_dict as {layout.description} defines it: "
             + "; ".join(parts) + ".")
  head_prefix = layout.head + "."
  head = head_prefix + "weight"
  if head in present and num_classes is not None and shapes and not missing and not unexpected and all(
      s.startswith(head_prefix) for s in shapes):
    file_classes = np.shape(state_dict[head])[0]
    message += (f" The file's classifier has {file_classes} classes but {num_classes} are expected "
                "(the dataset's label space); a teacher or student must share it")
  else:
    guess = guess_model(state_dict)
    if guess and guess != model_name:
      message += f" The file looks like a {guess!r} state_dict."
  raise StateDictMismatchError(message)


def from_torch(model_name: str, state_dict: Mapping[str, np.ndarray], abstract: Mapping, *,
               source: str, num_classes: int | None = None) -> dict:
  """A PyTorch state_dict -> our nested ``{'params', 'batch_stats'}`` (NumPy, ``abstract``'s dtypes).

  Args:
    abstract: our module's variables (``jax.eval_shape`` of its ``init``); gives the paths, shapes
      and dtypes expected.
    source: what to name in errors (the file, the config field).
    num_classes: the expected number of classes, to explain a head of another size.
  Raises:
    StateDictMismatchError: missing / unexpected keys, other shapes, non-float tensors.
  """
  check_state_dict(model_name, state_dict, abstract, source=source, num_classes=num_classes)
  flat_abstract = traverse_util.flatten_dict(dict(abstract))
  flat = {}
  for torch_name, rule in torch_rules(model_name, abstract).items():
    value = np.asarray(state_dict[torch_name])
    if rule.axes is not None:
      value = np.transpose(value, np.argsort(rule.axes))
    flat[rule.path] = np.ascontiguousarray(value, dtype=flat_abstract[rule.path].dtype)
  return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=None)
def _torch_signature(model_name: str) -> tuple[frozenset, frozenset]:
  """(PyTorch key names, (name, shape) pairs outside the classifier) of ``model_name``."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpd_jax import models  # pylint: disable=import-outside-toplevel
  module = models.create(model_name, 10)
  layout = layout_of(model_name)
  size = layout.sample_size
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)),
                                                train=False))
  rules = torch_rules(model_name, abstract)
  return frozenset(rules), frozenset((k, r.torch_shape) for k, r in rules.items()
                                     if not _is_head(k))


def _is_head(torch_name: str) -> bool:
  """A classifier tensor of any family (its size is the dataset's, not the architecture's)."""
  return torch_name.startswith((HEAD_PREFIX, "head.", "head_dist."))


def guess_model(state_dict: Mapping[str, np.ndarray]) -> str | None:
  """The model whose PyTorch names and shapes (classifier aside) match ``state_dict``, if any."""
  keys = frozenset(k for k in state_dict if not k.endswith("." + NUM_BATCHES_TRACKED))
  body = frozenset((k, tuple(np.shape(v))) for k, v in state_dict.items()
                   if k in keys and not _is_head(k))
  for name in sorted(MODEL_LAYOUTS):
    if _torch_signature(name) == (keys, body):
      return name
  return None
