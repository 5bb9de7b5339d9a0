"""Grain input pipelines: infinite, resumable, host-sharded training and padded evaluation.

Config fields read (``ml_collections.ConfigDict`` or any object with attributes; optional ones
may be absent):

- ``config.seed``: int in [0, 2**32); shuffling and augmentation seed.
- ``config.batch_size``: GLOBAL train batch; per host ``batch_size // process_count``.
- ``config.eval_batch_size``: GLOBAL eval batch (optional, default ``batch_size``).
- ``config.dataset.name``: 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012' or
  'synthetic'.
- ``config.dataset.data_dir``: TFDS data dir (optional; default ``~/tensorflow_datasets``).
- ``config.dataset.source_dir``: fashion_mnist IDX directory (optional).
- ``config.dataset.train_split``: e.g. 'train' or 'train[:55000]' (optional, default 'train').
- ``config.dataset.eval_splits``: dict name -> split, e.g.
  ``{'val': 'train[55000:]', 'test': 'test'}``.
- ``config.dataset.image_size``: output side S (optional, default: the native size).
- ``config.dataset.augment``: 'imagenet' | 'cifar' | 'none' (optional, default 'none').
- ``config.dataset.crop_padding``: padding of 'cifar' (optional, default 4).
- ``config.dataset.rand_augment``: timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'
  (optional, default '' = off; ``gpd_jax/data/rand_augment.py``).
- ``config.dataset.random_erase_prob``: random erasing in normalized space (optional, default 0).
- ``config.dataset.repeated_augmentations``: R > 1 = repeated augmentation (optional, default 1;
  see :class:`RepeatedAugmentation`).
- ``config.dataset.num_train_examples``: cap, use the first N train examples (None = all).
- ``config.dataset.train_fraction``: reduced data, train on a seeded random fraction of those
  (optional, default 1.0 = all; see :func:`train_subset_indices`).
- ``config.dataset.subset_seed``: the seed of that subset (optional, default 0).
- ``config.dataset.num_eval_examples``: cap, use the first N examples of an eval split.
- ``config.dataset.worker_count``: grain worker processes (optional, default 0 = in-process).
- ``config.dataset.num_threads``: in-process prefetch threads (optional, default 2).
- ``config.dataset.prefetch_buffer_size``: batches prefetched (optional, default 2).
- ``config.dataset.mean`` / ``.std``: normalisation override (optional; default per dataset).
- ``config.dataset.image_shape`` (H, W, C) and ``config.dataset.num_classes``: synthetic only.
- ``config.dataset.synthetic_sizes``: synthetic only, optional ``{base split: size}``; default
  1024 for 'train' and 256 for any other split.

Batches are dicts of numpy arrays:

- train: ``{'image': float32 [b, S, S, C] normalized, 'label': int32 [b]}``
- eval:  the same plus ``'mask': float32 [b]`` (1 = real example, 0 = padding)

where ``b = global batch // process_count``. ``worker_count > 0`` needs absl flags parsed first
and an ``if __name__ == '__main__'`` guard in the script (worker processes re-import it).
"""
import functools
import json
import math
import os
import zipfile
from typing import Optional

import grain
import numpy as np

from gpd_jax.data import preprocess
from gpd_jax.data import rand_augment
from gpd_jax.data import sources


def _get(cfg, key: str, default=None):
  """``cfg.key`` if the field exists, else ``default`` (a present ``None`` stays ``None``)."""
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return default


def _per_host(global_batch: int, process_count: int, field: str) -> int:
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}.")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"{field}={global_batch} must be a positive multiple of the number of "
                     f"processes ({process_count}); it is the GLOBAL batch size.")
  return global_batch // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, process_count={process_count}).")


def _seed(config) -> int:
  seed = int(_get(config, "seed", 0))
  if not 0 <= seed < 2**32:
    raise ValueError(f"config.seed must be in [0, 2**32), got {seed}.")
  return seed


