"""Input-pipeline throughput (img/s) on this machine, to set against the train step's img/s.

    python benchmarks/input_pipeline.py --batches=50 --out=benchmarks/results/input_cpu.json

1. Fashion-MNIST: the real training iterator (``gpd_jax.data.create_train_iterator``, pad-crop + flip,
   normalisation, batch 128).
2. ImageNet-style: JPEG decode + random-resized-crop 224 + flip on generated JPEGs (500×375, the
   typical ImageNet size), through the same grain stages and ``preprocess.train_example`` the
   ImageNet pipeline uses, with ``--threads`` in-process threads (and ``--workers`` processes when
   given).
"""
import argparse
import io
import json
import os
import time

import grain
import numpy as np
from PIL import Image

from gpd_jax import config_base, data
from gpd_jax.data import preprocess


class JpegSource:
  """Random-access source of encoded JPEGs, decoded on read as a tfds ImageNet source does."""

  def __init__(self, num_images: int, height: int = 375, width: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    self._jpegs = []
    for _ in range(num_images):
      # Smooth random images compress like photos (pure noise would be unrealistically large).
      small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
      image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=90)
      self._jpegs.append(buffer.getvalue())
    self._labels = rng.integers(0, 1000, num_images)

  def __len__(self):
    return len(self._jpegs)

  def __getitem__(self, index):
    image = np.asarray(Image.open(io.BytesIO(self._jpegs[index])).convert("RGB"))
    return {"image": image, "label": np.int32(self._labels[index])}


def time_iterator(iterator, batches: int, batch_size: int) -> float:
  next(iterator)  # start-up (threads, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--out", default="")
  args = p.parse_args()
  results = {}

  c = config_base.fashion_mnist_recipe(config_base.base_config())
  c.batch_size = args.batch_size
  c.dataset.num_threads = args.threads
  results["fashion_mnist_img_per_s"] = time_iterator(data.create_train_iterator(c), args.batches,
                                                     args.batch_size)
  print(f"fashion_mnist (28x28x1, pad-crop+flip): {results['fashion_mnist_img_per_s']:.0f} img/s")

  source = JpegSource(num_images=512)
  ds = (grain.MapDataset.source(source).seed(0).shuffle()
        .random_map(lambda r, rng: preprocess.train_example(r, rng, augment="imagenet", image_size=224))
        .batch(args.batch_size, drop_remainder=True).repeat())
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=args.threads, prefetch_buffer_size=2))
  if args.workers:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=args.workers))
  results["imagenet_jpeg_rrc224_img_per_s"] = time_iterator(iter(it_ds), args.batches, args.batch_size)
  print(f"imagenet-style (JPEG 500x375 decode + RRC 224 + flip): "
        f"{results['imagenet_jpeg_rrc224_img_per_s']:.0f} img/s with {args.threads} threads, "
        f"{args.workers} workers")
  results["args"] = vars(args)
  results["cpu_count"] = os.cpu_count()
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
