"""Logit losses and logit metrics for KD and GPD (pure functions, per example).

Specs: ``docs/kd_methods.md`` §1 and §3-§7, and ``docs/method.md`` §8.1.

Conventions shared by every function here:

- Logits are ``[B, K]`` (batch, classes); integer labels are ``[B]``.
- Every loss returns **per-example** values of shape ``[B]``. The batch loss is their
  mean, which matches PyTorch's ``reduction="batchmean"`` for KL terms (summed over
  classes, averaged over the batch). Batch-level terms (the DIST intra-class term)
  are broadcast to every example so that the mean still equals the loss.
- Logits are promoted to at least float32 before any arithmetic (bfloat16/float16
  become float32; float64 is kept when ``jax_enable_x64`` is on).
- Every teacher input (static teacher logits, dynamic-teacher logits, target
  probabilities) goes through ``jax.lax.stop_gradient``: the gradient with respect to
  it is exactly zero.
- Log-probabilities come from ``jax.nn.log_softmax`` or ``logsumexp``, never from
  ``log(softmax)``; ``0 * log 0`` and ``0 * (-inf)`` are guarded with ``jnp.where``.
- Hyperparameters are validated when they are concrete Python/NumPy values; a
  ``ValueError`` names the offending argument. Traced hyperparameters are not checked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "cross_entropy",
    "soft_cross_entropy",
    "kd",
    "dkd",
    "dist",
    "gpd_sce",
    "top_k_correct",
    "agreement",
]


# ----------------------------------------------------------------------------------
# Validation and small helpers
# ----------------------------------------------------------------------------------

def _concrete(value):
  """Returns ``float(value)``, or None when the value is traced (not checkable)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _check_positive(name, value):
  v = _concrete(value)
  if v is not None and not (np.isfinite(v) and v > 0):
    raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def _check_nonnegative(name, value):
  v = _concrete(value)
  if v is not None and not (np.isfinite(v) and v >= 0):
    raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


