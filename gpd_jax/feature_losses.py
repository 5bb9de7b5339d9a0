"""Feature-distillation losses and their trainable connectors (pure functions and Flax modules).

The features come from a model built with ``return_features=True`` (``models.layers.Features``).
Methods (``docs/feature_kd.md`` maps each onto the reference code):

* ReviewKD: :class:`ReviewKDFusion` (a stack of :class:`ABF` modules that fuses the student's
  levels from the deepest up) and :func:`hcl_loss` against the teacher's levels;
  :func:`review_levels` picks the levels from a ``Features``.
* SP: :func:`sp_loss` (row-normalised batch Gram matrices).
* FitNets: :class:`FitNetRegressor` (student hint -> teacher shape) and :func:`fitnet_hint_loss`.
* CRD: :class:`CRDEmbed`, the memory bank :class:`CRDState` (checkpointable pytree, updated by the
  pure :func:`crd_update_memory`), :func:`crd_nce_loss`, :func:`crd_loss`, and the exact-mode
  negative sampler :func:`crd_class_index` / :func:`crd_contrast_indices`.

Conventions: images are NHWC; feature losses are batch-level and return a scalar (the weighted sum is
the trainer's business). Features are promoted to float32 before any arithmetic, and every teacher
input goes through ``jax.lax.stop_gradient``. The connectors' initialisers follow the PyTorch
reference code (their ``kaiming_uniform_`` calls and PyTorch's layer defaults), and their BatchNorms
use PyTorch's defaults (momentum 0.1, eps 1e-5), like the models. Shape errors name the argument.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax.models.layers import BN_EPSILON, BN_MOMENTUM, Features

__all__ = [
    "adaptive_avg_pool", "upsample_nearest", "feature_mse",
    "ABF", "ReviewKDFusion", "review_levels", "reviewkd_mid_features", "hcl_loss",
    "sp_loss",
    "FitNetRegressor", "fitnet_hint_loss",
    "CRDEmbed", "CRDState", "crd_init_state", "crd_scores", "crd_nce_loss", "crd_update_memory",
    "crd_loss", "CRDClassIndex", "crd_class_index", "crd_contrast_indices",
]

# PyTorch's ``kaiming_uniform_(w, a=1)`` (the reference ABF convs): U(±sqrt(3 / fan_in)).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# PyTorch's default conv / linear weight init (``kaiming_uniform_(w, a=sqrt(5))``): U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def symmetric_uniform(bound: float):
  """Initialiser U(-bound, bound) (PyTorch's default bias init uses bound = 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _as_float(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nhwc(name: str, x) -> None:
  if jnp.ndim(x) != 4:
    raise ValueError(f"`{name}` must be a [B, H, W, C] feature map, got shape {jnp.shape(x)}")


def _check_same_shape(student_name: str, student, teacher_name: str, teacher) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(f"`{student_name}` has shape {jnp.shape(student)} but `{teacher_name}` has "
                     f"{jnp.shape(teacher)}; map the student feature to the teacher's shape first "
                     "(a connector such as ReviewKDFusion or FitNetRegressor)")


# ---------------------------------------------------------------------------------------------
# Resampling with PyTorch's semantics
# ---------------------------------------------------------------------------------------------


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of PyTorch's adaptive average pooling along one axis.

  Output cell i averages inputs [floor(i·in/out), ceil((i+1)·in/out)); cells overlap when ``out``
  does not divide ``in``.
  """
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """PyTorch's ``adaptive_avg_pool2d`` on NHWC: [B, H, W, C] -> [B, h, w, C] with (h, w) = out_size."""
  _check_nhwc("x", x)
  rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], out_size[0]), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], out_size[1]), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's ``interpolate(mode='nearest')`` on NHWC: output (i, j) reads input
  (floor(i·H/h), floor(j·W/w)). [B, H, W, C] -> [B, h, w, C]."""
  _check_nhwc("x", x)
  rows = (np.arange(size[0]) * x.shape[1]) // size[0]
  cols = (np.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, rows][:, :, cols]


def feature_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean squared error over every element (PyTorch ``mse_loss``), teacher stop-gradient.

  Args:
    student: [B, ...]; teacher: the same shape.
  Returns:
    A scalar.
  """
  _check_same_shape("student", student, "teacher", teacher)
  diff = _as_float(student) - jax.lax.stop_gradient(_as_float(teacher))
  return jnp.mean(diff * diff)