def get_dataset_info(config) -> sources.DatasetInfo:
  """:func:`sources.dataset_info` for ``config.dataset`` (handles 'synthetic')."""
  d = config.dataset
  return sources.dataset_info(d.name, image_shape=_get(d, "image_shape"),
                              num_classes=_get(d, "num_classes"))


def resolve_split(config, split: Optional[str] = None) -> str:
  """Split spec for ``split``: None -> train split; a key of ``eval_splits`` -> its value."""
  d = config.dataset
  if split is None:
    return _get(d, "train_split", "train") or "train"
  eval_splits = _get(d, "eval_splits") or {}
  return eval_splits[split] if split in eval_splits else split


def open_source(config, split: Optional[str] = None, *, cap: Optional[int] = None):
  """Random-access source for ``split`` (see :func:`resolve_split`), truncated to ``cap``."""
  d = config.dataset
  spec = resolve_split(config, split)
  if d.name == "synthetic":
    info = get_dataset_info(config)
    src = sources._synthetic_split(  # pylint: disable=protected-access
        spec, image_shape=info.image_shape, num_classes=info.num_classes,
        seed=_seed(config), sizes=_get(d, "synthetic_sizes"))
  else:
    src = sources.load_source(d.name, spec, data_dir=_get(d, "data_dir"),
                              source_dir=_get(d, "source_dir"))
  if cap is not None and cap < len(src):
    src = sources._SliceSource(src, 0, int(cap))  # pylint: disable=protected-access
  return src


class _IndexSource:
  """The records ``indices[0], indices[1], ...`` of a random-access source."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[int(index)])]


def subset_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """The sorted indices of the ``round(fraction · num_examples)`` (at least 1) examples a
  reduced-data run trains on: a uniformly random subset drawn by NumPy's PCG64 seeded with ``seed``,
  the same on every host and every resume."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.dataset.train_fraction={fraction!r} must be in (0, 1]")
  count = max(1, int(round(fraction * num_examples)))
  if count >= num_examples:
    return np.arange(num_examples)
  rng = np.random.Generator(np.random.PCG64(seed))
  return np.sort(rng.choice(num_examples, size=count, replace=False))


def train_subset_indices(config) -> Optional[np.ndarray]:
  """The indices (into the capped train split) of a reduced-data run, or None when it uses all."""
  fraction = float(_get(config.dataset, "train_fraction", 1.0) or 1.0)
  if fraction == 1.0:
    return None
  n = len(open_source(config, None, cap=_get(config.dataset, "num_train_examples")))
  return subset_indices(n, fraction, int(_get(config.dataset, "subset_seed", 0) or 0))


def open_train_source(config):
  """The training examples: the capped train split, reduced to ``train_fraction`` of it."""
  src = open_source(config, None, cap=_get(config.dataset, "num_train_examples"))
  indices = train_subset_indices(config)
  return src if indices is None else _IndexSource(src, indices)


def num_examples(config, split: Optional[str] = None) -> int:
  """Examples the pipeline uses: train split (``split=None``, capped by
  ``num_train_examples`` and reduced to ``train_fraction``) or an eval split (key of
  ``eval_splits`` or a split spec, capped by ``num_eval_examples``)."""
  if split is None:
    return len(open_train_source(config))
  return len(open_source(config, split, cap=_get(config.dataset, "num_eval_examples")))


def steps_per_epoch(config) -> int:
  """Train steps per epoch: ``num_examples(config) // config.batch_size`` (global batch)."""
  return num_examples(config) // int(config.batch_size)


def eval_steps(config, split: str) -> int:
  """Batches in one pass over eval ``split``: ``ceil(num_examples / eval_batch_size)``."""
  return math.ceil(num_examples(config, split) / _eval_batch(config))


def _eval_batch(config) -> int:
  return int(_get(config, "eval_batch_size", None) or config.batch_size)


