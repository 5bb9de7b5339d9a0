"""PyTorch weights in and out: torchvision / RepDistiller / GPD-reference checkpoints <-> our models.

* :func:`read_state_dict` / :func:`write_state_dict`: ``.pth`` (torch, safe ``weights_only``
  loading; torch imported lazily), ``.safetensors`` and ``.npz`` (no torch) <-> ``{name: array}``.
* :func:`from_torch` / :func:`to_torch`: a PyTorch state_dict <-> our ``{'params', 'batch_stats'}``
  (per-family name tables in :mod:`gpd_jax.interop.layouts`).
* :func:`load_torch_variables`, :func:`load_torch_model`, :func:`save_torch`: the file-level
  helpers used by ``train.py`` (``teacher.checkpoint``, ``init.student``) and ``launch/convert.py``.
* :func:`dt_to_torch`: a dynamic teacher (OREPA branches merged, BN scale wrappers folded) as a
  plain ×r-wide PyTorch state_dict.

Example (a torchvision teacher)::

    module, variables, info = load_torch_model("resnet34-333f7ec4.pth", "resnet34")
    logits = module.apply(variables, images_nhwc, train=False)
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import traverse_util

from gpd_jax import models
from gpd_jax.interop.files import (WeightFileError, file_format, is_weight_file, read_state_dict,
                                   strip_wrapper_prefix, write_state_dict)
from gpd_jax.interop.layouts import (LAYOUTS, MODEL_LAYOUTS, Layout, StateDictMismatchError,
                                     check_state_dict, from_torch, guess_model, layout_of, to_torch,
                                     torch_rules)

# Input shape recorded in model.json for a converted model, per layout (the weights do not depend
# on it: every model ends in a global average pool).
DEFAULT_INPUT_SHAPES = {"torchvision_resnet": (1, 224, 224, 3), "gpd_mobilenet_v1": (1, 224, 224, 3),
                        "cifar_resnet": (1, 32, 32, 3), "wrn": (1, 32, 32, 3),
                        "timm_vit": (1, 224, 224, 3), "rvt": (1, 224, 224, 3)}


def abstract_variables(module, sample_shape: Sequence[int]):
  """Shapes and dtypes of ``module``'s variables for inputs of shape ``sample_shape``."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros(tuple(sample_shape)),
                                            train=False))


def num_classes_of(state_dict, model_name: str | None = None) -> int | None:
  """The classifier's output size (rows of ``fc.weight``, or of ``head.weight`` for the
  transformers: the layout of ``model_name`` says which), if the state_dict has one."""
  name = (layout_of(model_name).head if model_name else "fc") + ".weight"
  head = state_dict.get(name)
  return None if head is None or np.ndim(head) != 2 else int(np.shape(head)[0])


def load_torch_variables(path: str, model_name: str, module, sample_shape: Sequence[int], *,
                         key: str | None = None, num_classes: int | None = None,
                         field: str | None = None) -> dict:
  """Reads ``path`` and maps it onto ``module`` (built as ``models.create(model_name, ...)``).

  Args:
    field: the config field or flag that named the file, prefixed to error messages.
  Returns:
    ``{'params', 'batch_stats'}`` as NumPy arrays in ``module``'s layout.
  Raises:
    WeightFileError: unreadable file; StateDictMismatchError: it holds another architecture.
  """
  return from_torch(model_name, _read(path, key, field), abstract_variables(module, sample_shape),
                    source=f"{field}: {path}" if field else path, num_classes=num_classes)


def _read(path: str, key: str | None, field: str | None) -> dict:
  try:
    return read_state_dict(path, key=key)
  except WeightFileError as e:
    raise WeightFileError(f"{field}: {e}" if field else str(e)) from None