# ---------------------------------------------------------------------------------------------
# ReviewKD: attention-based fusion (ABF) and the hierarchical context loss (HCL)
# ---------------------------------------------------------------------------------------------


class ABF(nn.Module):
  """One attention-based fusion level of ReviewKD.

  1×1 conv (no bias) + BN to ``mid_features``; if ``fuse``, the deeper level's residual is
  upsampled (nearest) to this level's size, a 1×1 conv (2·mid -> 2, with bias) + sigmoid predicts
  two attention maps and the two are mixed ``x·a0 + residual·a1``; then a 3×3 conv (no bias) + BN
  maps the mix to ``out_features`` (the teacher's width at this level).
  """
  mid_features: int
  out_features: int
  fuse: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None, *, train: bool):
    """
    Args:
      x: [B, H, W, C_in] the student's feature at this level.
      residual: [B, h, w, mid_features], the mixed map of the deeper level (required iff ``fuse``).
      train: BN batch statistics (and running-average update) when True.
    Returns:
      (out [B, H, W, out_features], mixed [B, H, W, mid_features]: the next level's residual).
    """
    _check_nhwc("x", x)
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=self.dtype)
    x = nn.Conv(self.mid_features, (1, 1), use_bias=False, kernel_init=kaiming_uniform_a1,
                dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    x = bn(name="bn1")(x)
    if self.fuse:
      if residual is None:
        raise ValueError("ABF with fuse=True needs the deeper level's `residual`")
      if residual.shape[-1] != self.mid_features:
        raise ValueError(f"`residual` must have {self.mid_features} channels, got shape {residual.shape}")
      y = upsample_nearest(residual, x.shape[1:3]).astype(self.dtype)
      fan_in = 2 * self.mid_features
      att = nn.Conv(2, (1, 1), kernel_init=torch_default_kernel_init,
                    bias_init=symmetric_uniform(1.0 / math.sqrt(fan_in)), dtype=self.dtype,
                    name="att_conv")(jnp.concatenate([x, y], axis=-1))
      att = nn.sigmoid(att)
      x = x * att[..., 0:1] + y * att[..., 1:2]
    elif residual is not None:
      raise ValueError("ABF with fuse=False (the deepest level) takes no `residual`")
    out = nn.Conv(self.out_features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=kaiming_uniform_a1, dtype=self.dtype, name="conv2")(x)
    return bn(name="bn2")(out), x


class ReviewKDFusion(nn.Module):
  """ReviewKD's student-side connector: one :class:`ABF` per level, run from the deepest level up.

  Levels are ordered shallow -> deep; the deepest is usually the pooled feature as a 1×1 map
  (:func:`review_levels`). The deepest ABF does not fuse; every other level fuses the mixed map
  handed down from the level below it. ABF ``abf{i}`` serves level i. The input widths are read
  from the features, so the DT's connector (×r input widths, as GPD builds it) is a second instance
  of the same module with the same fields.

  Attributes:
    out_features: the teacher's width at each level, shallow -> deep.
    mid_features: the ABFs' inner width (published recipes: ResNet-18 512, MobileNet 256; mdistiller
      uses ``reviewkd_mid_features`` of the student's deepest width).
  """
  out_features: Sequence[int]
  mid_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], *, train: bool) -> tuple[jax.Array, ...]:
    """
    Args:
      levels: L student features [B, H_i, W_i, C_i], shallow -> deep.
    Returns:
      L fused features [B, H_i, W_i, out_features[i]], shallow -> deep.
    """
    if len(levels) != len(self.out_features):
      raise ValueError(f"ReviewKDFusion has {len(self.out_features)} levels (out_features="
                       f"{tuple(self.out_features)}) but got {len(levels)} student features")
    fused = [None] * len(levels)
    residual = None
    for i in reversed(range(len(levels))):
      abf = ABF(self.mid_features, int(self.out_features[i]), fuse=i < len(levels) - 1,
                dtype=self.dtype, name=f"abf{i}")
      fused[i], residual = abf(levels[i], residual, train=train)
    return tuple(fused)


def reviewkd_mid_features(deepest_width: int) -> int:
  """mdistiller's ABF inner width: min(512, the student's deepest width)."""
  return min(512, int(deepest_width))


