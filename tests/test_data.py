"""Tests for gpd_jax.data: offline Fashion-MNIST builder, sources, grain pipelines.

A tiny Fashion-MNIST stand-in (random images in IDX format) is written to a temp dir and
converted by the real builder; the real /usr/share/datasets files are exercised end to end
elsewhere. Nothing here needs TensorFlow.
"""
import os
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gpd_jax import data
from gpd_jax.data import fashion_mnist_idx
from gpd_jax.data import preprocess

N_TRAIN, N_TEST = 300, 100
FM_MEAN, FM_STD = 0.2860, 0.3530


@pytest.fixture(scope="module")
def fm_fixture(tmp_path_factory):
  """(source_dir, data_dir, {split: (images [N,28,28] uint8, labels [N] uint8)})."""
  root = tmp_path_factory.mktemp("fm")
  source_dir, data_dir = str(root / "idx"), str(root / "tfds")
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    fashion_mnist_idx.write_idx(source_dir, split, images, labels)
    arrays[split] = (images, labels)
  data.load_source("fashion_mnist", "train", data_dir=data_dir, source_dir=source_dir)
  return source_dir, data_dir, arrays


def make_config(fm_fixture, **dataset_overrides):
  source_dir, data_dir, _ = fm_fixture
  dataset = dict(name="fashion_mnist", data_dir=data_dir, source_dir=source_dir,
                 train_split="train[:250]", eval_splits={"val": "train[250:]", "test": "test"},
                 image_size=28, augment="none", crop_padding=4, num_train_examples=None,
                 num_eval_examples=None, worker_count=0, num_threads=0)
  dataset.update(dataset_overrides)
  return ml_collections.ConfigDict(dict(seed=0, batch_size=32, eval_batch_size=24,
                                        dataset=dataset))


def keys_of(batch):
  """Identity of each example of an un-augmented batch: its de-normalised uint8 bytes."""
  pixels = np.rint((batch["image"] * FM_STD + FM_MEAN) * 255).astype(np.uint8)
  return [p.tobytes() for p in pixels]


def idx_keys(images):
  return {im[..., None].tobytes() for im in images}


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------------------------
# Builder and sources.


def test_fashion_mnist_builder_round_trip(fm_fixture, monkeypatch):
  source_dir, data_dir, arrays = fm_fixture
  assert os.path.isdir(os.path.join(data_dir, "fashion_mnist_idx", "1.0.0"))
  # Once prepared, nothing is regenerated.
  monkeypatch.setattr(fashion_mnist_idx.FashionMnistIdx, "download_and_prepare",
                      lambda *a, **k: pytest.fail("re-prepared"))
  src = data.load_source("fashion_mnist", "test", data_dir=data_dir, source_dir=source_dir)
  assert len(src) == N_TEST
  records = [src[i] for i in range(len(src))]
  assert records[0]["image"].shape == (28, 28, 1) and records[0]["image"].dtype == np.uint8
  got = {(r["image"].tobytes(), int(r["label"])) for r in records}
  images, labels = arrays["test"]
  assert got == {(im[..., None].tobytes(), int(l)) for im, l in zip(images, labels)}
  # TFDS slicing: disjoint train / held-out parts.
  a = data.load_source("fashion_mnist", "train[:250]", data_dir=data_dir)
  b = data.load_source("fashion_mnist", "train[250:]", data_dir=data_dir)
  assert (len(a), len(b)) == (250, 50)
  assert not {a[i]["image"].tobytes() for i in range(250)} & {
      b[i]["image"].tobytes() for i in range(50)}


def test_idx_round_trip(tmp_path):
  images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
  fashion_mnist_idx.write_idx(str(tmp_path), "test", images, [3, 7])
  im_path, lb_path = fashion_mnist_idx.idx_paths(str(tmp_path), "test")
  np.testing.assert_array_equal(fashion_mnist_idx.read_idx_images(im_path), images)
  np.testing.assert_array_equal(fashion_mnist_idx.read_idx_labels(lb_path), [3, 7])
  with pytest.raises(ValueError, match="magic"):
    fashion_mnist_idx.read_idx_images(lb_path)


def test_missing_fashion_mnist_names_the_fix(tmp_path):
  with pytest.raises(data.DatasetNotReadyError) as e:
    data.load_source("fashion_mnist", "train", data_dir=str(tmp_path / "tfds"),
                     source_dir=str(tmp_path / "nowhere"))
  msg = str(e.value)
  assert "apt-get install -y dataset-fashion-mnist" in msg
  assert "config.dataset.source_dir" in msg and "train-images-idx3-ubyte.gz" in msg
  assert isinstance(e.value, ValueError)


def test_missing_imagenet_names_the_fix(tmp_path):
  data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotReadyError) as e:
    data.load_source("imagenet2012", "validation", data_dir=data_dir)
  msg = str(e.value)
  manual = os.path.join(data_dir, "downloads", "manual")
  assert f"{manual}/ILSVRC2012_img_train.tar" in msg
  assert f"{manual}/ILSVRC2012_img_val.tar" in msg
  assert f"tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record" in msg
  assert "tensorflow" in msg.lower()


