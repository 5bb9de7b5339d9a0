"""Per-example image preprocessing in numpy/PIL (no TensorFlow, no JAX).

Per-example functions take and return uint8 ``[H, W, C]`` images; normalisation to float32
happens once per batch in :func:`normalize_batch`.

Augmentations (``config.dataset.augment``):

- ``'imagenet'``: train = random-resized-crop (area scale 0.08-1, aspect ratio 3/4-4/3,
  torchvision's algorithm with 10 tries then a center-crop fallback) to ``image_size`` + random
  horizontal flip; eval = resize the shorter side to ``round(image_size / 0.875)`` + center
  crop ``image_size``.
- ``'cifar'``: train = zero-pad ``crop_padding`` pixels on each side, random ``image_size`` crop,
  random horizontal flip; eval = the image as is. Used for CIFAR and Fashion-MNIST.
- ``'none'``: no augmentation.

For 'cifar' and 'none' an image whose size differs from ``image_size`` is first resized
(bilinear) to ``image_size`` x ``image_size``.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gpd_jax.data import rand_augment as rand_augment_lib

AUGMENTATIONS = ("imagenet", "cifar", "none")
EVAL_CROP_FRACTION = 0.875


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], mode="L")
  return Image.fromarray(image)


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(pil, dtype=np.uint8)
  return out[..., None] if channels == 1 else out


def resize(image: np.ndarray, size: Tuple[int, int],
           box: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
  """Bilinear (antialiased) resize of uint8 [H, W, C] (C 1 or 3) to ``size = (h, w)``.

  ``box = (left, top, right, bottom)`` crops first (within the same PIL call).
  """
  h, w = size
  if box is None and image.shape[:2] == (h, w):
    return image
  pil = _to_pil(image).resize((w, h), resample=Image.BILINEAR, box=box)
  return _from_pil(pil, image.shape[-1])


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                            ) -> Tuple[int, int, int, int]:
  """Samples a crop box ``(top, left, h, w)`` as torchvision's ``RandomResizedCrop``."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: center crop with the aspect ratio clipped to `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, image_size: int,
                        rng: np.random.Generator) -> np.ndarray:
  """RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) of uint8 [H, W, C]."""
  top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
  return resize(image, (image_size, image_size), box=(left, top, left + w, top + h))


def resize_center_crop(image: np.ndarray, image_size: int,
                       crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Resizes the shorter side to ``round(image_size / crop_fraction)``, then center-crops
  ``image_size`` x ``image_size``."""
  height, width = image.shape[:2]
  short = int(round(image_size / crop_fraction))
  if height <= width:
    new_h, new_w = short, max(short, int(round(width * short / height)))
  else:
    new_h, new_w = max(short, int(round(height * short / width))), short
  image = resize(image, (new_h, new_w))
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def pad_random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pads ``padding`` pixels on each side, then takes a random crop of the original size."""
  if padding <= 0:
    return image
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + h, left:left + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Flips uint8 [H, W, C] horizontally with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def _image_label(record: dict) -> Tuple[np.ndarray, np.int32]:
  image = np.asarray(record["image"], dtype=np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  return image, np.int32(record["label"])


def train_example(record: dict, rng: np.random.Generator, *, augment: str, image_size: int,
                  crop_padding: int = 4, rand_augment=None, fill: Sequence[int] = (0, 0, 0),
                  erase_prob: float = 0.0, mean: Sequence[float] = (), std: Sequence[float] = (),
                  ) -> dict:
  """Augments one training record -> ``{'image': uint8 [S, S, C], 'label': int32 []}``.

  The ViT recipe's additions, after the crop and flip: ``rand_augment`` (a
  :class:`rand_augment.RandAugmentPolicy`, geometric ops filling with ``fill``) and, with
  ``erase_prob`` > 0, normalization with ``mean``/``std`` followed by random erasing, in which case
  the image is float32 [S, S, C] and already normalized.
  """
  image, label = _image_label(record)
  if augment == "imagenet":
    image = random_flip(random_resized_crop(image, image_size, rng), rng)
  elif augment == "cifar":
    image = resize(image, (image_size, image_size))
    image = random_flip(pad_random_crop(image, crop_padding, rng), rng)
  elif augment == "none":
    image = resize(image, (image_size, image_size))
  else:
    raise ValueError(f"Unknown augment {augment!r}; expected one of {AUGMENTATIONS}.")
  if rand_augment is not None:
    image = rand_augment_lib.rand_augment(image, rand_augment, rng, fill=fill)
  if erase_prob > 0:
    image = normalize_batch({"image": image}, mean=mean, std=std)["image"]
    image = rand_augment_lib.random_erase(image, erase_prob, rng)
  return {"image": np.ascontiguousarray(image), "label": label}


def eval_example(record: dict, *, augment: str, image_size: int) -> dict:
  """Deterministic eval preprocessing -> ``{'image': uint8 [S, S, C], 'label': int32 []}``."""
  image, label = _image_label(record)
  if augment == "imagenet":
    image = resize_center_crop(image, image_size)
  elif augment in ("cifar", "none"):
    image = resize(image, (image_size, image_size))
  else:
    raise ValueError(f"Unknown augment {augment!r}; expected one of {AUGMENTATIONS}.")
  return {"image": np.ascontiguousarray(image), "label": label}


def normalize_batch(batch: dict, *, mean: Sequence[float], std: Sequence[float]) -> dict:
  """uint8 [B, H, W, C] 'image' -> float32 ``(x / 255 - mean) / std``; other keys unchanged."""
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  image = batch["image"].astype(np.float32) * np.float32(1 / 255)
  out = dict(batch)
  out["image"] = (image - mean) / std
  return out