def review_levels(features: Features, *, preact: bool) -> tuple[jax.Array, ...]:
  """ReviewKD's levels from a model's taps: the N stage outputs, then the pooled feature as a 1×1 map.

  Args:
    features: a model's ``Features``.
    preact: take the stages before their last ReLU (the teacher side always; the student side on
      ImageNet and in GPD) or after it (the student side of mdistiller's CIFAR recipe).
  Returns:
    N + 1 arrays: [B, H_i, W_i, C_i] for each stage, then [B, 1, 1, C_N].
  """
  stages = features.preact_stages if preact else features.stages
  return (*stages, features.pooled[:, None, None, :])


def hcl_loss(student_levels: Sequence[jax.Array], teacher_levels: Sequence[jax.Array], *,
             pool_sizes: Sequence[int] = (4, 2, 1)) -> jax.Array:
  """ReviewKD's hierarchical context loss, summed over levels.

  Per level with height H: ``(MSE + Σ_k w_k·MSE(pool_k(f_s), pool_k(f_t))) / (1 + Σ_k w_k)`` over
  the sizes k in ``pool_sizes`` with k < H, where pool_k is the adaptive average pool to k×k and the
  weight halves at every included size (1/2, 1/4, 1/8). MSE averages over all elements.

  Args:
    student_levels: L arrays [B, H_i, W_i, C_i] (fused student features).
    teacher_levels: L arrays of the same shapes (stop-gradient applied).
  Returns:
    A scalar.
  """
  if len(student_levels) != len(teacher_levels):
    raise ValueError(f"`student_levels` has {len(student_levels)} levels but `teacher_levels` has "
                     f"{len(teacher_levels)}")
  total = jnp.zeros((), jnp.float32)
  for i, (fs, ft) in enumerate(zip(student_levels, teacher_levels)):
    _check_nhwc(f"student_levels[{i}]", fs)
    _check_same_shape(f"student_levels[{i}]", fs, f"teacher_levels[{i}]", ft)
    fs, ft = _as_float(fs), jax.lax.stop_gradient(_as_float(ft))
    level = jnp.mean(jnp.square(fs - ft))
    weight, weights = 1.0, 1.0
    for k in pool_sizes:
      if k >= fs.shape[1]:
        continue
      weight /= 2.0
      pooled_diff = adaptive_avg_pool(fs, (k, k)) - adaptive_avg_pool(ft, (k, k))
      level = level + weight * jnp.mean(jnp.square(pooled_diff))
      weights += weight
    total = total + level / weights
  return total


# ---------------------------------------------------------------------------------------------
# SP: similarity-preserving KD
# ---------------------------------------------------------------------------------------------