def _image_size(config, info: sources.DatasetInfo) -> int:
  size = _get(config.dataset, "image_size")
  if size is None:
    if info.image_shape[0] is None or info.image_shape[0] != info.image_shape[1]:
      raise ValueError(f"config.dataset.image_size is required for {info.name!r}.")
    size = info.image_shape[0]
  return int(size)


def _normalizer(config, info: sources.DatasetInfo):
  mean = _get(config.dataset, "mean") or info.mean
  std = _get(config.dataset, "std") or info.std
  return functools.partial(preprocess.normalize_batch, mean=tuple(mean), std=tuple(std))


def _to_iterator(ds: grain.MapDataset, config) -> grain.DatasetIterator:
  d = config.dataset
  threads, buffer = _get(d, "num_threads"), _get(d, "prefetch_buffer_size")
  read_options = grain.ReadOptions(num_threads=2 if threads is None else int(threads),
                                   prefetch_buffer_size=2 if buffer is None else int(buffer))
  it_ds = ds.to_iter_dataset(read_options)
  workers = int(_get(d, "worker_count", 0) or 0)
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


# ----------------------------------------------------------------------------------------------
# Training.


class RepeatedAugmentation(grain.MapDataset):
  """DeiT's repeated augmentation: each batch holds ``ceil(batch / repeats)`` images ``repeats`` times.

  With ``m = ceil(batch / R)``, position ``t`` of batch ``j`` (in an epoch of ``len(parent) //
  batch`` batches) reads element ``j·m + t mod m`` of the parent, so the batch is copy-major: rows
  ``[0, m)`` are the images, then the same images again (the last copy is cut short when R does not
  divide the batch, as DeiT's sampler also lets a few images have fewer copies). The global batch is
  split into contiguous per-device slices, so the copies of an image land on different devices
  whenever a device holds at most m rows (at least R devices); the per-example augmentation, keyed
  by the position, differs for each copy. An epoch has as many batches as without repetition and
  visits about the first 1/R of the (reshuffled) parent. Indices past one epoch carry the epoch into
  the parent, so its shuffle changes per epoch.
  """

  def __init__(self, parent: grain.MapDataset, *, batch: int, repeats: int):
    super().__init__(parent)
    if not 1 <= repeats <= batch:
      raise ValueError(f"config.dataset.repeated_augmentations={repeats} must be in [1, per-host "
                       f"batch {batch}]")
    self._parent_length = len(parent)
    self._batch, self._distinct = batch, -(-batch // repeats)
    self._length = (len(parent) // batch) * batch

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"RepeatedAugmentation(batch={self._batch}, distinct={self._distinct})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(int(index), self._length)
    batch_index, row = divmod(position, self._batch)
    parent_index = batch_index * self._distinct + row % self._distinct
    return self._parent[epoch * self._parent_length + parent_index]


def train_dataset(config, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite training ``grain.MapDataset`` of this host (element = one per-host batch).

  Each epoch: the (capped) train split is shuffled globally with seed ``config.seed + epoch``,
  truncated to a multiple of ``process_count`` and dealt round-robin, so hosts read disjoint,
  equally sized shards; each host then augments (seeded by ``config.seed``, the host and the
  element's position) and batches with ``drop_remainder``. Every host thus yields
  ``steps_per_epoch(config)`` batches per epoch, and batches never straddle two epochs.
  """
  _check_process(process_index, process_count)
  d = config.dataset
  info = get_dataset_info(config)
  per_host = _per_host(int(config.batch_size), process_count, "config.batch_size")
  seed = _seed(config)
  src = open_train_source(config)
  n = len(src)
  if n // process_count < per_host:
    raise ValueError(f"Train split {resolve_split(config)!r} of {d.name!r} has {n} examples: "
                     f"too few for a global batch of {config.batch_size} "
                     f"({process_count} processes).")
  ds = grain.MapDataset.source(src)
  if needs_example_index(config):
    ds = ds.map_with_index(lambda index, record: (index, record))
  ds = ds.seed(seed).shuffle()
  ds = ds[:n - n % process_count][process_index::process_count]
  repeats = int(_get(d, "repeated_augmentations", 1) or 1)
  if repeats > 1:
    ds = RepeatedAugmentation(ds, batch=per_host, repeats=repeats)
  policy = _get(d, "rand_augment", "") or ""
  erase_prob = float(_get(d, "random_erase_prob", 0.0) or 0.0)
  mean = tuple(_get(d, "mean") or info.mean)
  std = tuple(_get(d, "std") or info.std)
  augment = functools.partial(
      preprocess.train_example, augment=_get(d, "augment", "none"),
      image_size=_image_size(config, info), crop_padding=int(_get(d, "crop_padding", 4)),
      **({"rand_augment": rand_augment.parse_rand_augment(policy),
          "fill": tuple(int(round(255 * m)) for m in mean)} if policy else {}),
      **({"erase_prob": erase_prob, "mean": mean, "std": std} if erase_prob > 0 else {}))
  if needs_example_index(config):
    augment = functools.partial(_with_index, augment)
  ds = ds.random_map(augment, seed=(seed + 0x9E3779B1 * (process_index + 1)) % 2**32)
  ds = ds.batch(per_host, drop_remainder=True).repeat()  # reshuffles each epoch
  if erase_prob > 0:  # normalized per example, before the erasing
    return ds
  return ds.map(_normalizer(config, info))


def needs_example_index(config) -> bool:
  """Whether training batches carry each example's dataset index (``'index'``): CRD's memory bank."""
  return ((config.get("features") or {}).get("method", "") == "crd")


def _with_index(augment, pair, rng) -> dict:
  index, record = pair
  return {**augment(record, rng), "index": np.int32(index)}


def train_labels(config, *, chunk: int = 8192) -> np.ndarray:
  """[N] int32 labels of the (capped) training split, in dataset-index order (what ``'index'``
  points into).

  Reads the records without decoding their images, ``chunk`` at a time (the source's batched
  read): on Fashion-MNIST's 60k records 4 s instead of 44 s for one decoded record at a time.
  """
  d = config.dataset
  cap = _get(d, "num_train_examples")
  if d.name == "synthetic":
    src = open_source(config, None, cap=cap)
    return np.asarray([int(src[i]["label"]) for i in range(len(src))], np.int32)
  src = sources.load_source(d.name, resolve_split(config, None), data_dir=_get(d, "data_dir"),
                            source_dir=_get(d, "source_dir"), decode_images=False)
  count = len(src) if cap is None else min(len(src), int(cap))
  labels = np.empty(count, np.int32)
  for start in range(0, count, chunk):
    stop = min(count, start + chunk)
    labels[start:stop] = [int(r["label"]) for r in src.__getitems__(list(range(start, stop)))]
  return labels


def cached_train_labels(config, cache_path: str, *, write: bool = True) -> np.ndarray:
  """:func:`train_labels`, kept in ``cache_path`` (.npz) so a resumed run does not read the split
  again (on ImageNet that is every record's bytes).

  The file stores the labels with the dataset name, train split and cap they came from; a file that
  is unreadable or from another source is ignored (and replaced when ``write``). ``write=False``
  (evaluation) never creates or changes a file. Written atomically (temporary file + rename).
  """
  d = config.dataset
  source = np.asarray(json.dumps({"name": d.name, "split": resolve_split(config, None),
                                  "cap": _get(d, "num_train_examples")}, sort_keys=True))
  try:
    with np.load(cache_path) as cached:
      if str(cached["source"]) == str(source):
        return np.asarray(cached["labels"], np.int32)
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # missing or damaged: read the split
    pass
  labels = train_labels(config)
  if write:
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    tmp = f"{cache_path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, labels=labels, source=source)
    os.replace(tmp, cache_path)
  return labels


def create_train_iterator(config, *, process_index: int = 0,
                          process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator over this host's training batches.

  Yields ``{'image': float32 [b, S, S, C], 'label': int32 [b]}`` with
  ``b = config.batch_size // process_count``. Deterministic for ``config.seed``. The iterator
  is resumable: ``state = it.get_state()`` (a small dict) can be checkpointed, and
  ``it.set_state(state)`` on a fresh iterator from the same config continues with the same
  next batch.

  Raises:
    ValueError: ``config.batch_size`` not divisible by ``process_count``, or too few examples.
    DatasetNotReadyError: the dataset is not prepared (the message says how).
  """
  return _to_iterator(train_dataset(config, process_index=process_index,
                                    process_count=process_count), config)


# ----------------------------------------------------------------------------------------------
# Evaluation.


class PaddedEvalSource:
  """This host's share of an eval split, padded so every host gets the same number of batches.

  Position ``k`` of host ``p`` is the global index ``j = p + k * process_count``; indices
  ``j >= num_examples`` are padding (a copy of example ``j % num_examples`` with
  ``mask = 0``). Records: ``{'image': ..., 'label': ..., 'mask': float32 []}``.
  """

  def __init__(self, source, *, global_batch: int, process_index: int, process_count: int):
    self.source = source
    self.num_examples = len(source)
    self.process_index, self.process_count = process_index, process_count
    num_batches = math.ceil(self.num_examples / global_batch)
    self._len = num_batches * global_batch // process_count

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, k: int) -> dict:
    if not 0 <= k < self._len:
      raise IndexError(f"index {k} out of range [0, {self._len}).")
    j = self.process_index + int(k) * self.process_count
    record = dict(self.source[j % self.num_examples])
    record["mask"] = np.float32(j < self.num_examples)
    return record


def _eval_example(record: dict, *, augment: str, image_size: int) -> dict:
  out = preprocess.eval_example(record, augment=augment, image_size=image_size)
  out["mask"] = np.float32(record["mask"])
  return out


def eval_dataset(config, split: str, *, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """The finite eval ``grain.MapDataset`` of this host (element = one per-host batch).

  Examples are dealt round-robin to hosts and the split is padded up to a multiple of the
  global ``config.eval_batch_size``, so all hosts run ``eval_steps(config, split)`` batches
  and every example appears with ``mask == 1`` exactly once across hosts and batches.
  """
  _check_process(process_index, process_count)
  d = config.dataset
  info = get_dataset_info(config)
  global_batch = _eval_batch(config)
  per_host = _per_host(global_batch, process_count, "config.eval_batch_size")
  src = open_source(config, split, cap=_get(d, "num_eval_examples"))
  if len(src) == 0:
    raise ValueError(f"Eval split {resolve_split(config, split)!r} of {d.name!r} is empty.")
  padded = PaddedEvalSource(src, global_batch=global_batch, process_index=process_index,
                            process_count=process_count)
  fn = functools.partial(_eval_example, augment=_get(d, "augment", "none"),
                         image_size=_image_size(config, info))
  ds = grain.MapDataset.source(padded).map(fn).batch(per_host, drop_remainder=True)
  return ds.map(_normalizer(config, info))


def create_eval_iterator(config, split: str, *, process_index: int = 0,
                         process_count: int = 1) -> grain.DatasetIterator:
  """One pass over eval ``split`` (a key of ``config.dataset.eval_splits`` or a split spec).

  Yields ``{'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': float32 [b]}`` with
  ``b = config.eval_batch_size // process_count``; the last batches are padded (mask 0), so
  sum metrics weighted by ``mask`` and divide by ``mask.sum()`` (summed over hosts).
  """
  return _to_iterator(eval_dataset(config, split, process_index=process_index,
                                   process_count=process_count), config)