def load_torch_model(path: str, model_name: str, *, num_classes: int | None = None,
                     sample_shape: Sequence[int] | None = None, key: str | None = None,
                     field: str | None = None, **module_kwargs):
  """``(module, variables, model_info)`` of a PyTorch file holding a ``model_name``.

  ``num_classes`` defaults to the file's classifier size; ``sample_shape`` to the family's usual
  input (224² ImageNet, 32² CIFAR). ``model_info`` is what ``checkpoint.save_export`` records.
  """
  layout = layout_of(model_name)  # raises for a model without a PyTorch layout
  source = f"{field}: {path}" if field else path
  state_dict = _read(path, key, field)
  if num_classes is None:
    num_classes = num_classes_of(state_dict, model_name)
    if num_classes is None:
      raise StateDictMismatchError(f"{source}: no classifier weight '{layout.head}.weight' in the "
                                   f"file; is it a {model_name!r} state_dict ({layout.description})?")
  if sample_shape is None and "image_size" in module_kwargs:  # a ViT built for another resolution
    sample_shape = (1, module_kwargs["image_size"], module_kwargs["image_size"], 3)
  sample_shape = tuple(sample_shape or DEFAULT_INPUT_SHAPES[MODEL_LAYOUTS[model_name]])
  try:
    module = models.create(model_name, num_classes, **module_kwargs)
  except TypeError as e:
    raise ValueError(f"{source}: cannot build a {model_name!r} with the overrides "
                     f"{sorted(module_kwargs)}: {e}") from None
  variables = from_torch(model_name, state_dict, abstract_variables(module, sample_shape),
                         source=source, num_classes=num_classes)
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in module_kwargs.items()
            if k != "dtype"}
  info = {"name": model_name, "num_classes": num_classes, "kwargs": kwargs,
          "input_shape": list(sample_shape)}
  return module, variables, info


def save_torch(path: str, model_name: str, variables) -> dict:
  """Writes our plain model's variables as a PyTorch-named state_dict (``.pth``/``.safetensors``/
  ``.npz``); returns the state_dict written (NumPy). Nothing is written when the mapping fails."""
  file_format(path)  # an unknown suffix fails before any work
  state_dict = to_torch(model_name, jax.device_get(variables))
  write_state_dict(path, state_dict)
  return state_dict


def dt_to_torch(model_name: str, dt_model, dt_variables, *, sample_shape: Sequence[int]):
  """A dynamic teacher as a plain ×r-wide PyTorch network: ``{name: array}`` for eval mode.

  The OREPA branches are merged into plain kernels, and each BatchNorm's activation-scale wrapper
  ``BN(s·x)/s`` (s = r) is folded into a plain BN: in eval mode it equals a BN of x with the same
  weight and variance, bias/s and running_mean/s. Keys are those of ``model_name``'s PyTorch
  layout; shapes are the DT's (every hidden width ×r), e.g. RepDistiller's
  ``ResNet(depth, [r·w for w in num_filters])`` loads the DT of a CIFAR ResNet. (torchvision has no
  constructor for ×r-wide ResNets.)

  Args:
    dt_model: the DT module (``student.clone(ratio=r, branches=...)``).
    dt_variables: its ``params``, ``batch_stats`` (and ``consts`` with branches).
    sample_shape: [1, H, W, C] of one input (to trace the model).
  """
  from gpd_jax.transforms import derive_spec  # pylint: disable=import-outside-toplevel
  from gpd_jax.transforms.export import merge_branches  # pylint: disable=import-outside-toplevel
  ratio = int(dt_model.ratio)
  params = dt_variables["params"]
  if getattr(dt_model, "branches", False):
    spec = derive_spec(dt_model, ratio, tuple(sample_shape))
    _, merged = merge_branches(dt_model, dt_variables, spec=spec)
    params = merged["params"]
  params = jax.tree.map(np.asarray, jax.device_get(params))
  stats = jax.tree.map(np.asarray, jax.device_get(dt_variables["batch_stats"]))
  flat_params = traverse_util.flatten_dict(params)
  flat_stats = traverse_util.flatten_dict(stats)
  for path in list(flat_stats):
    if path[-1] == "mean":  # one BatchNorm per running mean: fold its scale wrapper
      flat_stats[path] = flat_stats[path] / np.float32(ratio)
      flat_params[path[:-1] + ("bias",)] = flat_params[path[:-1] + ("bias",)] / np.float32(ratio)
  return to_torch(model_name, {"params": traverse_util.unflatten_dict(flat_params),
                               "batch_stats": traverse_util.unflatten_dict(flat_stats)})


__all__ = ["dt_to_torch", "WeightFileError", "StateDictMismatchError", "Layout", "LAYOUTS", "MODEL_LAYOUTS",
           "DEFAULT_INPUT_SHAPES", "read_state_dict", "write_state_dict", "strip_wrapper_prefix",
           "file_format", "is_weight_file", "from_torch", "to_torch", "torch_rules",
           "check_state_dict", "guess_model", "layout_of", "abstract_variables", "num_classes_of",
           "load_torch_variables", "load_torch_model", "save_torch"]
