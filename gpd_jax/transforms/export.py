"""CBR: exports the deployable plain student from a trained DT (``docs/method.md`` §6).

Channel step: the student view (slice + rescale of every factor). Branch step: each OREPA block merges
its own sliced factors into one 3×3 kernel. The result has the plain student's architecture, the module
that ``models.create`` returns, and needs no post-training.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from gpd_jax.models.layers import OrepaConv, merge_orepa_kernel
from gpd_jax.transforms.spec import (ExpansionSpec, check_variables_match, flatten,
                                     infer_sample_shape, unflatten)
from gpd_jax.transforms.view import _view_spec, student_view


def merge_branches(view_model: nn.Module, view_variables, *, spec: ExpansionSpec):
  """Merges every OREPA block of a branched student into a plain conv kernel.

  Returns:
    (plain_model, plain_params) where plain_params has the ``params`` collection only.
  """
  params = flatten({"params": view_variables["params"]})
  consts = flatten({"consts": view_variables.get("consts", {})})
  for block, depthwise in spec.branch_blocks.items():
    factors = {f: params.pop(f"params/{block}/{f}") for f in OrepaConv.FACTORS
               if f"params/{block}/{f}" in params}
    block_consts = {c: consts[f"consts/{block}/{c}"] for c in ("prior", "identity")}
    params[f"params/{block}/kernel"] = merge_orepa_kernel(factors, block_consts, depthwise=depthwise)
    if "bias" in factors:
      params[f"params/{block}/bias"] = factors["bias"]
  plain_model = view_model.clone(branches=False) if spec.branch_blocks else view_model
  return plain_model, unflatten(params)


def export_student(dt_model: nn.Module, dt_variables, student_batch_stats, *,
                   spec: ExpansionSpec | None = None, sample_input: jax.Array | None = None):
  """DT variables -> the plain student (CBR).

  Args:
    dt_model: the DT module.
    dt_variables: the DT's variables (``params``, ``consts`` when branched; ``batch_stats`` is ignored).
    student_batch_stats: the student's own BN running statistics (``batch_stats_S``).
  Returns:
    (plain_model, plain_variables) with ``plain_model`` the plain student module (ratio 1, no branches)
    and ``plain_variables = {'params': ..., 'batch_stats': student_batch_stats}``. In eval mode its
    logits equal the training-time view's.
  """
  dt_params = {c: v for c, v in dt_variables.items() if c != "batch_stats"}
  _, _, view_spec = _view_spec(dt_model, dt_params, spec, sample_input, "dt_variables")
  view_model, view_params = student_view(dt_model, dt_params, spec=view_spec)
  plain_model, plain_params = merge_branches(view_model, view_params, spec=view_spec)
  plain_variables = {**plain_params, "batch_stats": student_batch_stats}
  shape = (tuple(sample_input.shape) if sample_input is not None else
           infer_sample_shape(plain_model, plain_variables))
  check_variables_match(plain_model, plain_variables, shape, argument="student_batch_stats")
  return plain_model, plain_variables
