"""RandAugment and random erasing for the ViT data recipe, with timm's semantics, in NumPy/PIL.

RandAugment (``parse_rand_augment('rand-m9-mstd0.5-inc1')``): per image, ``num_ops`` operations are
drawn uniformly *with* replacement from the 15-op set; each is applied with probability 1/2 at a
magnitude drawn from N(m, mstd²) clipped to [0, 10] (the level scale is 0-10). ``inc1`` selects the
"increasing" variants, whose strength grows with the magnitude (posterize keeps fewer bits, solarize
uses a lower threshold, the enhance factors move away from 1). Geometric ops fill with the dataset's
mean colour and resample bicubically. Level -> argument at magnitude m (M = m/10):

======================  ===============================================================
Rotate                  ±30·M degrees (sign 50/50)
ShearX / ShearY         ±0.3·M
TranslateXRel / YRel    ±0.45·M of the width / height
Posterize(Increasing)   4 − int(4·M) bits (non-increasing: int(4·M))
Solarize(Increasing)    threshold 256 − int(256·M) (non-increasing: int(256·M))
SolarizeAdd             +int(110·M) to pixels below 128, capped at 255
Color/Contrast/
Brightness/Sharpness    factor 1 ± 0.9·M (increasing); 0.1 + 1.8·M (non-increasing)
AutoContrast, Equalize,
Invert                  no argument
======================  ===============================================================

Random erasing (:func:`random_erase`, timm's ``RandomErasing`` in 'pixel' mode, one box): with
probability p, up to 10 tries to draw a box of area share U(0.02, 1/3) and aspect ratio
exp(U(log 0.3, log 1/0.3)) that fits strictly inside the image; the first that fits is filled with
per-pixel N(0, 1) values. It works on the normalized float image (so the noise is in normalized
units).

Everything draws from the ``numpy.random.Generator`` it is given, so the output is a function of
the pipeline's seed and the example's index.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
OP_PROB = 0.5  # each drawn op is applied with this probability (timm's RandAugment)
TRANSLATE_PCT = 0.45
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                  "TranslateYRel")
DEFAULT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
               "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
               "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  """``num_ops`` ops per image at magnitude ``magnitude`` ± ``magnitude_std`` from ``ops``."""
  magnitude: float
  magnitude_std: float
  num_ops: int
  ops: tuple[str, ...]


def parse_rand_augment(spec: str, field: str = "config.dataset.rand_augment") -> RandAugmentPolicy:
  """A timm RandAugment string (``'rand-m9-mstd0.5-inc1'``, ``'rand-m7-n3'``) -> the policy.

  Sections after ``rand``: ``m<float>`` magnitude (0-10, required), ``n<int>`` ops per image
  (default 2), ``mstd<float>`` magnitude noise (default 0), ``inc<0|1>`` the increasing op set
  (default 0). Anything else is an error naming ``field``.
  """
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"{field}={spec!r}: a RandAugment string starts with 'rand-' (e.g. "
                     "'rand-m9-mstd0.5-inc1'); use '' to turn RandAugment off")
  magnitude, std, num_ops, increasing = None, 0.0, 2, False
  for part in parts[1:]:
    try:
      if part.startswith("mstd"):
        std = float(part[4:])
      elif part.startswith("m"):
        magnitude = float(part[1:])
      elif part.startswith("n"):
        num_ops = int(part[1:])
      elif part.startswith("inc"):
        increasing = bool(int(part[3:]))
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f"{field}={spec!r}: cannot read section {part!r}; the sections are m<float> "
                       "(magnitude), n<int> (ops per image), mstd<float> (magnitude noise), "
                       "inc<0|1> (increasing ops)") from None
  if magnitude is None or not 0 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"{field}={spec!r}: needs a magnitude section m<0-10>, e.g. 'rand-m9'")
  if num_ops < 1 or std < 0:
    raise ValueError(f"{field}={spec!r}: n must be >= 1 and mstd >= 0")
  return RandAugmentPolicy(magnitude, std, num_ops, INCREASING_OPS if increasing else DEFAULT_OPS)


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() > 0.5 else value


def op_argument(name: str, level: float, rng: np.random.Generator):
  """The argument of op ``name`` at ``level`` in [0, 10] (None for ops without one)."""
  m = level / MAX_LEVEL
  if name == "Rotate":
    return _signed(30.0 * m, rng)
  if name in ("ShearX", "ShearY"):
    return _signed(0.3 * m, rng)
  if name in ("TranslateXRel", "TranslateYRel"):
    return _signed(TRANSLATE_PCT * m, rng)
  if name == "PosterizeIncreasing":
    return 4 - int(4 * m)
  if name == "Posterize":
    return int(4 * m)
  if name == "SolarizeIncreasing":
    return 256 - int(256 * m)
  if name == "Solarize":
    return int(256 * m)
  if name == "SolarizeAdd":
    return int(110 * m)
  if name.endswith("Increasing"):  # the enhance ops
    return 1.0 + _signed(0.9 * m, rng)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return 0.1 + 1.8 * m
  return None


def _affine(pil: Image.Image, matrix: Sequence[float], fill) -> Image.Image:
  return pil.transform(pil.size, Image.AFFINE, tuple(matrix), resample=Image.BICUBIC, fillcolor=fill)


def _solarize_add(pil: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return pil.point(lut * len(pil.getbands()))


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def apply_op(pil: Image.Image, name: str, arg, fill) -> Image.Image:
  """Applies op ``name`` with its argument ``arg`` (see :func:`op_argument`) to a PIL image."""
  if name == "AutoContrast":
    return ImageOps.autocontrast(pil)
  if name == "Equalize":
    return ImageOps.equalize(pil)
  if name == "Invert":
    return ImageOps.invert(pil)
  if name == "Rotate":
    return pil.rotate(arg, resample=Image.BICUBIC, fillcolor=fill)
  if name.startswith("Posterize"):
    return pil if arg >= 8 else ImageOps.posterize(pil, arg)
  if name.startswith("Solarize") and name != "SolarizeAdd":
    return ImageOps.solarize(pil, arg)
  if name == "SolarizeAdd":
    return _solarize_add(pil, arg)
  if name == "ShearX":
    return _affine(pil, (1, arg, 0, 0, 1, 0), fill)
  if name == "ShearY":
    return _affine(pil, (1, 0, 0, arg, 1, 0), fill)
  if name == "TranslateXRel":
    return _affine(pil, (1, 0, arg * pil.size[0], 0, 1, 0), fill)
  if name == "TranslateYRel":
    return _affine(pil, (1, 0, 0, 0, 1, arg * pil.size[1]), fill)
  enhancer = _ENHANCERS.get(name.replace("Increasing", ""))
  if enhancer is None:
    raise ValueError(f"unknown RandAugment op {name!r}; the ops are {sorted(INCREASING_OPS + DEFAULT_OPS)}")
  return enhancer(pil).enhance(arg)


def sample_level(policy: RandAugmentPolicy, rng: np.random.Generator) -> float:
  """The magnitude of one op: N(m, mstd²) clipped to [0, 10] (m itself when mstd = 0)."""
  level = policy.magnitude
  if policy.magnitude_std > 0:
    level = rng.normal(level, policy.magnitude_std)
  return float(min(MAX_LEVEL, max(0.0, level)))


def rand_augment(image: np.ndarray, policy: RandAugmentPolicy, rng: np.random.Generator, *,
                 fill: Sequence[int], apply: Callable = apply_op) -> np.ndarray:
  """RandAugment of one uint8 [H, W, C] image (C 1 or 3) -> uint8 [H, W, C].

  ``fill``: the per-channel uint8 colour of pixels that geometric ops move in.
  """
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0], mode="L") if channels == 1 else Image.fromarray(image)
  fill = int(fill[0]) if channels == 1 else tuple(int(f) for f in fill)
  for index in rng.choice(len(policy.ops), policy.num_ops, replace=True):
    if rng.random() > OP_PROB:
      continue
    name = policy.ops[index]
    pil = apply(pil, name, op_argument(name, sample_level(policy, rng), rng), fill)
  out = np.asarray(pil, dtype=np.uint8)
  return out[..., None] if channels == 1 else out


def random_erase_box(height: int, width: int, rng: np.random.Generator, *,
                     min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
  """``(top, left, h, w)`` of an erasing box, or None when 10 tries found none that fits."""
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if w < width and h < height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return None


def random_erase(image: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
  """timm's RandomErasing ('pixel' mode, one box) of a normalized float32 [H, W, C] image."""
  if rng.random() > probability:
    return image
  box = random_erase_box(image.shape[0], image.shape[1], rng)
  if box is None:
    return image
  top, left, h, w = box
  out = np.array(image, dtype=np.float32, copy=True)
  out[top:top + h, left:left + w] = rng.standard_normal((h, w, image.shape[2])).astype(np.float32)
  return out
