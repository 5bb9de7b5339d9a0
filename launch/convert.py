"""Converts weights between PyTorch files and our exports, in either direction.

    # PyTorch file -> export directory (a static teacher, or a student to fine-tune):
    python launch/convert.py --model=resnet34 resnet34-333f7ec4.pth W/teacher/export
    # export (or a workdir holding export/) -> PyTorch state_dict with the PyTorch key names:
    python launch/convert.py W/export resnet18_gpd.pth          # or .safetensors / .npz
    # the dynamic teacher of a GPD run's latest checkpoint -> a plain ×r-wide PyTorch network:
    python launch/convert.py --config=configs/cifar100_gpd.py --dt W dt.pth  [--ema]

The direction follows the input: a weight file (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``,
``.safetensors``, ``.npz``) is converted to an export, a directory to a weight file (format from the
output's suffix). The PyTorch layouts are torchvision's ResNet-18/34/50, the GPD reference
MobileNetV1 and RepDistiller/mdistiller's CIFAR ResNets and WRNs (``gpd_jax.interop``). A ``.pth``
export loads as is with ``torchvision.models.resnet18().load_state_dict(torch.load(path))``.
Nothing is written when the input does not fit the architecture.

With ``--dt`` the DT's OREPA branches are merged and its BatchNorms folded (``interop.dt_to_torch``):
the state_dict has the PyTorch key names and ×r-wide shapes, for eval-mode use.
"""
import json
import logging
import os
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from gpd_jax import checkpoint, data, interop, train

_MODEL = flags.DEFINE_string("model", None, "PyTorch file -> export: the architecture "
                             "(e.g. resnet34, mobilenet_v1, resnet32x4, wrn_40_2).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "PyTorch file -> export: expected classes "
                                    "(default: the file's classifier size).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "PyTorch file -> export: input size recorded "
                                   "in model.json (default 224 for ImageNet models, 32 for CIFAR).")
_KWARGS = flags.DEFINE_string("kwargs", None, "PyTorch file -> export: module overrides as JSON, "
                              'for a non-standard variant, e.g. \'{"widths": [8, 8, 16, 32]}\'.')
_KEY = flags.DEFINE_string("key", None, "PyTorch file -> export: the checkpoint entry holding the "
                           "state_dict (default: the top level, else state_dict/model/net/model_ema).")

_CONFIG = config_flags.DEFINE_config_file("config", None, "--dt: the run's config (path.py[:arg]).",
                                          lock_config=True)
_DT = flags.DEFINE_bool("dt", False, "INPUT is a GPD run's workdir: convert the dynamic teacher of "
                        "its latest checkpoint (needs --config).")
_EMA = flags.DEFINE_bool("ema", False, "--dt: the EMA weights instead of the raw ones.")


def torch_to_export(path: str, out_dir: str, model_name: str, *, num_classes=None, image_size=None,
                    key=None, module_kwargs=None) -> dict:
  """Converts PyTorch file ``path`` to an export in ``out_dir``; returns its model.json dict.

  ``module_kwargs``: overrides for ``models.create`` (e.g. ``widths``), recorded in model.json.
  """
  sample_shape = None
  if image_size:
    layout = interop.MODEL_LAYOUTS.get(model_name)
    channels = interop.DEFAULT_INPUT_SHAPES[layout][-1] if layout else 3
    sample_shape = (1, image_size, image_size, channels)
  module_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (module_kwargs or {}).items()}
  _, variables, info = interop.load_torch_model(path, model_name, num_classes=num_classes,
                                                sample_shape=sample_shape, key=key, **module_kwargs)
  checkpoint.save_export(out_dir, variables, info)
  return info


def export_to_torch(export_path: str, out_path: str) -> dict:
  """Writes the export (or a workdir's ``export/``) at ``export_path`` as a PyTorch-named
  state_dict to ``out_path`` (``.pth`` / ``.safetensors`` / ``.npz``); returns the state_dict."""
  interop.file_format(out_path)  # a bad suffix fails before the export is read
  _, variables, info = checkpoint.load_export(export_path)
  return interop.save_torch(out_path, info["name"], variables)


def dt_to_torch_file(config, workdir: str, out_path: str, *, ema: bool = False) -> dict:
  """Writes the DT of ``workdir``'s latest checkpoint (``config``'s run) as a plain ×r-wide
  PyTorch state_dict to ``out_path``; returns the state_dict."""
  interop.file_format(out_path)
  if not config.gpd.enabled:
    raise ValueError("--dt: config.gpd.enabled is False, so the run has no dynamic teacher; "
                     "convert its export instead")
  run = train.setup(config, workdir, training=False)
  try:
    if run.state is None:
      raise FileNotFoundError(f"--dt: no checkpoint in {run.ckpt.directory}")
    if ema and run.state.ema is None:
      raise ValueError("--ema: the run keeps no EMA weights (config.ema_decay = 0)")
    variables, _ = run.state.variables("ema" if ema else "raw")
    state_dict = interop.dt_to_torch(config.model.name, run.task.model, jax.device_get(variables),
                                     sample_shape=run.task.sample_shape)
  finally:
    run.ckpt.close()
  interop.write_state_dict(out_path, state_dict)
  return state_dict


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: convert.py [--model=NAME ...] INPUT OUTPUT (see the docstring)")
  logging.getLogger("absl").setLevel(logging.WARNING)
  source, target = argv[1], argv[2]
  try:
    if _DT.value:
      if _CONFIG.value is None:
        raise app.UsageError("--dt needs --config (the run's config file)")
      state_dict = dt_to_torch_file(_CONFIG.value, source, target, ema=_EMA.value)
      print(f"wrote the dynamic teacher ({len(state_dict)} tensors) to {target}")
    elif os.path.isdir(source):
      state_dict = export_to_torch(source, target)
      print(f"wrote {len(state_dict)} tensors to {target}")
    else:
      if not _MODEL.value:
        raise app.UsageError("converting a PyTorch file needs --model (e.g. --model=resnet34)")
      try:
        module_kwargs = json.loads(_KWARGS.value) if _KWARGS.value else {}
      except json.JSONDecodeError as e:
        raise app.UsageError(f"--kwargs is not valid JSON ({e}): {_KWARGS.value}") from None
      info = torch_to_export(source, target, _MODEL.value, num_classes=_NUM_CLASSES.value,
                             image_size=_IMAGE_SIZE.value, key=_KEY.value,
                             module_kwargs=module_kwargs)
      print(f"wrote the export of a {info['name']} ({info['num_classes']} classes) to {target}")
  except (ValueError, FileNotFoundError, data.DatasetNotReadyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
