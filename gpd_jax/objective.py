"""The training objective: base KD loss, optionally wrapped by GPD (docs/method.md §8).

``make_objective(loss_config, gpd_config)`` reads every weight and hyperparameter from
the config once, validates it, and returns a jittable

    objective(logits, labels, *, step, targets=None) -> (total, terms)

Semantics (docs/method.md §8.1, with ``w_ce = loss.ce_weight``, ``w_kd = loss.kd_weight``,
``w(step)`` the DKD warm-up factor, 1 for other bases):

    L_D = w_ce·CE(z_D, y) + w_kd·w(step)·KD(z_D, z_T, y)
    L_S = w_ce·CE(z_S, y) + w_kd·w(step)·KD(z_S, z_T, y) + gpd.sce_weight·SCE(z_S, sg(z_D))
    total = L_D + L_S                                            (GPD on)
    total = w_ce·CE(z_S, y) + w_kd·w(step)·KD(z_S, z_T, y)       (GPD off)

GPD switches: ``gpd.train_dt_loss = False`` drops L_D (and its terms ``ce_D``/``kd_D``);
``gpd.dt_uses_static_kd = False`` drops KD from L_D only; ``gpd.student_uses_static_kd
= False`` drops KD from L_S only.

KD is the base method ``loss.base`` in {'kd', 'dkd', 'dist'}; with ``'ce'`` there is
no KD term and the static teacher's logits, if given, are ignored.

Soft targets (mixup/cutmix, ``gpd_jax/mixup.py``): with ``targets`` [B, K] given, every CE term
(``ce_S``, ``ce_D``) is the soft-target CE against them (label smoothing is already folded into
them, so ``loss.label_smoothing`` is not applied again); KD, DIST and SCE only read logits; DKD's
target class (the TCKD split and the class removed from NCKD) is ``argmax(targets)``, the dominant
class of the mixed target, as GPD's RVT training code does. Accuracies stay on ``labels`` (the
unmixed labels).
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from gpd_jax import losses

__all__ = ["make_objective", "dkd_warmup_steps", "VALID_BASES"]

VALID_BASES = ("ce", "kd", "dkd", "dist")


def _get(cfg, path, name):
  """Reads ``cfg.name``; a missing field raises a ValueError naming ``path.name``."""
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError) as e:
    raise ValueError(f"Missing config field `{path}.{name}`.") from e


def _float(cfg, path, name, *, min_value=0.0, strict=False):
  value = _get(cfg, path, name)
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`{path}.{name}` must be a number, got {value!r}.") from e
  bad = value <= min_value if strict else value < min_value
  if bad or value != value:
    op = ">" if strict else ">="
    raise ValueError(f"`{path}.{name}` must be {op} {min_value}, got {value!r}.")
  return value


def _bool(cfg, path, name):
  value = _get(cfg, path, name)
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{path}.{name}` must be a bool, got {value!r}.")
  return bool(value)


def dkd_warmup_steps(dkd_config, steps_per_epoch: int | None = None) -> int:
  """The DKD warm-up length in steps, from ``warmup_epochs`` (the recipes' unit) or ``warmup_steps``.

  ``warmup_epochs`` (float >= 0, optional field) is turned into steps with the run's real
  ``steps_per_epoch``, so a shortened run (``:runlocal``, a data cap) gets a warm-up that fits it.
  ``warmup_steps`` (int >= 0) is an exact step count. At most one of the two may be non-zero.
  """
  path = "config.loss.dkd"
  steps = _get(dkd_config, path, "warmup_steps")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"`{path}.warmup_steps` must be an int >= 0, got {steps!r}.")
  epochs = _float(dkd_config, path, "warmup_epochs") if "warmup_epochs" in dkd_config else 0.0
  if epochs == 0.0:
    return int(steps)
  if steps:
    raise ValueError(f"`{path}.warmup_epochs`={epochs} and `{path}.warmup_steps`={steps} are both "
                     "set; keep one (the other 0).")
  if steps_per_epoch is None or int(steps_per_epoch) < 1:
    raise ValueError(f"`{path}.warmup_epochs`={epochs} needs the run's steps per epoch "
                     f"(make_objective(..., steps_per_epoch=N)), got {steps_per_epoch!r}.")
  return max(1, int(round(epochs * int(steps_per_epoch))))


def _build_kd_term(loss_config, steps_per_epoch):
  """Returns ``(kd_fn, warmup_steps)`` with ``kd_fn(z, z_t, y) -> [B]``, or (None, 0)."""
  base = _get(loss_config, "config.loss", "base")
  if base not in VALID_BASES:
    raise ValueError(
        f"Unknown `config.loss.base` {base!r}; valid names: {', '.join(VALID_BASES)}.")
  if base == "ce":
    return None, 0
  path = f"config.loss.{base}"
  sub = _get(loss_config, "config.loss", base)
  temperature = _float(sub, path, "temperature", strict=True)
  if base == "kd":
    return (lambda z, zt, y: losses.kd(z, zt, temperature=temperature)), 0
  if base == "dkd":
    alpha = _float(sub, path, "alpha")
    beta = _float(sub, path, "beta")
    warmup = dkd_warmup_steps(sub, steps_per_epoch)
    fn = lambda z, zt, y: losses.dkd(z, zt, y, alpha=alpha, beta=beta,
                                     temperature=temperature)
    return fn, warmup
  # base == "dist"
  beta = _float(sub, path, "beta")
  gamma = _float(sub, path, "gamma")
  fn = lambda z, zt, y: losses.dist(z, zt, beta=beta, gamma=gamma, temperature=temperature)
  return fn, 0


def make_objective(loss_config, gpd_config=None, *, steps_per_epoch: int | None = None):
  """Builds the training objective from the config.

  Args:
    loss_config: ``config.loss`` (attribute access): ``base``, ``ce_weight``,
      ``kd_weight``, ``label_smoothing``, and the sub-config of the chosen base:
      ``kd.temperature``; ``dkd.alpha/.beta/.temperature/.warmup_epochs/.warmup_steps``;
      ``dist.beta/.gamma/.temperature``. Only the chosen base's sub-config is read.
    gpd_config: ``config.gpd`` or None. When ``enabled``: ``sce_weight``,
      ``sce_smoothing``, ``train_dt_loss``, ``dt_uses_static_kd``,
      ``student_uses_static_kd``.
    steps_per_epoch: train steps per epoch of the run; needed only to turn
      ``dkd.warmup_epochs`` into steps (see ``dkd_warmup_steps``).

  Returns:
    ``objective(logits, labels, *, step) -> (total, terms)`` where

    - ``logits``: dict of ``[B, K]`` arrays, ``'student'`` always, ``'dt'`` iff GPD is
      enabled, ``'teacher'`` (static teacher) required iff ``base != 'ce'``;
    - ``labels``: ``[B]`` integer labels; ``step``: int, may be traced (DKD warm-up
      factor ``min(step / warmup, 1)``, 1 without a warm-up);
    - ``targets``: optional float ``[B, K]`` soft targets (rows sum to 1, e.g. mixup's);
      see the module docstring for what each term then reads;
    - ``total``: scalar, the weighted loss to differentiate;
    - ``terms``: dict of scalars: unweighted batch means ``'ce_S'``, ``'kd_S'``,
      ``'sce_S'``, ``'ce_D'``, ``'kd_D'`` (only those in the objective), the weighted
      ``'total'``, and top-1 accuracies ``'acc_S'`` (and ``'acc_D'`` with GPD), which
      carry no gradient.

  Raises:
    ValueError: unknown ``config.loss.base``, missing/invalid fields (named), or, when
      the objective is called, missing ``'teacher'``/``'dt'`` logits.
  """
  kd_fn, warmup_steps = _build_kd_term(loss_config, steps_per_epoch)
  ce_weight = _float(loss_config, "config.loss", "ce_weight")
  kd_weight = _float(loss_config, "config.loss", "kd_weight")
  label_smoothing = _float(loss_config, "config.loss", "label_smoothing")
  if label_smoothing > 1.0:
    raise ValueError(f"`config.loss.label_smoothing` must be in [0, 1], got {label_smoothing}.")

  gpd_on = gpd_config is not None and _bool(gpd_config, "config.gpd", "enabled")
  if gpd_on:
    sce_weight = _float(gpd_config, "config.gpd", "sce_weight")
    sce_smoothing = _float(gpd_config, "config.gpd", "sce_smoothing")
    if sce_smoothing > 1.0:
      raise ValueError(f"`config.gpd.sce_smoothing` must be in [0, 1], got {sce_smoothing}.")
    train_dt_loss = _bool(gpd_config, "config.gpd", "train_dt_loss")
    dt_uses_kd = _bool(gpd_config, "config.gpd", "dt_uses_static_kd")
    student_uses_kd = _bool(gpd_config, "config.gpd", "student_uses_static_kd")
  else:
    student_uses_kd = True

  def warmup_factor(step):
    if warmup_steps == 0:
      return 1.0
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)

  def objective(logits, labels, *, step, targets=None):
    if "student" not in logits:
      raise ValueError("`logits` must contain 'student'.")
    if gpd_on and "dt" not in logits:
      raise ValueError("GPD is enabled (`config.gpd.enabled`) but `logits` has no 'dt'.")
    if not gpd_on and "dt" in logits:
      raise ValueError("`logits` has 'dt' but GPD is disabled (`config.gpd.enabled`).")
    if kd_fn is not None and "teacher" not in logits:
      raise ValueError(
          f"`config.loss.base` {_get(loss_config, 'config.loss', 'base')!r} needs a "
          "static teacher (`config.teacher`), but `logits` has no 'teacher'. Use "
          "base='ce' to train without one.")
    z_s = logits["student"]
    z_t = logits.get("teacher") if kd_fn is not None else None
    kd_scale = kd_weight * warmup_factor(step)
    terms = {}
    mean = jnp.mean
    if targets is None:
      kd_labels = labels
      ce = lambda z: losses.cross_entropy(z, labels, label_smoothing=label_smoothing)
    else:
      kd_labels = jnp.argmax(targets, axis=-1)
      ce = lambda z: losses.soft_cross_entropy(z, targets)

    terms["ce_S"] = mean(ce(z_s))
    total = ce_weight * terms["ce_S"]
    if kd_fn is not None and student_uses_kd:
      terms["kd_S"] = mean(kd_fn(z_s, z_t, kd_labels))
      total = total + kd_scale * terms["kd_S"]
    terms["acc_S"] = mean(losses.top_k_correct(z_s, labels, 1))

    if gpd_on:
      z_d = logits["dt"]
      terms["sce_S"] = mean(losses.gpd_sce(z_s, z_d, smoothing=sce_smoothing))
      total = total + sce_weight * terms["sce_S"]
      if train_dt_loss:
        terms["ce_D"] = mean(ce(z_d))
        total = total + ce_weight * terms["ce_D"]
        if kd_fn is not None and dt_uses_kd:
          terms["kd_D"] = mean(kd_fn(z_d, z_t, kd_labels))
          total = total + kd_scale * terms["kd_D"]
      terms["acc_D"] = mean(losses.top_k_correct(z_d, labels, 1))

    terms["total"] = total
    return total, terms

  return objective