def _check_unit_interval(name, value):
  v = _concrete(value)
  if v is not None and not (0.0 <= v <= 1.0):
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def _as_float(x):
  """Promotes an array to at least float32 (bf16/f16 -> f32, f64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(name, logits):
  if logits.ndim != 2:
    raise ValueError(f"`{name}` must have shape [B, K], got shape {logits.shape}.")


def _check_pair(student_logits, teacher_logits, teacher_name="teacher_logits"):
  _check_logits("student_logits", student_logits)
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(
        f"`{teacher_name}` shape {teacher_logits.shape} must equal "
        f"`student_logits` shape {student_logits.shape}.")


def _check_labels(labels, logits):
  if labels.shape != logits.shape[:1]:
    raise ValueError(
        f"`labels` must have shape [B]={logits.shape[:1]}, got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"`labels` must be integer class indices, got dtype {labels.dtype}.")


def _kl_from_log_probs(log_p, log_q, axis=-1):
  """``sum_c p_c (log p_c - log q_c)`` from log-probabilities, with 0·log 0 := 0.

  Entries where ``p == 0`` (including ``log_p == -inf``) contribute exactly 0 and
  pass no NaN gradient (double ``where``).
  """
  p = jnp.exp(log_p)
  live = p > 0
  diff = jnp.where(live, log_p, 0.0) - jnp.where(live, log_q, 0.0)
  return jnp.sum(jnp.where(live, p * diff, 0.0), axis=axis)


# ----------------------------------------------------------------------------------
# Cross-entropies
# ----------------------------------------------------------------------------------

def cross_entropy(logits, labels, *, label_smoothing=0.0):
  """Hard-label cross-entropy with optional label smoothing (docs/kd_methods.md §6).

  With smoothing ``a`` the target is ``(1 - a)·onehot(y) + a/K``.

  Args:
    logits: ``[B, K]`` logits.
    labels: ``[B]`` integer class indices in ``[0, K)``.
    label_smoothing: ``a`` in ``[0, 1]``.

  Returns:
    ``[B]`` per-example cross-entropy.
  """
  _check_unit_interval("label_smoothing", label_smoothing)
  logits = _as_float(logits)
  labels = jnp.asarray(labels)
  _check_logits("logits", logits)
  _check_labels(labels, logits)
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def soft_cross_entropy(logits, target_probs):
  """Soft-target cross-entropy ``-sum_c q_c log softmax(z)_c``.

  Args:
    logits: ``[B, K]`` logits (the differentiated side).
    target_probs: ``[B, K]`` target distribution ``q`` (rows sum to 1). Treated as a
      teacher input: wrapped in ``stop_gradient``.

  Returns:
    ``[B]`` per-example cross-entropy.
  """
  logits = _as_float(logits)
  target_probs = jax.lax.stop_gradient(_as_float(target_probs))
  _check_pair(logits, target_probs, "target_probs")
  return optax.softmax_cross_entropy(logits, target_probs)


def gpd_sce(student_logits, dt_logits, *, smoothing=0.1):
  """GPD's T_d -> S term (docs/method.md §8.1): smoothed soft-target CE at T = 1.

  ``SCE = softCE(z_S, (1 - a)·softmax(sg(z_D)) + a/K)``, which equals the
  reference ``(1 - a)·softCE(z_S, p) + a·mean_c(-log softmax(z_S)_c)``.

  Args:
    student_logits: ``[B, K]`` student logits ``z_S``.
    dt_logits: ``[B, K]`` dynamic-teacher logits ``z_D`` (stop-gradient applied).
    smoothing: ``a`` in ``[0, 1]``, default 0.1.

  Returns:
    ``[B]`` per-example SCE.
  """
  _check_unit_interval("smoothing", smoothing)
  student_logits = _as_float(student_logits)
  dt_logits = jax.lax.stop_gradient(_as_float(dt_logits))
  _check_pair(student_logits, dt_logits, "dt_logits")
  targets = optax.smooth_labels(jax.nn.softmax(dt_logits, axis=-1), smoothing)
  return soft_cross_entropy(student_logits, targets)


# ----------------------------------------------------------------------------------
# Distillation losses
# ----------------------------------------------------------------------------------

def kd(student_logits, teacher_logits, *, temperature):
  """Hinton KD (docs/kd_methods.md §3): ``T²·KL(p_t^T ‖ p_s^T)`` per example.

  Args:
    student_logits: ``[B, K]`` student logits.
    teacher_logits: ``[B, K]`` teacher logits (stop-gradient applied).
    temperature: ``T > 0``.

  Returns:
    ``[B]`` per-example KD loss (KL summed over classes).
  """
  _check_positive("temperature", temperature)
  student_logits = _as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_pair(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return temperature ** 2 * _kl_from_log_probs(log_pt, log_ps)


def _dkd_log_parts(z, onehot):
  """Stable DKD pieces of temperature-scaled logits ``z`` ``[B, K]``.

  Returns:
    ``log_b``: ``[B, 2]`` = ``[log p_y, log(1 - p_y)]``;
    ``log_nt``: ``[B, K]`` log-softmax over the non-target classes, ``-inf`` at y.
  """
  masked = jnp.where(onehot, -jnp.inf, z)
  lse = jax.nn.logsumexp(z, axis=-1)
  lse_nt = jax.nn.logsumexp(masked, axis=-1)
  z_y = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
  log_b = jnp.stack([z_y - lse, lse_nt - lse], axis=-1)
  log_nt = jax.nn.log_softmax(masked, axis=-1)
  return log_b, log_nt


def dkd(student_logits, teacher_logits, labels, *, alpha, beta, temperature):
  """Decoupled KD (docs/kd_methods.md §4): ``α·TCKD + β·NCKD`` per example.

  ``TCKD = T²·KL(b_t ‖ b_s)`` with ``b = [p_y, 1 - p_y]`` of ``softmax(z/T)``;
  ``NCKD = T²·KL(p̂_t ‖ p̂_s)`` with ``p̂`` the softmax over the non-target classes.
  Computed stably: ``log p_y = z_y/T - LSE(z/T)``,
  ``log(1 - p_y) = LSE_{j≠y}(z_j/T) - LSE(z/T)``, and ``p̂`` from ``log_softmax`` of
  ``z/T`` with the target set to ``-inf``. Finite for arbitrarily confident logits.
  At ``α = β = 1`` and equal T: ``KD = TCKD + (1 - p_t,y)·NCKD`` (not DKD).
  The warm-up factor is applied by the caller (``gpd_jax.objective``).

  Args:
    student_logits: ``[B, K]`` student logits, ``K >= 2``.
    teacher_logits: ``[B, K]`` teacher logits (stop-gradient applied).
    labels: ``[B]`` integer labels in ``[0, K)`` (out-of-range labels give
      meaningless values; they cannot be checked under ``jit``).
    alpha: TCKD weight, ``>= 0``.
    beta: NCKD weight, ``>= 0``.
    temperature: ``T > 0``.

  Returns:
    ``[B]`` per-example DKD loss.
  """
  _check_nonnegative("alpha", alpha)
  _check_nonnegative("beta", beta)
  _check_positive("temperature", temperature)
  student_logits = _as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  labels = jnp.asarray(labels)
  _check_pair(student_logits, teacher_logits)
  _check_labels(labels, student_logits)
  num_classes = student_logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"`student_logits` needs K >= 2 classes for DKD, got K={num_classes}.")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  log_bs, log_nts = _dkd_log_parts(student_logits / temperature, onehot)
  log_bt, log_ntt = _dkd_log_parts(teacher_logits / temperature, onehot)
  tckd = _kl_from_log_probs(log_bt, log_bs)
  nckd = _kl_from_log_probs(log_ntt, log_nts)  # target entry: p̂_t = 0, guarded.
  return temperature ** 2 * (alpha * tckd + beta * nckd)


def _safe_norm(x, axis):
  """L2 norm whose gradient at 0 is 0 (not NaN)."""
  sq = jnp.sum(x * x, axis=axis)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _pearson(a, b, axis, eps):
  """Pearson correlation along ``axis``: cosine of mean-centred vectors, eps on the
  product of the norms (as in hunto/image_classification_sota ``dist_kd.py``)."""
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  num = jnp.sum(a * b, axis=axis)
  return num / (_safe_norm(a, axis) * _safe_norm(b, axis) + eps)


def dist(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0,
         eps=1e-8):
  """DIST (docs/kd_methods.md §5): ``τ²·(β·inter + γ·intra)``, per example.

  With ``Y = softmax(z/τ)``:
  ``inter_i = 1 - ρ(Y_s[i, :], Y_t[i, :])`` (Pearson over classes, per example) and
  ``intra = 1 - (1/K)·Σ_j ρ(Y_s[:, j], Y_t[:, j])`` (Pearson over the batch; a single
  batch-level scalar added to every example, so the mean equals ``L_DIST``).
  The intra term uses the batch this function sees (under ``jit`` with a sharded
  batch, that is the global batch); it is degenerate (0 correlation) for ``B = 1``.

  Args:
    student_logits: ``[B, K]`` student logits.
    teacher_logits: ``[B, K]`` teacher logits (stop-gradient applied).
    beta: inter-class weight ``>= 0``.
    gamma: intra-class weight ``>= 0``.
    temperature: ``τ > 0``.
    eps: ``> 0``, added to the product of the norms.

  Returns:
    ``[B]`` per-example DIST loss.
  """
  _check_nonnegative("beta", beta)
  _check_nonnegative("gamma", gamma)
  _check_positive("temperature", temperature)
  _check_positive("eps", eps)
  student_logits = _as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_pair(student_logits, teacher_logits)
  ys = jax.nn.softmax(student_logits / temperature, axis=-1)
  yt = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  inter = 1.0 - _pearson(ys, yt, axis=1, eps=eps)                 # [B]
  intra = 1.0 - jnp.mean(_pearson(ys, yt, axis=0, eps=eps))      # scalar
  return temperature ** 2 * (beta * inter + gamma * intra)


# ----------------------------------------------------------------------------------
# Metrics (docs/kd_methods.md §7)
# ----------------------------------------------------------------------------------

def top_k_correct(logits, labels, k=1):
  """Whether the label is among the top-k logits.

  Ties are broken by the lower class index (``jax.lax.top_k`` order).

  Args:
    logits: ``[B, K]`` logits.
    labels: ``[B]`` integer labels.
    k: ``1 <= k <= K``.

  Returns:
    ``[B]`` float32 in {0, 1}; its mean is the top-k accuracy. No gradient.
  """
  logits = jax.lax.stop_gradient(_as_float(logits))
  labels = jnp.asarray(labels)
  _check_logits("logits", logits)
  _check_labels(labels, logits)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"`k` must be an int in [1, K={logits.shape[-1]}], got {k!r}.")
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


def agreement(logits_a, logits_b):
  """Top-1 agreement ``1[argmax z_a == argmax z_b]`` (Stanton et al. 2021).

  Args:
    logits_a: ``[B, K]`` logits (e.g. student).
    logits_b: ``[B, K]`` logits (e.g. teacher).

  Returns:
    ``[B]`` float32 in {0, 1}; its mean is the agreement rate. No gradient.
  """
  logits_a = jax.lax.stop_gradient(_as_float(logits_a))
  logits_b = jax.lax.stop_gradient(_as_float(logits_b))
  _check_logits("logits_a", logits_a)
  if logits_b.shape != logits_a.shape:
    raise ValueError(
        f"`logits_b` shape {logits_b.shape} must equal `logits_a` shape {logits_a.shape}.")
  same = jnp.argmax(logits_a, axis=-1) == jnp.argmax(logits_b, axis=-1)
  return same.astype(jnp.float32)


def classification_sums(logits, labels, mask, suffix: str = "") -> dict:
  """Masked sums of one network's eval metrics over a batch (padding has ``mask`` 0).

  Args:
    logits: ``[B, K]``; labels: ``[B]`` ints; mask: ``[B]`` in {0, 1}.
    suffix: appended to the keys, e.g. ``'_S'`` -> ``top1_S``.
  Returns:
    ``{'top1'+suffix, 'top5'+suffix, 'ce'+suffix}``: scalar sums (top-5 is top-K when K < 5);
    divide by ``mask.sum()`` for means.
  """
  k = min(5, logits.shape[-1])
  return {f"top1{suffix}": jnp.sum(mask * top_k_correct(logits, labels, 1)),
          f"top5{suffix}": jnp.sum(mask * top_k_correct(logits, labels, k)),
          f"ce{suffix}": jnp.sum(mask * cross_entropy(logits, labels))}