def _row_normalise(g: jax.Array) -> jax.Array:
  """x / max(‖x‖₂, 1e-12) per row (PyTorch ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
  return g / jnp.maximum(norm, 1e-12)


def sp_loss(student_feature: jax.Array, teacher_feature: jax.Array, *, groups: int = 1) -> jax.Array:
  """Similarity-preserving loss for one pair of feature maps.

  With F the features flattened per example ([b, D]) and G = F·Fᵀ ([b, b]) row-normalised to G̃:
  ``‖G̃_t − G̃_s‖²_F / b²``. Teacher and student widths may differ.

  Args:
    student_feature: [B, ...] (e.g. the last stage's output, [B, H, W, C_s]).
    teacher_feature: [B, ...] (stop-gradient applied).
    groups: split the batch into this many equal consecutive groups and average their losses
      (b = B / groups); the reference code computes SP on each GPU's batch, which is what
      ``groups = number of devices`` reproduces with a sharded global batch. 1: the whole batch.
  Returns:
    A scalar.
  """
  batch = jnp.shape(student_feature)[0]
  if jnp.shape(teacher_feature)[0] != batch:
    raise ValueError(f"`student_feature` has batch {batch} but `teacher_feature` has "
                     f"{jnp.shape(teacher_feature)[0]}")
  if not isinstance(groups, int) or groups < 1 or batch % groups:
    raise ValueError(f"`groups` must be a positive integer dividing the batch size {batch}, got {groups!r}")
  size = batch // groups

  def gram(f):
    f = _as_float(f).reshape(groups, size, -1)
    return _row_normalise(jnp.einsum("gid,gjd->gij", f, f, precision=jax.lax.Precision.HIGHEST))

  diff = gram(jax.lax.stop_gradient(teacher_feature)) - gram(student_feature)
  return jnp.mean(jnp.sum(diff * diff, axis=(1, 2)) / (size * size))


# ---------------------------------------------------------------------------------------------
# FitNets: hint regressor and hint loss
# ---------------------------------------------------------------------------------------------


class FitNetRegressor(nn.Module):
  """FitNets' regressor (mdistiller ``ConvReg``): maps a student hint to the teacher's [H, W, C].

  From the student's [H_s, W_s] and the teacher's [H_t, W_t]: H_s = 2·H_t: 3×3 conv, stride 2,
  padding 1; 2·H_s = H_t: 4×4 transposed conv, stride 2, padding 1; H_s >= H_t: a valid conv of
  kernel (1 + H_s − H_t, 1 + W_s − W_t). All with a bias, then BN and (``use_relu``) ReLU.

  Attributes:
    target_shape: the teacher feature's (H_t, W_t, C_t).
  """
  target_shape: tuple[int, int, int]
  use_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, H_s, W_s, C_s] -> [B, H_t, W_t, C_t]."""
    _check_nhwc("x", x)
    (h_s, w_s), (h_t, w_t, c_t) = x.shape[1:3], tuple(int(d) for d in self.target_shape)
    c_s = x.shape[-1]
    x = x.astype(self.dtype)
    if h_s == 2 * h_t:
      fan_in = c_s * 9
      y = nn.Conv(c_t, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                  kernel_init=torch_default_kernel_init,
                  bias_init=symmetric_uniform(1 / math.sqrt(fan_in)), dtype=self.dtype, name="conv")(x)
    elif 2 * h_s == h_t:
      # PyTorch ConvTranspose2d(k=4, s=2, p=1) is a dilated-input conv with padding k − 1 − p = 2 and
      # the flipped kernel. Its kernel is [4, 4, C_t, C_s] here (PyTorch's [C_s, C_t, 4, 4]), so the
      # default fan-in axis -2 gives PyTorch's fan-in C_t·k².
      fan_in = c_t * 16
      y = nn.ConvTranspose(c_t, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                           transpose_kernel=True, kernel_init=torch_default_kernel_init,
                           bias_init=symmetric_uniform(1 / math.sqrt(fan_in)), dtype=self.dtype,
                           name="conv")(x)
    elif h_s >= h_t:
      kernel = (1 + h_s - h_t, 1 + w_s - w_t)
      fan_in = c_s * kernel[0] * kernel[1]
      y = nn.Conv(c_t, kernel, padding="VALID", kernel_init=torch_default_kernel_init,
                  bias_init=symmetric_uniform(1 / math.sqrt(fan_in)), dtype=self.dtype, name="conv")(x)
    else:
      raise ValueError(f"FitNetRegressor: no regressor maps a student hint of size {h_s}×{w_s} to the "
                       f"teacher's {h_t}×{w_t} (supported: H_s = 2·H_t, 2·H_s = H_t, H_s >= H_t); "
                       "choose hint layers with compatible resolutions")
    y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, name="bn")(y)
    if y.shape[1:] != (h_t, w_t, c_t):
      raise ValueError(f"FitNetRegressor produced {y.shape[1:]}, not target_shape {(h_t, w_t, c_t)}")
    return nn.relu(y) if self.use_relu else y


def fitnet_hint_loss(regressed: jax.Array, teacher_hint: jax.Array) -> jax.Array:
  """FitNets' hint loss: MSE (mean over all elements) between the regressed student hint
  [B, H, W, C] and the teacher's hint of the same shape (stop-gradient). A scalar."""
  return feature_mse(regressed, teacher_hint)


# ---------------------------------------------------------------------------------------------
# CRD: contrastive representation distillation
# ---------------------------------------------------------------------------------------------


class CRDEmbed(nn.Module):
  """CRD's embedding head: flatten, linear to ``features`` (with bias), L2-normalise.

  One for the student and one for the teacher; both are trainable (the teacher's features are
  not). [B, ...] -> [B, features] with unit rows.
  """
  features: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _as_float(x).reshape(x.shape[0], -1)
    fan_in = x.shape[-1]
    x = nn.Dense(self.features, kernel_init=torch_default_kernel_init,
                 bias_init=symmetric_uniform(1 / math.sqrt(fan_in)), name="linear")(x)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


@flax.struct.dataclass
class CRDState:
  """CRD's memory bank (non-trainable state; a pytree to keep in the train state and checkpoints).

  Attributes:
    memory_student: [N, D] one unit embedding of the student per training example.
    memory_teacher: [N, D] the same for the teacher.
    z_student: scalar normaliser of the student-embedding scores; negative until set (first batch).
    z_teacher: scalar normaliser of the teacher-embedding scores; negative until set.
  """
  memory_student: jax.Array
  memory_teacher: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array


