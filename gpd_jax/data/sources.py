"""Random-access data sources: TFDS ArrayRecord datasets (TF-free) and a synthetic source.

Every source is a ``Sequence``-like object (``__len__``, ``__getitem__``) whose records are
dicts ``{'image': uint8 [H, W, C], 'label': integer scalar, ...}``; extra keys (``id``,
``file_name``) may be present and are ignored by the pipelines.

Supported dataset names:

==============  =================================================  =========================
name            backing                                            how it gets prepared
==============  =================================================  =========================
fashion_mnist   ``FashionMnistIdx`` (TFDS ``fashion_mnist_idx``)   automatically, from IDX files
cifar10         TFDS ``cifar10``                                   ``tfds build`` (TF, internet)
cifar100        TFDS ``cifar100``                                  ``tfds build`` (TF, internet)
imagenet2012    TFDS ``imagenet2012``                              manual tars + ``tfds build``
synthetic       :class:`SyntheticSource`                           nothing to prepare
==============  =================================================  =========================

Readiness is checked without importing TensorFlow; an unprepared dataset raises
:class:`DatasetNotReadyError` whose message gives the exact commands to prepare it.
"""
import dataclasses
import os
import re
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from gpd_jax.data import fashion_mnist_idx

TFDS_NAMES = {
    "fashion_mnist": fashion_mnist_idx.FashionMnistIdx.name,  # 'fashion_mnist_idx'
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "imagenet2012": "imagenet2012",
}
SUPPORTED_NAMES = tuple(TFDS_NAMES) + ("synthetic",)


class DatasetNotReadyError(ValueError):
  """A dataset is missing or not prepared as ArrayRecord; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    name: dataset name as used in ``config.dataset.name``.
    num_classes: number of labels; labels are int in ``[0, num_classes)``.
    image_shape: native ``(H, W, C)`` of the stored images; ``H``/``W`` are ``None`` when
      they vary (ImageNet).
    mean, std: per-channel normalisation constants (length ``C``) for pixels in [0, 1].
    splits: number of examples of each full split (``None`` where it is not fixed).
  """
  name: str
  num_classes: int
  image_shape: Tuple[Optional[int], Optional[int], int]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  splits: dict


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_INFOS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,),
                                 {"train": 60_000, "test": 10_000}),
    # docs/kd_methods.md §2.2 (CIFAR-10) and §2.1 (CIFAR-100).
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), {"train": 50_000, "test": 10_000}),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4867, 0.4408),
                            (0.2675, 0.2565, 0.2761), {"train": 50_000, "test": 10_000}),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, (None, None, 3), _IMAGENET_MEAN,
                                _IMAGENET_STD, {"train": 1_281_167, "validation": 50_000}),
}

# Synthetic split sizes when no cap is configured.
SYNTHETIC_DEFAULT_SIZES = {"train": 1024}
SYNTHETIC_DEFAULT_EVAL_SIZE = 256


def dataset_info(name: str, *, image_shape: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None) -> DatasetInfo:
  """Returns the :class:`DatasetInfo` of ``name`` (no I/O).

  For ``name='synthetic'`` pass ``image_shape`` (H, W, C) and ``num_classes``; its
  normalisation is mean 0.5 / std 0.25 per channel.
  """
  if name == "synthetic":
    if image_shape is None or num_classes is None:
      raise ValueError("dataset_info('synthetic') needs image_shape and num_classes "
                       "(config.dataset.image_shape / config.dataset.num_classes).")
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3:
      raise ValueError(f"image_shape must be (H, W, C), got {image_shape!r}.")
    c = shape[-1]
    return DatasetInfo("synthetic", int(num_classes), shape, (0.5,) * c, (0.25,) * c,
                       {"train": None})
  if name not in _INFOS:
    raise ValueError(f"Unknown dataset {name!r}; supported: {SUPPORTED_NAMES}.")
  return _INFOS[name]


