"""Offline, TensorFlow-free TFDS builder for Fashion-MNIST read from gzipped IDX files.

The Debian package ``dataset-fashion-mnist`` installs the four original files in
``/usr/share/datasets/fashion-mnist/``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (60,000 examples)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (10,000 examples)

:class:`FashionMnistIdx` (registered in TFDS as ``fashion_mnist_idx``, so it does not clash with
TFDS' own downloading ``fashion_mnist``) converts them to ArrayRecord with the images stored as
PNG bytes encoded by PIL; neither writing nor reading needs TensorFlow. Prepared data lives in
``<data_dir>/fashion_mnist_idx/1.0.0/``.

Records (after ``as_data_source``) are ``{'image': uint8 [28, 28, 1], 'label': int64 scalar}``.

Example::

    builder = FashionMnistIdx(data_dir="/tmp/tfds", source_dir="/usr/share/datasets/fashion-mnist")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train[:55000]")
"""
import gzip
import io
import os
import struct
from typing import Iterator, Optional, Tuple

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# split name -> file prefix of the IDX files.
SPLIT_FILES = {"train": "train", "test": "t10k"}

_IMAGES_MAGIC = 2051  # IDX3, unsigned byte
_LABELS_MAGIC = 2049  # IDX1, unsigned byte


def idx_paths(source_dir: str, split: str) -> Tuple[str, str]:
  """Returns ``(images_path, labels_path)`` of ``split`` ('train' or 'test') in ``source_dir``."""
  prefix = SPLIT_FILES[split]
  return (os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"),
          os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"))


def missing_idx_files(source_dir: str) -> list:
  """Returns the IDX files that ``source_dir`` lacks (empty list when all four are there)."""
  paths = [p for split in SPLIT_FILES for p in idx_paths(source_dir, split)]
  return [p for p in paths if not os.path.isfile(p)]


def read_idx_images(path: str) -> np.ndarray:
  """Reads a gzipped IDX3 image file: uint8 [N, rows, cols] (16-byte big-endian header)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
  if magic != _IMAGES_MAGIC or len(data) < 16:
    raise ValueError(f"{path}: bad IDX3 magic number {magic} (expected {_IMAGES_MAGIC}).")
  _, n, rows, cols = struct.unpack(">IIII", data[:16])
  images = np.frombuffer(data, dtype=np.uint8, offset=16)
  if images.size != n * rows * cols:
    raise ValueError(f"{path}: header says {n}x{rows}x{cols} but holds {images.size} bytes.")
  return images.reshape(n, rows, cols)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads a gzipped IDX1 label file: uint8 [N] (8-byte big-endian header)."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
  if magic != _LABELS_MAGIC or len(data) < 8:
    raise ValueError(f"{path}: bad IDX1 magic number {magic} (expected {_LABELS_MAGIC}).")
  _, n = struct.unpack(">II", data[:8])
  labels = np.frombuffer(data, dtype=np.uint8, offset=8)
  if labels.size != n:
    raise ValueError(f"{path}: header says {n} labels but holds {labels.size}.")
  return labels


def write_idx(source_dir: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes ``images`` (uint8 [N, 28, 28]) and ``labels`` (uint8 [N]) as gzipped IDX files.

  The inverse of :func:`read_idx_images` / :func:`read_idx_labels`; used for small test
  fixtures that stand in for the real files.
  """
  images = np.asarray(images, dtype=np.uint8)
  labels = np.asarray(labels, dtype=np.uint8)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"Expected images [N, H, W] and labels [N]; "
                     f"got {images.shape}, {labels.shape}.")
  os.makedirs(source_dir, exist_ok=True)
  images_path, labels_path = idx_paths(source_dir, split)
  with gzip.open(images_path, "wb") as f:
    f.write(struct.pack(">IIII", _IMAGES_MAGIC, *images.shape) + images.tobytes())
  with gzip.open(labels_path, "wb") as f:
    f.write(struct.pack(">II", _LABELS_MAGIC, labels.shape[0]) + labels.tobytes())


def _png_bytes(image: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W] image as PNG bytes with PIL (no TensorFlow involved)."""
  buf = io.BytesIO()
  Image.fromarray(image, mode="L").save(buf, format="PNG")
  return buf.getvalue()


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando) from local gzipped IDX files; TFDS name ``fashion_mnist_idx``.

  Args (keyword-only, besides the usual ``data_dir`` / ``file_format`` / ...):
    source_dir: directory holding the four ``*-ubyte.gz`` IDX files. Defaults to
      ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST converted from local IDX files, PNG-encoded images."}

  # TFDS derives ``code_path`` through ``importlib_resources`` for builders that live in a
  # package, and that module is not a dependency here (ModuleNotFoundError inside
  # ``download_and_prepare``). The file path is all TFDS needs (to look for a checksums.tsv).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
    super().__init__(**kwargs)
    self.source_dir = os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR)
    self._original_state["source_dir"] = source_dir  # so that pickling keeps it

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=("Fashion-MNIST: 28x28 grayscale images of 10 clothing classes, 60,000 "
                     "train and 10,000 test, converted offline from the original IDX files."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=("@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for "
                  "Benchmarking Machine Learning Algorithms}, author={Han Xiao and Kashif "
                  "Rasul and Roland Vollgraf}, journal={arXiv:1708.07747}, year={2017}}"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    missing = missing_idx_files(self.source_dir)
    if missing:
      raise FileNotFoundError(f"Fashion-MNIST IDX files not found: {missing}")
    return {split: self._generate_examples(split) for split in SPLIT_FILES}

  def _generate_examples(self, split: str) -> Iterator[Tuple[int, dict]]:
    images_path, labels_path = idx_paths(self.source_dir, split)
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
      raise ValueError(f"{images_path}: expected [N, 28, 28] images matching {len(labels)} "
                       f"labels, got {images.shape}.")
    for i in range(len(images)):
      yield i, {"image": _png_bytes(images[i]), "label": int(labels[i])}