def test_missing_cifar_names_the_fix(tmp_path):
  with pytest.raises(data.DatasetNotReadyError, match="tfds build cifar100 --data_dir="):
    data.load_source("cifar100", "train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.load_source("mnist", "train", data_dir=str(tmp_path))
  assert "tensorflow" not in sys.modules


def test_dataset_info():
  info = data.dataset_info("cifar100")
  assert info.num_classes == 100 and info.image_shape == (32, 32, 3)
  assert info.mean == (0.5071, 0.4867, 0.4408) and info.std == (0.2675, 0.2565, 0.2761)
  assert data.dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
  assert data.dataset_info("fashion_mnist").image_shape == (28, 28, 1)
  assert data.dataset_info("imagenet2012").num_classes == 1000
  syn = data.dataset_info("synthetic", image_shape=(8, 8, 3), num_classes=5)
  assert syn.num_classes == 5 and syn.image_shape == (8, 8, 3)


def test_synthetic_source():
  src = data.synthetic_source(20, (6, 5, 3), 4, seed=1)
  r = src[3]
  assert len(src) == 20 and r["image"].shape == (6, 5, 3) and r["image"].dtype == np.uint8
  assert 0 <= r["label"] < 4
  again = data.synthetic_source(20, (6, 5, 3), 4, seed=1)[3]
  np.testing.assert_array_equal(r["image"], again["image"])
  with pytest.raises(IndexError):
    src[20]


# --------------------------------------------------------------------------------------------
# Pipelines.


def test_train_batches_shapes_and_normalisation(fm_fixture):
  config = make_config(fm_fixture)
  assert data.num_examples(config) == 250 and data.steps_per_epoch(config) == 250 // 32
  assert data.num_examples(config, "val") == 50 and data.num_examples(config, "test") == 100
  batch = next(data.create_train_iterator(config))
  assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  pixels = batch["image"] * FM_STD + FM_MEAN  # back in [0, 1], on the 1/255 grid
  assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
  np.testing.assert_allclose(pixels * 255, np.rint(pixels * 255), atol=1e-3)
  # Every example comes from the train[:250] part (TFDS order, not the IDX file order).
  src = data.load_source("fashion_mnist", "train[:250]", data_dir=fm_fixture[1])
  assert set(keys_of(batch)) <= {src[i]["image"].tobytes() for i in range(len(src))}


def test_train_augment_cifar_and_caps(fm_fixture):
  config = make_config(fm_fixture, augment="cifar", crop_padding=2, num_train_examples=100)
  assert data.steps_per_epoch(config) == 3
  batch = next(data.create_train_iterator(config))
  assert batch["image"].shape == (32, 28, 28, 1)
  # Zero padding shows up as pixels equal to (0 - mean) / std in some images.
  assert np.isclose(batch["image"], -FM_MEAN / FM_STD, atol=1e-5).any()


def test_train_deterministic_and_epochs(fm_fixture):
  config = make_config(fm_fixture)
  a, b = take(data.create_train_iterator(config), 8), take(data.create_train_iterator(config), 8)
  for x, y in zip(a, b):
    assert_batches_equal(x, y)
  config.seed = 1
  c = next(data.create_train_iterator(config))
  assert not np.array_equal(a[0]["image"], c["image"])
  # 7 steps/epoch: no example repeats within an epoch, and epoch 2 is a new order.
  epoch0 = sum((keys_of(x) for x in a[:7]), [])
  assert len(set(epoch0)) == 7 * 32
  assert keys_of(a[7]) != epoch0[:32]


def test_train_resume_from_state(fm_fixture):
  config = make_config(fm_fixture, augment="cifar", num_threads=2)
  reference = take(data.create_train_iterator(config), 10)
  it = data.create_train_iterator(config)
  take(it, 6)  # crosses the epoch boundary (7 steps/epoch) on the way to 9
  state = it.get_state()
  resumed = data.create_train_iterator(config)
  resumed.set_state(state)
  for want in reference[6:]:
    assert_batches_equal(next(resumed), want)


def test_train_host_shards_are_disjoint(fm_fixture):
  config = make_config(fm_fixture, train_split="train")  # 300 examples, 2 hosts x 16
  assert data.steps_per_epoch(config) == 9
  hosts = [take(data.create_train_iterator(config, process_index=p, process_count=2), 9)
           for p in range(2)]
  keys = [sum((keys_of(b) for b in h), []) for h in hosts]
  assert all(b["image"].shape[0] == 16 for h in hosts for b in h)
  assert len(set(keys[0])) == len(set(keys[1])) == 9 * 16
  assert not set(keys[0]) & set(keys[1])
  with pytest.raises(ValueError, match="config.batch_size"):
    data.create_train_iterator(make_config(fm_fixture), process_count=3)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_padding_covers_each_example_once(fm_fixture, process_count):
  config = make_config(fm_fixture)  # 100 test examples, global eval batch 24 -> 5 batches
  assert data.eval_steps(config, "test") == 5
  real = []
  for p in range(process_count):
    batches = list(data.create_eval_iterator(config, "test", process_index=p,
                                             process_count=process_count))
    assert len(batches) == 5
    for b in batches:
      assert b["image"].shape == (24 // process_count, 28, 28, 1)
      assert b["mask"].dtype == np.float32 and b["label"].dtype == np.int32
      real += [k for k, m in zip(keys_of(b), b["mask"]) if m == 1]
  assert len(real) == N_TEST and set(real) == idx_keys(fm_fixture[2]["test"][0])
  with pytest.raises(ValueError, match="config.eval_batch_size"):
    data.create_eval_iterator(config, "test", process_count=5)


def test_eval_split_by_name_and_cap(fm_fixture):
  config = make_config(fm_fixture, num_eval_examples=30)
  masks = [b["mask"] for b in data.create_eval_iterator(config, "val")]
  assert len(masks) == 2 and np.concatenate(masks).sum() == 30


@pytest.mark.parametrize("cap", [None, 123])
def test_train_labels_match_the_records_in_index_order(fm_fixture, cap):
  """CRD's labels: read in chunks (7 here, so chunks straddle the label pattern) without decoding
  the images, equal to the labels of the records the train pipeline reads (decoded, one at a
  time), in dataset-index order: the positions ``batch['index']`` points at."""
  config = make_config(fm_fixture, num_train_examples=cap)
  labels = data.pipeline.train_labels(config, chunk=7)
  src = data.pipeline.open_source(config, None, cap=cap)
  expected = [int(src[i]["label"]) for i in range(len(src))]
  assert labels.dtype == np.int32 and len(labels) == (cap or 250)
  np.testing.assert_array_equal(labels, expected)


def test_cached_train_labels_are_reused_checked_and_never_written_read_only(fm_fixture, tmp_path,
                                                                           monkeypatch):
  config = make_config(fm_fixture, num_train_examples=123)
  expected = data.pipeline.train_labels(config)
  path = str(tmp_path / "run" / "train_labels.npz")
  np.testing.assert_array_equal(data.pipeline.cached_train_labels(config, path, write=False), expected)
  assert not os.path.exists(path)  # evaluation writes nothing
  np.testing.assert_array_equal(data.pipeline.cached_train_labels(config, path), expected)
  assert os.path.isfile(path)
  real = data.pipeline.train_labels
  monkeypatch.setattr(data.pipeline, "train_labels", lambda c: pytest.fail("read the split again"))
  np.testing.assert_array_equal(data.pipeline.cached_train_labels(config, path), expected)  # cached
  monkeypatch.setattr(data.pipeline, "train_labels", real)
  # Another cap is another source: read again and replace the file.
  other = make_config(fm_fixture, num_train_examples=50)
  np.testing.assert_array_equal(data.pipeline.cached_train_labels(other, path),
                                data.pipeline.train_labels(other))
  with np.load(path) as f:
    assert len(f["labels"]) == 50
  # A damaged file is ignored (and, when writing, replaced).
  with open(path, "wb") as f:
    f.write(b"not an npz")
  np.testing.assert_array_equal(data.pipeline.cached_train_labels(config, path), expected)
  with np.load(path) as f:
    assert len(f["labels"]) == 123


def test_synthetic_pipeline_imagenet_augment():
  config = ml_collections.ConfigDict(dict(
      seed=3, batch_size=8, eval_batch_size=8,
      dataset=dict(name="synthetic", image_shape=(40, 50, 3), num_classes=7, image_size=16,
                   augment="imagenet", train_split="train", eval_splits={"test": "test"},
                   synthetic_sizes={"train": 40, "test": 20}, num_threads=0)))
  batch = next(data.create_train_iterator(config))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].max() < 7
  batches = list(data.create_eval_iterator(config, "test"))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 20
  assert data.steps_per_epoch(config) == 5


def test_random_resized_crop_and_center_crop():
  rng = np.random.default_rng(0)
  for shape in [(40, 50, 3), (50, 20, 3), (9, 300, 1)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    for _ in range(5):
      top, left, h, w = preprocess.random_resized_crop_box(shape[0], shape[1], rng)
      assert 0 <= top and top + h <= shape[0] and 0 <= left and left + w <= shape[1]
    assert preprocess.random_resized_crop(image, 12, rng).shape == (12, 12, shape[2])
    assert preprocess.resize_center_crop(image, 12).shape == (12, 12, shape[2])


def test_cifar10_with_mock_data(tmp_path):
  config = ml_collections.ConfigDict(dict(
      seed=0, batch_size=8, eval_batch_size=8,
      dataset=dict(name="cifar10", data_dir=str(tmp_path), train_split="train",
                   eval_splits={"test": "test"}, image_size=32, augment="cifar",
                   num_threads=0)))
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(data.create_train_iterator(config))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    batches = list(data.create_eval_iterator(config, "test"))
    assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 20
  assert "tensorflow" not in sys.modules