def default_data_dir(data_dir: Optional[str] = None) -> str:
  """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (user-expanded)."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")


# ----------------------------------------------------------------------------------------------
# Synthetic source.


class SyntheticSource:
  """Deterministic random images, usable in place of a TFDS data source.

  Record ``i`` is ``{'image': uint8 image_shape, 'label': int}``; it depends only on
  ``(seed, i)``. Each class has its own random template and every image is that template plus
  noise, so a model can fit the data (useful for smoke tests and benchmarks).
  """

  def __init__(self, num_examples: int, image_shape: Sequence[int], num_classes: int,
               seed: int = 0):
    self.num_examples = int(num_examples)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_classes = int(num_classes)
    self.seed = int(seed)
    rng = np.random.default_rng([self.seed, 0xC1A55])
    self._templates = rng.integers(32, 224, (self.num_classes,) + self.image_shape,
                                   dtype=np.int16)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range [0, {self.num_examples}).")
    rng = np.random.default_rng([self.seed, index])
    label = int(rng.integers(self.num_classes))
    noise = rng.integers(-32, 33, self.image_shape, dtype=np.int16)
    image = np.clip(self._templates[label] + noise, 0, 255).astype(np.uint8)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_examples={self.num_examples}, image_shape="
            f"{self.image_shape}, num_classes={self.num_classes}, seed={self.seed})")


def synthetic_source(num_examples: int, image_shape: Sequence[int], num_classes: int,
                     seed: int = 0) -> SyntheticSource:
  """Returns a :class:`SyntheticSource` (records ``{'image': uint8 HWC, 'label': int}``)."""
  return SyntheticSource(num_examples, image_shape, num_classes, seed)


class _SliceSource:
  """A contiguous ``[start, stop)`` view of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    return self.source[self.start + index]


