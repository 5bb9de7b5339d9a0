"""The student as a differentiable view of the DT's parameters (GPD's hard strategy, docs/method.md §5).

The student owns no parameters: at every step it is read out of the DT's tree as the first channel
slice of every widened axis, with rescaled leaves multiplied by r. Autodiff through the slice puts the
student's gradient (×r on rescaled leaves) into copy 0 of each tensor and nothing elsewhere.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpd_jax.transforms.spec import (STATS_COLLECTIONS, ExpansionSpec, check_ratio,
                                     check_variables_match, derive_spec, flatten, infer_sample_shape,
                                     unflatten)


def _view_spec(dt_model: nn.Module, dt_params, spec, sample_input, argument):
  ratio = check_ratio(getattr(dt_model, "ratio", None))
  view_model = dt_model.clone(ratio=1)
  if spec is not None:
    return ratio, view_model, spec
  if sample_input is not None:
    sample_shape = tuple(jnp.shape(sample_input))
  else:
    sample_shape = infer_sample_shape(dt_model, dt_params, argument=argument)
  check_variables_match(dt_model, dt_params, sample_shape, argument=argument,
                        ignore_collections=STATS_COLLECTIONS)
  return ratio, view_model, derive_spec(view_model, ratio, sample_shape)


def student_view(dt_model: nn.Module, dt_params, *, spec: ExpansionSpec | None = None,
                 sample_input: jax.Array | None = None):
  """Reads the training-time student out of the DT (``extract`` in the spec).

  Args:
    dt_model: the DT module (``ratio`` = r >= 2, any ``branches`` setting).
    dt_params: the DT's variables without statistics: ``{'params': ...}`` plus ``'consts'`` when the DT
      has OREPA branches. A ``'batch_stats'`` entry, if present, is ignored: the student keeps its own.
  Returns:
    (view_model, view_params): ``view_model = dt_model.clone(ratio=1)`` (multi-branch when the DT is),
    applied as ``view_model.apply({**view_params, 'batch_stats': student_batch_stats}, x, train=...)``.
    Differentiable w.r.t. ``dt_params``.
  """
  dt_params = {c: v for c, v in dt_params.items() if c not in STATS_COLLECTIONS}
  ratio, view_model, spec = _view_spec(dt_model, dt_params, spec, sample_input, "dt_params")
  out = {}
  for key, leaf in flatten(dt_params).items():
    rule = spec.leaves[key]
    x = leaf
    for axis in rule.tiled_axes:
      x = jax.lax.slice_in_dim(x, 0, x.shape[axis] // ratio, axis=axis)
    out[key] = x * ratio if rule.rescale else x
  return view_model, unflatten(out)