def crd_init_state(rng: jax.Array, num_data: int, dim: int = 128) -> CRDState:
  """Memories U(±1/sqrt(dim/3)) [N, dim] each (as the reference), normalisers unset (−1)."""
  if num_data < 2 or dim < 1:
    raise ValueError(f"crd_init_state needs num_data >= 2 and dim >= 1, got {num_data}, {dim}")
  bound = 1.0 / math.sqrt(dim / 3.0)
  k_s, k_t = jax.random.split(rng)
  memory = functools.partial(jax.random.uniform, shape=(num_data, dim), minval=-bound, maxval=bound)
  return CRDState(memory_student=memory(k_s), memory_teacher=memory(k_t),
                  z_student=-jnp.ones((), jnp.float32), z_teacher=-jnp.ones((), jnp.float32))


def _check_embeddings(student_embed, teacher_embed, state: CRDState):
  dim = state.memory_student.shape[1]
  for name, e in (("student_embed", student_embed), ("teacher_embed", teacher_embed)):
    if jnp.ndim(e) != 2 or jnp.shape(e)[1] != dim:
      raise ValueError(f"`{name}` must be [B, {dim}] (the memory's width), got shape {jnp.shape(e)}")


def crd_scores(student_embed: jax.Array, teacher_embed: jax.Array, state: CRDState,
               contrast_indices: jax.Array, *, temperature: float = 0.07):
  """Normalised contrastive scores of both directions, and the state with its normalisers set.

  ``s[b, k] = exp(e_s,b · M_t[idx[b, k]] / τ) / Z_s`` (student embedding against the teacher's
  memory) and ``t[b, k] = exp(e_t,b · M_s[idx[b, k]] / τ) / Z_t``. A normaliser that is unset (< 0)
  becomes ``mean(exp-scores) · N`` of this batch, a constant from then on. The memories are read
  without gradient.

  Args:
    student_embed, teacher_embed: [B, D] unit embeddings (``CRDEmbed``).
    state: the memory bank ([N, D] memories).
    contrast_indices: [B, K+1] int, column 0 the example's own index, then K negatives.
  Returns:
    (s [B, K+1], t [B, K+1], state with z_student / z_teacher set).
  """
  _check_embeddings(student_embed, teacher_embed, state)
  if jnp.ndim(contrast_indices) != 2 or jnp.shape(contrast_indices)[0] != jnp.shape(student_embed)[0]:
    raise ValueError(f"`contrast_indices` must be [B, K+1] with B = {jnp.shape(student_embed)[0]}, "
                     f"got shape {jnp.shape(contrast_indices)}")
  num_data = state.memory_student.shape[0]
  hi = jax.lax.Precision.HIGHEST
  memory_t = jax.lax.stop_gradient(state.memory_teacher)[contrast_indices]  # [B, K+1, D]
  memory_s = jax.lax.stop_gradient(state.memory_student)[contrast_indices]
  s = jnp.exp(jnp.einsum("bkd,bd->bk", memory_t, _as_float(student_embed), precision=hi) / temperature)
  t = jnp.exp(jnp.einsum("bkd,bd->bk", memory_s, _as_float(teacher_embed), precision=hi) / temperature)
  z_s = jnp.where(state.z_student < 0, jax.lax.stop_gradient(jnp.mean(s)) * num_data, state.z_student)
  z_t = jnp.where(state.z_teacher < 0, jax.lax.stop_gradient(jnp.mean(t)) * num_data, state.z_teacher)
  return s / z_s, t / z_t, state.replace(z_student=z_s, z_teacher=z_t)


def crd_nce_loss(scores: jax.Array, num_data: int, *, eps: float = 1e-7) -> jax.Array:
  """CRD's NCE loss for one direction, with noise probability P_n = 1/N and m = K negatives.

  ``−(1/B)·[Σ_b log(x_b0 / (x_b0 + m·P_n + eps))
  + Σ_b Σ_{k≥1} log(m·P_n / (x_bk + m·P_n + eps))]``.

  Args:
    scores: [B, K+1] normalised scores, column 0 the positive.
    num_data: N, the training-set size.
  Returns:
    A scalar.
  """
  if jnp.ndim(scores) != 2 or jnp.shape(scores)[1] < 2:
    raise ValueError(f"`scores` must be [B, K+1] with K >= 1, got shape {jnp.shape(scores)}")
  scores = _as_float(scores)
  m_pn = (scores.shape[1] - 1) / float(num_data)
  positive = jnp.log(scores[:, 0] / (scores[:, 0] + m_pn + eps))
  negative = jnp.log(m_pn / (scores[:, 1:] + m_pn + eps))
  return -(jnp.sum(positive) + jnp.sum(negative)) / scores.shape[0]


