"""Inverse reparameterization (IR): a student -> its function-preserving dynamic teacher (DT).

``docs/method.md`` §3 (channels) and §4 (OREPA branches). Every DT channel copy carries 1/r of the
student's activation ("1/r-scaled replica" convention, copy-major layout): rescaled leaves are divided by
r, widened axes are tiled r times, and each tiling adds fresh N(0, σ²) noise to every copy.
"""
from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp

from gpd_jax.models.layers import OREPA_PRETRAINED_SCALES, OREPA_SCRATCH_SCALES
from gpd_jax.transforms.spec import (ExpansionSpec, check_ratio, check_variables_match, derive_spec,
                                     flatten, infer_sample_shape, unflatten)


def _tiled_shapes(shape, tiled_axes, ratio):
  """The shape after each successive tiling of ``tiled_axes``."""
  shapes, shape = [], list(shape)
  for axis in tiled_axes:
    shape[axis] *= ratio
    shapes.append(tuple(shape))
  return shapes


def _sample_shape(model, variables, sample_input, argument):
  if sample_input is not None:
    return tuple(jnp.shape(sample_input))
  return infer_sample_shape(model, variables, argument=argument)


def add_branches(model: nn.Module, variables, *, rng: jax.Array, pretrained: bool = True,
                 sample_input: jax.Array | None = None):
  """IR along the branch dimension: every 3×3 stride-1 conv becomes a six-branch OREPA block.

  The original kernel becomes branch 0 (``kernel`` keeps its path). The new factors take OREPA's
  initialisers (``e1`` = 0); the branch scalings ``v`` are (1,0,0,0,0,0) for a pre-trained student, so
  the function is unchanged, and OREPA's from-scratch defaults (0.25, 0.25, 0, 0.5, 0.05, 0.5) otherwise.

  Returns:
    (branched_model, branched_variables) with ``params``, ``batch_stats`` and ``consts``.
  """
  if getattr(model, "branches", None) is None:
    raise ValueError(f"{type(model).__name__} has no 'branches' field, so it cannot grow OREPA branches")
  if model.branches:
    raise ValueError("model already has branches (branches=True); pass the plain student")
  sample_shape = _sample_shape(model, variables, sample_input, "variables")
  check_variables_match(model, variables, sample_shape, argument="variables")
  branched = model.clone(branches=True)
  fresh = branched.init(rng, jnp.zeros(sample_shape, jnp.float32), train=False)
  spec = derive_spec(branched, 2, sample_shape)
  given = flatten(variables)
  scales = jnp.asarray(OREPA_PRETRAINED_SCALES if pretrained else OREPA_SCRATCH_SCALES, jnp.float32)
  out = {}
  for key, leaf in flatten(fresh).items():
    if key in given:
      out[key] = jnp.asarray(given[key])
    elif spec.leaves[key].role == "branch:v":
      out[key] = jnp.broadcast_to(scales[:, None], leaf.shape).astype(leaf.dtype)
    else:
      out[key] = leaf
  unused = sorted(set(given) - set(out))
  if unused:
    raise ValueError(f"variables has leaves the branched model does not use: {unused[:5]}")
  return branched, unflatten(out)


def expand_channels(model: nn.Module, variables, *, ratio: int, rng: jax.Array,
                    noise_std: float = 1e-6, spec: ExpansionSpec | None = None,
                    sample_input: jax.Array | None = None):
  """IR along channels: student variables -> DT variables of ``model.clone(ratio=ratio)``.

  Per leaf (spec rule): ``x/r`` if rescaled, then for each widened axis (output first)
  ``x = tile(x, r, axis) + N(0, noise_std²)``; BN running statistics are tiled without noise, and leaves
  with no widened axis (the head bias) are copied unchanged.

  Args:
    model: the student module (ratio 1; with or without branches).
    variables: its variables (``params``, ``batch_stats``, and ``consts`` with branches).
    ratio: integer >= 2.
    rng: PRNG key for the noise. All the noise of the tree is one draw, cut into pieces in leaf
      order: a random op per leaf would make the jitted init of a big DT compile for minutes on CPU.
    noise_std: σ of the symmetry-breaking noise (absolute); 0 gives an exact copy.
  Returns:
    (dt_model, dt_variables).
  """
  ratio = check_ratio(ratio)
  if not hasattr(model, "ratio"):  # also with an explicit spec: the DT is model.clone(ratio=r)
    raise ValueError(f"{type(model).__name__} has no 'ratio' field; GPD models must build their DT "
                     "as model.clone(ratio=r) (see docs/custom_models.md)")
  if model.ratio != 1:
    raise ValueError(f"model must be the student (ratio=1), got ratio={model.ratio}")
  if noise_std < 0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std}")
  sample_shape = _sample_shape(model, variables, sample_input, "variables")
  check_variables_match(model, variables, sample_shape, argument="variables")
  spec = spec or derive_spec(model, ratio, sample_shape)
  flat = flatten(variables)
  noisy = {key: _tiled_shapes(jnp.shape(leaf), spec.leaves[key].tiled_axes, ratio)
           for key, leaf in flat.items() if spec.leaves[key].noise and noise_std > 0}
  total = sum(math.prod(shape) for shapes in noisy.values() for shape in shapes)
  noise = noise_std * jax.random.normal(rng, (total,), jnp.float32) if total else None
  offset, out = 0, {}
  for key, leaf in flat.items():
    rule = spec.leaves[key]
    x = jnp.asarray(leaf)
    if rule.rescale:
      x = x / ratio
    for axis in rule.tiled_axes:
      x = jnp.concatenate([x] * ratio, axis=axis)  # copy-major: copy j at [j·C, (j+1)·C)
      if key in noisy:
        x = x + noise[offset:offset + x.size].reshape(x.shape).astype(x.dtype)
        offset += x.size
    out[key] = x
  return model.clone(ratio=ratio), unflatten(out)


def expand(model: nn.Module, variables, *, ratio: int, rng: jax.Array, noise_std: float = 1e-6,
           branches: bool = False, pretrained: bool = True, spec: ExpansionSpec | None = None,
           sample_input: jax.Array | None = None):
  """IR: builds the dynamic teacher of a student (``docs/method.md`` §3-§4).

  Args:
    model: the plain student module (``ratio=1``, ``branches=False``).
    variables: its variables, ``{'params': ..., 'batch_stats': ...}``; the BN statistics seed the DT's.
    ratio: channel expansion ratio, an integer >= 2.
    rng: PRNG key (branch initialisation and IR noise).
    noise_std: σ of the IR noise (1e-6 in the reference code; 0 for an exact copy).
    branches: also add six OREPA branches to every 3×3 stride-1 conv (branch IR first, then channels).
    pretrained: branch scalings (1,0,0,0,0,0) so the DT computes the student's function (pre-trained
      student); False uses OREPA's from-scratch scalings, and the DT then equals the branched student view.
    spec: an explicit expansion spec (for models that cannot derive one).
    sample_input: an input batch the model accepts, when [1, 32, 32, C] does not work.
  Returns:
    (dt_model, dt_variables): ``dt_model = model.clone(ratio=ratio, branches=branches)``.
  """
  ratio = check_ratio(ratio)
  branch_rng, noise_rng = jax.random.split(rng)
  if branches:
    model, variables = add_branches(model, variables, rng=branch_rng, pretrained=pretrained,
                                    sample_input=sample_input)
  return expand_channels(model, variables, ratio=ratio, rng=noise_rng, noise_std=noise_std, spec=spec,
                         sample_input=sample_input)
