"""Mixup and CutMix on a global batch, inside the jitted train step (timm's ``Mixup``, mode 'batch').

One draw per step, from a key that is a function of the step (so a resumed run mixes exactly as an
uninterrupted one):

* with probability ``prob`` the batch is mixed, otherwise it is left as is (λ = 1);
* when both ``mixup_alpha`` and ``cutmix_alpha`` are > 0, CutMix is chosen with probability
  ``switch_prob``, else Mixup; with only one of them > 0, that one;
* Mixup: λ ~ Beta(mixup_alpha, mixup_alpha), ``x ← λ·x + (1 − λ)·flip(x)`` (flip = the batch in
  reverse order, every example paired with its mirror);
* CutMix: λ ~ Beta(cutmix_alpha, cutmix_alpha), a box of ``int(H·√(1−λ)) × int(W·√(1−λ))``
  centred at a uniform pixel and clipped to the image gets the mirror example's pixels, and λ is corrected
  to the share of the image outside the clipped box;
* targets: ``λ·smooth(onehot(y)) + (1 − λ)·smooth(onehot(flip(y)))`` with ``smooth(t) = (1 − ε)·t +
  ε/K`` (label smoothing folded into the soft targets, as timm does).

Every network (the static teacher included) sees the mixed images.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Folded into the step's drop-path key to give mixing its own stream (peers fold in 1, 2, ...).
MIX_STREAM = 0x6D6978


@dataclasses.dataclass(frozen=True)
class MixupSpec:
  """Static settings of the batch mixing (see the module docstring)."""
  mixup_alpha: float
  cutmix_alpha: float
  prob: float
  switch_prob: float
  label_smoothing: float
  num_classes: int


def mixup_spec(config, num_classes: int) -> MixupSpec | None:
  """The run's :class:`MixupSpec` from ``config.dataset.mixup_*`` / ``cutmix_alpha`` and
  ``config.loss.label_smoothing``, or None when both alphas are 0 (mixing off)."""
  d = config.dataset
  mixup_alpha = float(d.get("mixup_alpha", 0.0))
  cutmix_alpha = float(d.get("cutmix_alpha", 0.0))
  if mixup_alpha == 0.0 and cutmix_alpha == 0.0:
    return None
  return MixupSpec(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                   prob=float(d.get("mixup_prob", 1.0)),
                   switch_prob=float(d.get("mixup_switch_prob", 0.5)),
                   label_smoothing=float(config.loss.label_smoothing), num_classes=int(num_classes))


def soft_targets(labels: jax.Array, lam: jax.Array, *, num_classes: int,
                 smoothing: float) -> jax.Array:
  """``λ·smooth(onehot(y)) + (1 − λ)·smooth(onehot(flip(y)))``: float32 [B, K] from int [B]."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  smoothed = onehot * (on - off) + off
  return smoothed * lam + smoothed[::-1] * (1.0 - lam)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int):
  """A CutMix box for the pre-correction λ: ``(top, bottom, left, right)`` int32 scalars, half-open.

  Side ``int(H·√(1−λ))`` (and W), centre uniform over the pixels, edges clipped to the image.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, spec: MixupSpec):
  """Mixes one batch.

  Args:
    key: this step's mixing key.
    images: float [B, H, W, C] normalized images.
    labels: int [B] class indices.
    spec: the settings.

  Returns:
    ``(mixed, targets, info)``: mixed images [B, H, W, C] (same dtype), float32 soft targets [B, K]
    whose rows sum to 1, and ``info = {'lam': λ (corrected), 'cutmix': bool}`` scalars.
  """
  key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < spec.switch_prob
  else:
    use_cutmix = jnp.asarray(spec.cutmix_alpha > 0)
  lam_mixup = (jax.random.beta(key_mixup, spec.mixup_alpha, spec.mixup_alpha)
               if spec.mixup_alpha > 0 else jnp.float32(1.0))
  lam_cutmix = (jax.random.beta(key_cutmix, spec.cutmix_alpha, spec.cutmix_alpha)
                if spec.cutmix_alpha > 0 else jnp.float32(1.0))
  apply = jax.random.uniform(key_apply) < spec.prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)

  mirror = images[::-1]
  _, height, width, _ = images.shape
  top, bottom, left, right = cutmix_box(key_box, lam, height, width)
  rows, cols = jnp.arange(height), jnp.arange(width)
  inside = (((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :])
  cut = jnp.where(inside[None, :, :, None], mirror, images)
  lam_cut = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  blended = images * lam.astype(images.dtype) + mirror * (1.0 - lam).astype(images.dtype)

  mixed = jnp.where(use_cutmix, cut, blended)
  lam = jnp.where(use_cutmix, lam_cut, lam)
  targets = soft_targets(labels, lam, num_classes=spec.num_classes, smoothing=spec.label_smoothing)
  return mixed, targets, {"lam": lam, "cutmix": use_cutmix}
