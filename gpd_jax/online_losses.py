"""Logit losses between networks trained together (online KD) and between several teachers.

Pure, per-example functions in the conventions of ``gpd_jax.losses``: logits ``[B, K]``, integer
labels ``[B]``, every loss returns ``[B]`` (its batch mean is the loss), logits are promoted to
float32, and the side that teaches is wrapped in ``stop_gradient``.

- ``mutual_kl``: Deep Mutual Learning's peer term, the mean over peers of ``KL(sg(p_peer) ‖ p)``.
- ``reverse_kl``: ``T²·KL(p ‖ sg(p_other))``, the mode-seeking direction.
- ``entropy``: prediction entropy (nats) at temperature T.
- ``balanced_kl``: BD-KD's student term, forward and reverse KL mixed per example by the sign of the
  entropy gap between the student and the teacher.
- ``teacher_confidence_weights`` and ``multi_teacher_kd``: CA-MKD's label-driven teacher weights and
  the weighted sum of KD terms over several teachers.
- ``switch_statistics``: SwitOKD's gap, distances to the labels, adaptive threshold and mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gpd_jax import losses
from gpd_jax.losses import _as_float, _check_labels, _check_logits, _check_pair, _check_positive
from gpd_jax.losses import _check_nonnegative, _kl_from_log_probs

__all__ = ["mutual_kl", "reverse_kl", "entropy", "balanced_kl", "teacher_confidence_weights",
           "multi_teacher_kd", "switch_statistics"]


def mutual_kl(logits, peer_logits, *, temperature=1.0):
  """DML's peer term: ``(1/P)·Σ_l T²·KL(sg(p_l^T) ‖ p^T)`` per example.

  Args:
    logits: ``[B, K]`` logits of the network being trained.
    peer_logits: a sequence of ``P >= 1`` peers' ``[B, K]`` logits (stop-gradient applied).
    temperature: ``T > 0`` (DML uses 1).

  Returns:
    ``[B]`` mean over peers of the KD term towards each peer.
  """
  peer_logits = tuple(peer_logits)
  if not peer_logits:
    raise ValueError("`peer_logits` must name at least one peer network.")
  terms = [losses.kd(logits, peer, temperature=temperature) for peer in peer_logits]
  return sum(terms) / len(terms)


def reverse_kl(logits, other_logits, *, temperature=1.0):
  """``T²·KL(p^T ‖ sg(q^T))`` per example: the trained network's own distribution comes first.

  Args:
    logits: ``[B, K]`` logits ``z`` of the network being trained (``p = softmax(z/T)``).
    other_logits: ``[B, K]`` logits of the other network (stop-gradient applied).
    temperature: ``T > 0``.

  Returns:
    ``[B]`` per-example reverse KL.
  """
  _check_positive("temperature", temperature)
  logits = _as_float(logits)
  other_logits = jax.lax.stop_gradient(_as_float(other_logits))
  _check_pair(logits, other_logits, "other_logits")
  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(other_logits / temperature, axis=-1)
  return temperature ** 2 * _kl_from_log_probs(log_p, log_q)


def entropy(logits, *, temperature=1.0):
  """``-Σ_c p_c log p_c`` of ``p = softmax(z/T)``, per example ``[B]`` (nats)."""
  _check_positive("temperature", temperature)
  logits = _as_float(logits)
  _check_logits("logits", logits)
  log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def balanced_kl(student_logits, teacher_logits, *, temperature=1.0, gain=2.0):
  """BD-KD's student term: forward and reverse KL weighted per example by the entropy gap.

  ``H_s``, ``H_t``: entropies of ``softmax(z/T)`` (no gradient). Where the student is less sure
  than the teacher (``H_s > H_t``) the mode-seeking reverse KL is scaled by ``gain`` (it sharpens
  the student); elsewhere the mass-covering forward KL is (it softens an over-confident student):

      w_f = gain if H_s <= H_t else 1,   w_r = gain if H_s > H_t else 1
      loss = w_f·T²·KL(sg(p_t) ‖ p_s) + w_r·T²·KL(p_s ‖ sg(p_t))

  This is our reading of the method (sample-wise weights from the entropy gap); the paper's exact
  weighting may differ. ``gain = 1`` gives the plain symmetric sum.

  Args:
    student_logits: ``[B, K]`` logits of the network being trained.
    teacher_logits: ``[B, K]`` logits of the (online) teacher (stop-gradient applied).
    temperature: ``T > 0``.
    gain: weight ``>= 0`` of the favoured direction.

  Returns:
    ``[B]`` per-example loss.
  """
  _check_nonnegative("gain", gain)
  forward = losses.kd(student_logits, teacher_logits, temperature=temperature)
  reverse = reverse_kl(student_logits, teacher_logits, temperature=temperature)
  student_less_sure = jax.lax.stop_gradient(
      entropy(student_logits, temperature=temperature)
      > entropy(jax.lax.stop_gradient(teacher_logits), temperature=temperature))
  w_forward = jnp.where(student_less_sure, 1.0, gain)
  w_reverse = jnp.where(student_less_sure, gain, 1.0)
  return w_forward * forward + w_reverse * reverse


def _stack_teachers(teacher_logits):
  teacher_logits = tuple(teacher_logits)
  if len(teacher_logits) < 2:
    raise ValueError(f"multi-teacher KD needs >= 2 teachers' logits, got {len(teacher_logits)}.")
  shapes = {t.shape for t in teacher_logits}
  if len(shapes) != 1:
    raise ValueError(f"every teacher's logits must have the same [B, K] shape, got {sorted(shapes)}.")
  return jax.lax.stop_gradient(jnp.stack([_as_float(t) for t in teacher_logits]))


def teacher_confidence_weights(teacher_logits, labels):
  """CA-MKD's per-example teacher weights ``[B, M]`` from the labels.

  ``w_ik = (1 - softmax_k(CE_ik)) / (M - 1)`` with ``CE_ik`` teacher k's cross-entropy on example i
  and the softmax taken over the ``M`` teachers: teachers that are surer of the right class weigh
  more. Each row sums to 1. No gradient.

  Args:
    teacher_logits: a sequence of ``M >= 2`` teachers' ``[B, K]`` logits.
    labels: ``[B]`` integer labels.
  """
  stacked = _stack_teachers(teacher_logits)                                  # [M, B, K]
  labels = jnp.asarray(labels)
  _check_labels(labels, stacked[0])
  ce = jnp.stack([losses.cross_entropy(t, labels) for t in stacked], axis=-1)  # [B, M]
  num_teachers = stacked.shape[0]
  return jax.lax.stop_gradient((1.0 - jax.nn.softmax(ce, axis=-1)) / (num_teachers - 1))


def multi_teacher_kd(student_logits, teacher_logits, labels, *, temperature=4.0):
  """CA-MKD's logit term: ``(1/M)·Σ_k w_ik·T²·KL(p_k^T ‖ p_s^T)`` per example.

  Args:
    student_logits: ``[B, K]`` logits of the network being trained.
    teacher_logits: a sequence of ``M >= 2`` teachers' ``[B, K]`` logits (stop-gradient applied).
    labels: ``[B]`` integer labels (they set the weights, ``teacher_confidence_weights``).
    temperature: ``T > 0``.

  Returns:
    ``[B]`` per-example loss.
  """
  stacked = _stack_teachers(teacher_logits)
  weights = teacher_confidence_weights(tuple(stacked), labels)              # [B, M]
  kd = jnp.stack([losses.kd(student_logits, t, temperature=temperature) for t in stacked], -1)
  return jnp.mean(weights * kd, axis=-1)


def switch_statistics(student_logits, teacher_logits, labels):
  """SwitOKD's batch statistics and mode (T = 1, no gradient).

  ``gap = mean_i ‖p_s,i - p_t,i‖₁``; ``d_s = mean_i ‖p_s,i - onehot(y_i)‖₁`` and ``d_t`` likewise;
  the adaptive threshold ``delta = d_s - exp(-d_t/(d_s + d_t))·d_t``. Expert mode (the teacher
  pauses, only the student learns) when ``gap > delta`` and ``d_t < d_s``; learning mode (both
  learn) otherwise.

  Args:
    student_logits, teacher_logits: ``[B, K]`` logits of the two online networks.
    labels: ``[B]`` integer labels.

  Returns:
    dict of float32 scalars ``gap``, ``d_student``, ``d_teacher``, ``threshold`` and bool ``expert``.
  """
  student_logits = jax.lax.stop_gradient(_as_float(student_logits))
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_pair(student_logits, teacher_logits)
  labels = jnp.asarray(labels)
  _check_labels(labels, student_logits)
  p_s = jax.nn.softmax(student_logits, axis=-1)
  p_t = jax.nn.softmax(teacher_logits, axis=-1)
  onehot = jax.nn.one_hot(labels, p_s.shape[-1], dtype=p_s.dtype)
  gap = jnp.mean(jnp.sum(jnp.abs(p_s - p_t), axis=-1))
  d_s = jnp.mean(jnp.sum(jnp.abs(p_s - onehot), axis=-1))
  d_t = jnp.mean(jnp.sum(jnp.abs(p_t - onehot), axis=-1))
  # d_s + d_t is 0 only when both networks are exactly one-hot on the labels: then delta = 0.
  ratio = jnp.where(d_s + d_t > 0, d_t / jnp.where(d_s + d_t > 0, d_s + d_t, 1.0), 0.0)
  threshold = d_s - jnp.exp(-ratio) * d_t
  expert = jnp.logical_and(gap > threshold, d_t < d_s)
  return {"gap": gap, "d_student": d_s, "d_teacher": d_t, "threshold": threshold,
          "expert": expert}