def crd_update_memory(state: CRDState, student_embed: jax.Array, teacher_embed: jax.Array,
                      indices: jax.Array, *, momentum: float = 0.5) -> CRDState:
  """The memory update after a step: ``M[i] ← ℓ2norm(momentum·M[i] + (1 − momentum)·e_i)``.

  Args:
    student_embed, teacher_embed: [B, D] this batch's embeddings (used without gradient).
    indices: [B] int, the examples' dataset indices (distinct within a batch; with repeats the
      write order is unspecified).
  Returns:
    The new state (normalisers unchanged).
  """
  _check_embeddings(student_embed, teacher_embed, state)

  def update(memory, embed):
    mixed = momentum * memory[indices] + (1.0 - momentum) * jax.lax.stop_gradient(_as_float(embed))
    mixed = mixed / jnp.sqrt(jnp.sum(mixed * mixed, axis=-1, keepdims=True))
    return memory.at[indices].set(mixed.astype(memory.dtype))

  return state.replace(memory_student=update(state.memory_student, student_embed),
                       memory_teacher=update(state.memory_teacher, teacher_embed))


def crd_loss(student_embed: jax.Array, teacher_embed: jax.Array, state: CRDState,
             indices: jax.Array, contrast_indices: jax.Array, *, temperature: float = 0.07,
             momentum: float = 0.5) -> tuple[jax.Array, CRDState]:
  """CRD: ``L = nce(s) + nce(t)`` on the current memory, then the memory update.

  Args:
    student_embed, teacher_embed: [B, D] unit embeddings of the pooled student / teacher features.
    state: the memory bank.
    indices: [B] dataset indices of the batch.
    contrast_indices: [B, K+1] (column 0 = ``indices``; see :func:`crd_contrast_indices`).
  Returns:
    (scalar loss, new state): normalisers set on the first call, this batch written to the memories.
  """
  s, t, state = crd_scores(student_embed, teacher_embed, state, contrast_indices,
                           temperature=temperature)
  num_data = state.memory_student.shape[0]
  loss = crd_nce_loss(s, num_data) + crd_nce_loss(t, num_data)
  return loss, crd_update_memory(state, student_embed, teacher_embed, indices, momentum=momentum)


@flax.struct.dataclass
class CRDClassIndex:
  """The training labels arranged for exact-mode negative sampling (built once, host side).

  Attributes:
    order: [N] dataset indices sorted by label.
    start: [C] where each class begins in ``order``.
    count: [C] the size of each class.
  """
  order: jax.Array
  start: jax.Array
  count: jax.Array


def crd_class_index(labels: np.ndarray, num_classes: int) -> CRDClassIndex:
  """Builds the :class:`CRDClassIndex` of the training labels [N] (ints in [0, num_classes))."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"`labels` must be a non-empty [N] array, got shape {labels.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"`labels` must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  count = np.bincount(labels, minlength=num_classes)
  if np.any(count == labels.size):
    raise ValueError("`labels` has a single class: exact-mode CRD needs negatives of other classes")
  order = np.argsort(labels, kind="stable")
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  return CRDClassIndex(order=jnp.asarray(order, jnp.int32), start=jnp.asarray(start, jnp.int32),
                       count=jnp.asarray(count, jnp.int32))


def crd_contrast_indices(rng: jax.Array, indices: jax.Array, labels: jax.Array,
                         class_index: CRDClassIndex, num_negatives: int) -> jax.Array:
  """Exact-mode CRD sampling: [own index, K negatives drawn uniformly, with replacement, from the
  examples of the *other* classes] (RepDistiller's ``CIFAR100InstanceSample``).

  A uniform u in [0, N − n_y) skips the label's block [start_y, start_y + n_y) of the sorted order.

  Args:
    indices: [B] dataset indices of the batch; labels: [B] their labels.
  Returns:
    [B, K+1] int32.
  """
  labels = jnp.asarray(labels)
  n = class_index.order.shape[0]
  count = class_index.count[labels][:, None]
  start = class_index.start[labels][:, None]
  u = jax.random.randint(rng, (labels.shape[0], num_negatives), 0, n - count)
  negatives = class_index.order[jnp.where(u < start, u, u + count)]
  return jnp.concatenate([jnp.asarray(indices, jnp.int32)[:, None], negatives], axis=1)
