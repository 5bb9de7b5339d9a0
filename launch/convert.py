"""Converts weights between PyTorch files and our exports, in either direction.

    # PyTorch file -> export directory (a static teacher, or a student to fine-tune):
    python launch/convert.py --model=resnet34 resnet34-333f7ec4.pth W/teacher/export
    # export (or a workdir holding export/) -> PyTorch state_dict with the PyTorch key names:
    python launch/convert.py W/export resnet18_gpd.pth          # or .safetensors / .npz

The direction follows the input: a weight file (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``,
``.safetensors``, ``.npz``) is converted to an export, a directory to a weight file (format from the
output's suffix). The PyTorch layouts are torchvision's ResNet-18/34/50, the GPD reference
MobileNetV1 and RepDistiller/mdistiller's CIFAR ResNets and WRNs (``gpd_jax.interop``). A ``.pth``
export loads as is with ``torchvision.models.resnet18().load_state_dict(torch.load(path))``.
Nothing is written when the input does not fit the architecture.
"""
import os
import sys

from absl import app
from absl import flags

from gpd_jax import checkpoint, interop

_MODEL = flags.DEFINE_string("model", None, "PyTorch file -> export: the architecture "
                             "(e.g. resnet34, mobilenet_v1, resnet32x4, wrn_40_2).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "PyTorch file -> export: expected classes "
                                    "(default: the file's classifier size).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "PyTorch file -> export: input size recorded "
                                   "in model.json (default 224 for ImageNet models, 32 for CIFAR).")
_KEY = flags.DEFINE_string("key", None, "PyTorch file -> export: the checkpoint entry holding the "
                           "state_dict (default: the top level, else state_dict/model/net/model_ema).")


def torch_to_export(path: str, out_dir: str, model_name: str, *, num_classes=None, image_size=None,
                    key=None) -> dict:
  """Converts PyTorch file ``path`` to an export in ``out_dir``; returns its model.json dict."""
  sample_shape = None
  if image_size:
    layout = interop.MODEL_LAYOUTS.get(model_name)
    channels = interop.DEFAULT_INPUT_SHAPES[layout][-1] if layout else 3
    sample_shape = (1, image_size, image_size, channels)
  _, variables, info = interop.load_torch_model(path, model_name, num_classes=num_classes,
                                                sample_shape=sample_shape, key=key)
  checkpoint.save_export(out_dir, variables, info)
  return info


def export_to_torch(export_path: str, out_path: str) -> dict:
  """Writes the export (or a workdir's ``export/``) at ``export_path`` as a PyTorch-named
  state_dict to ``out_path`` (``.pth`` / ``.safetensors`` / ``.npz``); returns the state_dict."""
  interop.file_format(out_path)  # a bad suffix fails before the export is read
  _, variables, info = checkpoint.load_export(export_path)
  return interop.save_torch(out_path, info["name"], variables)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: convert.py [--model=NAME ...] INPUT OUTPUT (see the docstring)")
  source, target = argv[1], argv[2]
  try:
    if os.path.isdir(source):
      state_dict = export_to_torch(source, target)
      print(f"wrote {len(state_dict)} tensors to {target}")
    else:
      if not _MODEL.value:
        raise app.UsageError("converting a PyTorch file needs --model (e.g. --model=resnet34)")
      info = torch_to_export(source, target, _MODEL.value, num_classes=_NUM_CLASSES.value,
                             image_size=_IMAGE_SIZE.value, key=_KEY.value)
      print(f"wrote the export of a {info['name']} ({info['num_classes']} classes) to {target}")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