_SPLIT_RE = re.compile(r"^(\w+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


def _synthetic_split(split: str, *, image_shape, num_classes, seed: int,
                     sizes: Optional[dict] = None):
  """Synthetic source for a TFDS-style split spec ('train', 'test', 'train[:900]', ...)."""
  m = _SPLIT_RE.match(split.replace(" ", ""))
  if not m:
    raise ValueError(f"Unsupported synthetic split {split!r}; use 'name' or 'name[a:b]'.")
  base, start, stop = m.groups()
  sizes = dict(SYNTHETIC_DEFAULT_SIZES, **(sizes or {}))
  n = int(sizes.get(base, SYNTHETIC_DEFAULT_EVAL_SIZE))
  # The base split's name picks its seed, so 'train[:a]' and 'train[a:]' are disjoint parts of
  # the same 'train' data, and 'test' is different data.
  src = SyntheticSource(n, image_shape, num_classes, seed=seed + zlib.crc32(base.encode()))

  def bound(s, default):
    if s is None or s == "":
      return default
    v = round(n * int(s[:-1]) / 100) if s.endswith("%") else int(s)
    return max(0, min(n, v + n if v < 0 else v))

  lo, hi = bound(start, 0), bound(stop, n)
  return src if (lo, hi) == (0, n) else _SliceSource(src, lo, max(lo, hi))


# ----------------------------------------------------------------------------------------------
# TFDS sources.


def _fashion_mnist_fix(source_dir: str) -> str:
  return ("To fix: install the Debian package (`sudo apt-get update && sudo apt-get install -y "
          "dataset-fashion-mnist`, which puts the files in "
          f"{fashion_mnist_idx.DEFAULT_SOURCE_DIR}), or set config.dataset.source_dir "
          "(load_source(..., source_dir=...)) to a directory holding "
          "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
          f"and t10k-labels-idx1-ubyte.gz (currently {source_dir!r}). The dataset is then "
          "converted to ArrayRecord automatically on first use (a few seconds).")


def _tfds_fix(name: str, data_dir: str) -> str:
  build = f"tfds build {name} --data_dir={data_dir} --file_format=array_record"
  if name == "imagenet2012":
    manual = os.path.join(data_dir, "downloads", "manual")
    return ("ImageNet needs a manual download. To fix:\n"
            "  1. Get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org/download-images (login required) and put them in\n"
            f"       {manual}/ILSVRC2012_img_train.tar\n"
            f"       {manual}/ILSVRC2012_img_val.tar\n"
            "  2. Install TensorFlow once for the conversion: pip install tensorflow-cpu\n"
            f"  3. Run: {build}\n"
            "     (or copy an already prepared ArrayRecord directory "
            f"imagenet2012/<version>/ into {data_dir}).")
  return ("To fix, on a machine with internet access:\n"
          "  1. Install TensorFlow once for the conversion: pip install tensorflow-cpu\n"
          f"  2. Run: {build}\n"
          f"  (or copy an already prepared ArrayRecord directory {name}/<version>/ into "
          f"{data_dir}; TFDS cannot download it on offline machines).")


def _prepare_fashion_mnist(data_dir: str, source_dir: Optional[str]):
  """Returns the prepared ``FashionMnistIdx`` builder, converting the IDX files if needed."""
  builder = fashion_mnist_idx.FashionMnistIdx(data_dir=data_dir, source_dir=source_dir,
                                              file_format="array_record")
  if builder.is_prepared():
    return builder
  missing = fashion_mnist_idx.missing_idx_files(builder.source_dir)
  if missing:
    raise DatasetNotReadyError(
        f"Dataset 'fashion_mnist' is not prepared in {builder.data_path} and its source IDX "
        f"files are missing: {', '.join(missing)}.\n" + _fashion_mnist_fix(builder.source_dir))
  builder.download_and_prepare(file_format="array_record")
  return builder


def load_source(name: str, split: str, *, data_dir: Optional[str] = None,
                source_dir: Optional[str] = None, decode_images: bool = True):
  """Returns a random-access source over ``split`` of dataset ``name`` (TensorFlow-free).

  Args:
    name: one of 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012' (for 'synthetic' use
      :func:`synthetic_source`).
    split: TFDS split spec, slicing allowed: 'train', 'test', 'train[:55000]',
      'train[55000:]', 'validation', 'train[:10%]', ...
    data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    source_dir: fashion_mnist only: directory of the gzipped IDX files (default
      ``/usr/share/datasets/fashion-mnist``). Fashion-MNIST is converted to ArrayRecord in
      ``data_dir`` the first time it is requested and reused afterwards.
    decode_images: False leaves 'image' as its encoded bytes (for reading labels only: decoding is
      most of the cost of a record).

  Returns:
    A ``Sequence``-like TFDS data source; ``source[i]`` is a dict with 'image' (uint8
    [H, W, C]) and 'label' (integer scalar), plus dataset-specific extra keys.

  Raises:
    DatasetNotReadyError: the dataset is not prepared as ArrayRecord in ``data_dir`` (or, for
      fashion_mnist, the IDX files are missing); the message says how to prepare it.
    ValueError: unknown ``name``.
  """
  if name not in TFDS_NAMES:
    raise ValueError(f"Unknown dataset {name!r}; supported: {tuple(TFDS_NAMES)} "
                     "(and 'synthetic' through synthetic_source / the pipelines).")
  data_dir = default_data_dir(data_dir)
  decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
  if name == "fashion_mnist":
    return _prepare_fashion_mnist(data_dir, source_dir).as_data_source(split, decoders=decoders)

  builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir)
  try:
    return builder.as_data_source(split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    # Only explain the "not prepared" cases; anything else (a bad split spec, ...) is a
    # genuine error and propagates unchanged.
    if not builder.is_prepared():
      raise DatasetNotReadyError(
          f"Dataset {name!r} is not prepared in {builder.data_path}.\n"
          + _tfds_fix(name, data_dir)) from None
    fmt = builder.info.file_format
    if fmt is not None and getattr(fmt, "value", fmt) != "array_record":
      raise DatasetNotReadyError(
          f"Dataset {name!r} is prepared in {builder.data_path} as {fmt}, but random access "
          "without TensorFlow needs ArrayRecord. Remove that directory and re-prepare it.\n"
          + _tfds_fix(name, data_dir)) from None
    raise e
