"""Device mesh and shardings from the config (modern JAX: ``jax.make_mesh`` + ``NamedSharding``).

Config fields::

  mesh.shape        e.g. (-1,): one axis over all devices (-1 = the remaining devices); without a
                    -1, the first prod(shape) devices
  mesh.axes         e.g. ('data',); the batch is sharded over ``mesh.batch_axes``
  mesh.batch_axes   axes the leading batch dimension is split over, default ('data',)
  mesh.param_rules  ((regex, partition-spec tuple), ...): first match wins; unmatched leaves are
                    replicated. E.g. (('params/.*/kernel$', (None, None, None, 'model')),) shards the
                    output channels of every conv kernel over a 'model' axis. The regex is searched in
                    the leaf's path in the train state, so one rule also covers its optimizer moments
                    and its EMA.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gpd_jax.transforms.spec import leaf_key


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The device mesh of ``config.mesh``; -1 in ``shape`` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape, axes = list(mesh_config.shape), tuple(mesh_config.axes)
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape {tuple(shape)} and config.mesh.axes {axes} differ in length")
  if shape.count(-1) > 1:
    raise ValueError("config.mesh.shape may contain at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices) or math.prod(shape) < 1:
    raise ValueError(f"config.mesh.shape {tuple(mesh_config.shape)} does not fit {len(devices)} devices")
  devices = devices[:math.prod(shape)]  # a smaller explicit mesh uses the first devices
  # Auto axes: XLA propagates the shardings given at the jit boundary (make_mesh defaults to
  # Explicit axes, which would ask every reshaping op in the models for an out_sharding).
  return jax.make_mesh(tuple(shape), axes, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def batch_sharding(mesh, mesh_config) -> NamedSharding:
  """Leading (batch) axis split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(tuple(mesh_config.get("batch_axes", ("data",)))))


def num_batch_shards(mesh, mesh_config) -> int:
  return math.prod(mesh.shape[a] for a in mesh_config.get("batch_axes", ("data",)))


def tree_shardings(mesh, tree, param_rules=()):
  """A NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs) from regex rules."""
  rules = [(re.compile(pattern), P(*spec)) for pattern, spec in param_rules]

  def sharding(path, leaf):
    key = leaf_key(path)
    for pattern, spec in rules:
      if pattern.search(key) and len(spec) <= np.ndim(leaf):
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding, tree)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global jax arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
