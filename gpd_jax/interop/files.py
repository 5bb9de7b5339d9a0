"""Reading and writing flat ``{name: array}`` weight files: PyTorch ``.pth``, ``.safetensors``, ``.npz``.

Everything here works on NumPy arrays. torch is imported only when a ``.pth`` file is read or written
(and then only with torch's safe ``weights_only`` unpickler); ``.safetensors`` and ``.npz`` need no
torch.

Checkpoints often wrap the ``state_dict``: ``{'state_dict': ...}`` (torchvision references, timm),
``{'model': ...}`` (RepDistiller, mdistiller, DeiT), ``{'model_ema': ...}``, ``{'net': ...}``; and
models saved from ``nn.DataParallel`` / ``DistributedDataParallel`` prefix every key with
``module.`` (``torch.compile``: ``_orig_mod.``). :func:`read_state_dict` unwraps both.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np

# Keys under which training scripts nest the state_dict, in the order they are tried.
NESTED_KEYS = ("state_dict", "model", "net", "model_ema")
# Prefixes added to every key by wrappers (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")


class WeightFileError(ValueError):
  """A weight file cannot be read or does not hold a usable state_dict; the message names it."""


def file_format(path: str) -> str:
  """'torch' | 'safetensors' | 'npz', from the file name; raises for anything else."""
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return "safetensors"
  if lower.endswith(".npz"):
    return "npz"
  if lower.endswith(TORCH_SUFFIXES):
    return "torch"
  raise WeightFileError(f"{path}: unknown weight file type; expected a name ending in one of "
                        f"{', '.join(SUFFIXES)}")


def is_weight_file(path: str) -> bool:
  """Whether ``path`` names a weight file this module reads (by its suffix; no I/O)."""
  return path.lower().endswith(SUFFIXES)


def import_torch(purpose: str):
  """``import torch``, or a clear error saying what needed it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise WeightFileError(
        f"{purpose} needs PyTorch, which is not installed. Install the CPU build "
        "(`pip install torch --index-url https://download.pytorch.org/whl/cpu`), or use "
        ".safetensors / .npz files, which need no torch") from None
  return torch


def _tensor_to_numpy(torch, value):
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen exactly to float32
    value = value.float()
  return value.numpy()


def _is_flat_state_dict(obj, torch) -> bool:
  return (isinstance(obj, dict) and bool(obj)
          and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _read_torch(path: str, key: str | None) -> dict:
  torch = import_torch(f"reading {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise WeightFileError(
        f"{path}: refusing to load; the file needs arbitrary unpickling (it stores Python objects, "
        "e.g. a whole nn.Module, not only tensors), which could run code. Re-save its weights "
        "with `torch.save(model.state_dict(), 'weights.pth')` or as .safetensors. "
        f"torch said: {first_line}") from None
  except Exception as e:  # pylint: disable=broad-except
    # torch.load fails in many ways on a damaged file (RuntimeError from the zip reader, EOFError
    # or IndexError from the legacy pickle format, ...): all mean the same to the user.
    raise WeightFileError(f"{path}: not a readable PyTorch file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None
  if key is not None:
    if not isinstance(obj, dict) or key not in obj:
      found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise WeightFileError(f"{path}: no entry {key!r} in the file (top-level entries: {found})")
    obj = obj[key]
  elif not _is_flat_state_dict(obj, torch) and isinstance(obj, dict):
    for nested in NESTED_KEYS:
      if _is_flat_state_dict(obj.get(nested), torch):
        obj = obj[nested]
        break
  if not _is_flat_state_dict(obj, torch):
    what = (f"a dict with entries {sorted(map(str, obj))[:10]}" if isinstance(obj, dict)
            else type(obj).__name__)
    raise WeightFileError(
        f"{path}: holds no state_dict (a dict of name -> tensor), directly or under one of "
        f"{NESTED_KEYS}; it holds {what}. Pass the entry's name (key=... / --key)")
  return {k: _tensor_to_numpy(torch, v) for k, v in obj.items()}


def _read_safetensors(path: str) -> dict:
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  import ml_dtypes  # pylint: disable=import-outside-toplevel,unused-import
  # ^ registers bfloat16 with NumPy (a JAX dependency), so bfloat16 tensors load without torch.
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise WeightFileError(f"{path}: not a readable .safetensors file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None


def _read_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {k: archive[k] for k in archive.files}
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise WeightFileError(f"{path}: refusing to load; the .npz holds Python objects that need "
                            "arbitrary unpickling. Save plain numeric arrays only") from None
    raise WeightFileError(f"{path}: not a readable .npz file: {e}") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise WeightFileError(f"{path}: not a readable .npz file (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None


def strip_wrapper_prefix(state_dict: dict) -> dict:
  """Drops a ``module.`` / ``_orig_mod.`` prefix shared by every key (repeatedly)."""
  changed = True
  while changed and state_dict:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        changed = True
  return state_dict


def read_state_dict(path: str, *, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a flat PyTorch-named state_dict from ``path`` as NumPy arrays (file order kept).

  Args:
    path: a ``.pth`` / ``.pth.tar`` / ``.pt`` (torch, loaded with ``weights_only=True``),
      ``.safetensors`` or ``.npz`` file.
    key: torch files only: the entry holding the state_dict (default: the top level if it is one,
      else the first of ``NESTED_KEYS`` that is).
  Returns:
    ``{name: array}``; bfloat16 tensors are widened to float32.
  Raises:
    WeightFileError: the file is missing, truncated, needs arbitrary unpickling or holds no
      state_dict.
  """
  if not os.path.isfile(path):
    raise WeightFileError(f"{path}: no such file")
  fmt = file_format(path)
  if fmt == "torch":
    state_dict = _read_torch(path, key)
  elif key is not None:
    raise WeightFileError(f"{path}: key={key!r} applies to PyTorch files only")
  elif fmt == "safetensors":
    state_dict = _read_safetensors(path)
  else:
    state_dict = _read_npz(path)
  if not state_dict:
    raise WeightFileError(f"{path}: the file holds no tensors")
  return strip_wrapper_prefix(state_dict)


def write_state_dict(path: str, state_dict: dict[str, np.ndarray]) -> None:
  """Writes ``{name: array}`` to ``path`` (format from the suffix), atomically (temp file + rename).

  ``.pth``: a plain ``OrderedDict`` of tensors, loadable with ``torch.load(weights_only=True)``;
  ``.safetensors`` and ``.npz`` need no torch.
  """
  fmt = file_format(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  # Copies: writable and contiguous (arrays fetched from JAX are read-only, which torch warns about).
  arrays = collections.OrderedDict((k, np.array(v, order="C")) for k, v in state_dict.items())
  try:
    if fmt == "torch":
      torch = import_torch(f"writing {path}")
      torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items()), tmp)
    elif fmt == "safetensors":
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
      save_file(dict(arrays), tmp)
    else:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
