"""Feature distillation in the trainer: ReviewKD, SP, FitNets and CRD as objectives over feature taps.

``make_feature_objective(config, ...)`` turns ``config.features`` into a :class:`FeatureObjective`, the
object the train step calls next to the logits objective (``Task.feature_objective``). The interface
any feature objective follows (the step relies on nothing else):

* ``init(rng) -> (connectors, feature_state)``: ``connectors`` is ``{'params', 'batch_stats'}`` of the
  trainable connector modules (or None when the method has none); ``feature_state`` is non-trainable,
  checkpointed state (CRD's memory banks) or None. Pure, traceable (``init_state`` calls it under
  ``jax.jit``).
* ``__call__(features, labels, *, step, connectors, feature_state, batch)
  -> (total, terms, new_connector_batch_stats, new_feature_state)``, where ``features`` is
  ``{name: Features}`` for every network of the step (``'student'``, ``'dt'`` with GPD, ``'teacher'``,
  peers), ``labels`` [B], ``step`` the (traced) optimizer step, ``batch`` the whole batch (CRD reads
  ``batch['index']``), ``total`` the weighted scalar to add to the loss and ``terms`` unweighted
  scalars to log.

Which network gets the term (``docs/feature_kd.md`` §4): the student always (its own connector), and
with GPD the DT too (a second, independently initialised connector), exactly as GPD's reference
combines ReviewKD with GPD; ``gpd.student_uses_static_kd`` / ``gpd.dt_uses_static_kd`` drop either,
as they drop the logit KD term. The teacher's features are behind ``stop_gradient``, so no gradient
reaches it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax import feature_losses as fl

__all__ = ["METHODS", "FeatureObjective", "make_feature_objective", "feature_shapes",
           "feature_warmup_steps"]

METHODS = ("reviewkd", "sp", "fitnet", "crd")
# Names of the networks a feature term can train, and their metric suffixes.
_SUFFIX = {"student": "S", "dt": "D"}


def feature_shapes(module: nn.Module, sample_shape) -> Any:
  """The ``Features`` of ``module`` on a [1, S, S, C] input, as ``jax.ShapeDtypeStruct`` leaves
  (traced only: nothing is computed)."""
  if not hasattr(module, "return_features"):
    raise ValueError(f"config.features: the model {type(module).__name__} has no feature taps "
                     "('return_features' field); feature methods need a ResNet, WRN or MobileNet")
  tapped = module.clone(return_features=True)

  def taps(x):
    (_, features), _ = tapped.init_with_output(jax.random.key(0), x, train=False)
    return features

  return jax.eval_shape(taps, jax.ShapeDtypeStruct(tuple(sample_shape), jnp.float32))


def feature_warmup_steps(features_config, steps_per_epoch: int | None) -> int:
  """The linear warm-up of the feature weight in steps (``features.warmup_epochs`` × steps/epoch)."""
  epochs = float(features_config.get("warmup_epochs", 0.0) or 0.0)
  if epochs < 0:
    raise ValueError(f"config.features.warmup_epochs must be >= 0, got {epochs}")
  if epochs == 0:
    return 0
  if not steps_per_epoch:
    raise ValueError("config.features.warmup_epochs needs the run's steps per epoch")
  return max(1, int(round(epochs * int(steps_per_epoch))))


# CRD's memory banks (``state.feature_state[<network>].memory_{student,teacher}``, [N, D]).
CRD_MEMORY_PATTERN = r"feature_state/[^/]+/\.?memory_(student|teacher)$"


def state_sharding_rules(features_config, batch_axes: tuple[str, ...], num_batch_shards: int) -> tuple:
  """Built-in ``mesh.param_rules`` for the feature objective's state (appended after the user's).

  CRD's two memory banks are [N, D] per network (N = training examples): replicated they cost
  2 · N · D · 4 bytes on every device (ImageNet, D = 128: 1.3 GB). They are split over their
  embedding columns across the batch axes instead: a row gather then stays on each device, and a
  device holds N · D / shards. When D does not divide evenly they stay replicated.
  """
  if not features_config or features_config.get("method", "") != "crd" or num_batch_shards <= 1:
    return ()
  if int(features_config.crd.feature_dim) % num_batch_shards:
    return ()
  return ((CRD_MEMORY_PATTERN, (None, tuple(batch_axes))),)


class CRDHeads(nn.Module):
  """CRD's two trainable embeddings of one student-side network: its own and the teacher's."""
  features: int = 128

  @nn.compact
  def __call__(self, student_feature, teacher_feature):
    """[B, C_s], [B, C_t] -> ([B, D], [B, D]) unit embeddings."""
    return (fl.CRDEmbed(self.features, name="embed_student")(student_feature),
            fl.CRDEmbed(self.features, name="embed_teacher")(teacher_feature))


def _zeros(shape_struct):
  return jnp.zeros(shape_struct.shape, jnp.float32)


def _level_shapes(features, *, preact: bool) -> tuple:
  """:func:`feature_losses.review_levels` on ``ShapeDtypeStruct`` taps."""
  stages = features.preact_stages if preact else features.stages
  b, c = features.pooled.shape
  return (*stages, jax.ShapeDtypeStruct((b, 1, 1, c), features.pooled.dtype))


def _hint(features, layer: int):
  """FitNets' hint: ``[stem, stage_1, ..., stage_N][layer]`` (mdistiller's ``HINT_LAYER``)."""
  return (features.stem, *features.stages)[layer]


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureObjective:
  """One feature-distillation method between the static teacher and the trained network(s).

  Attributes:
    method: one of :data:`METHODS`.
    targets: the networks that get the term, e.g. ``('student', 'dt')``.
    weight: the term's weight (``features.weight``).
    warmup_steps: linear ramp of the weight, ``min(step / warmup_steps, 1)`` (0 = none).
    connectors: ``{target: module}`` of the trainable connectors (empty for SP).
    connector_inputs: ``{target: input shapes}`` (``ShapeDtypeStruct`` tuples) for the connectors' init.
    options: the method's static options (dict).
    class_index: CRD's :class:`feature_losses.CRDClassIndex` of the training labels, else None.
    num_data: CRD's memory size (training examples), else 0.
    seed: CRD's negative-sampling seed (folded with the step).
  """
  method: str
  targets: tuple[str, ...]
  weight: float
  warmup_steps: int
  connectors: dict
  connector_inputs: dict
  options: dict
  class_index: Any = None
  num_data: int = 0
  seed: int = 0

  # -- state ----------------------------------------------------------------------------------
  def init(self, rng):
    """``(connectors, feature_state)``: connectors from independent keys (one per target)."""
    connectors = None
    if self.connectors:
      params, stats = {}, {}
      for i, target in enumerate(self.targets):
        sample = jax.tree.map(_zeros, self.connector_inputs[target])
        variables = self.connectors[target].init(jax.random.fold_in(rng, i), *sample,
                                                 **self._train_kw(False))
        params[target] = variables["params"]
        stats[target] = variables.get("batch_stats", {})
      connectors = {"params": params, "batch_stats": stats}
    feature_state = None
    if self.method == "crd":
      dim = int(self.options["feature_dim"])
      feature_state = {t: fl.crd_init_state(jax.random.fold_in(rng, 100 + i), self.num_data, dim)
                       for i, t in enumerate(self.targets)}
    return connectors, feature_state

  def _train_kw(self, train: bool) -> dict:
    return {} if self.method == "crd" else {"train": train}

  # -- the loss -------------------------------------------------------------------------------
  def _apply(self, target, connectors, *inputs):
    """Train-mode connector output and its new BN statistics."""
    variables = {"params": connectors["params"][target]}
    stats = connectors["batch_stats"][target]
    if stats:
      variables["batch_stats"] = stats
      out, updates = self.connectors[target].apply(variables, *inputs, mutable=["batch_stats"],
                                                   **self._train_kw(True))
      return out, updates["batch_stats"]
    return self.connectors[target].apply(variables, *inputs, **self._train_kw(True)), stats

  def __call__(self, features, labels, *, step, connectors, feature_state, batch):
    if "teacher" not in features:
      raise ValueError("config.features needs the static teacher's features (config.teacher)")
    teacher = features["teacher"]
    scale = self.weight
    if self.warmup_steps:
      scale = scale * jnp.minimum(jnp.asarray(step, jnp.float32) / self.warmup_steps, 1.0)
    total, terms = jnp.zeros((), jnp.float32), {}
    new_stats = None if connectors is None else dict(connectors["batch_stats"])
    new_state = None if feature_state is None else dict(feature_state)
    opts = self.options
    for i, target in enumerate(self.targets):
      own = features[target]
      key = f"{self.method}_{_SUFFIX[target]}"
      if self.method == "reviewkd":
        levels = fl.review_levels(own, preact=opts["student_preact"])
        fused, new_stats[target] = self._apply(target, connectors, levels)
        value = fl.hcl_loss(fused, fl.review_levels(teacher, preact=True),
                            pool_sizes=opts["pool_sizes"])
      elif self.method == "sp":
        value = fl.sp_loss(own.stages[-1], teacher.stages[-1], groups=opts["groups"])
      elif self.method == "fitnet":
        layer = opts["hint_layer"]
        regressed, new_stats[target] = self._apply(target, connectors, _hint(own, layer))
        value = fl.fitnet_hint_loss(regressed, _hint(teacher, layer))
      else:  # crd
        if "index" not in batch:
          raise ValueError("config.features.method='crd' needs each example's dataset index "
                           "(batch['index']); the train pipeline adds it when the method is crd")
        (e_s, e_t), _ = self._apply(target, connectors, own.pooled,
                                    jax.lax.stop_gradient(teacher.pooled))
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), i)
        contrast = fl.crd_contrast_indices(rng, batch["index"], labels, self.class_index,
                                           int(opts["num_negatives"]))
        value, new_state[target] = fl.crd_loss(
            e_s, e_t, feature_state[target], batch["index"], contrast,
            temperature=float(opts["temperature"]), momentum=float(opts["momentum"]))
      terms[key] = value
      total = total + scale * value
    return total, terms, new_stats, new_state


def make_feature_objective(features_config, *, targets: tuple[str, ...], shapes: dict,
                           steps_per_epoch: int | None = None, train_labels=None,
                           num_classes: int | None = None, seed: int = 0) -> FeatureObjective:
  """The :class:`FeatureObjective` of ``config.features``.

  Args:
    features_config: ``config.features`` (``method``, ``weight``, ``warmup_epochs`` and the method's
      sub-config ``reviewkd`` / ``sp`` / ``fitnet`` / ``crd``).
    targets: the trained networks that get the term (``'student'``, ``'dt'``).
    shapes: ``{name: Features of ShapeDtypeStructs}`` for every target and ``'teacher'``
      (:func:`feature_shapes`).
    train_labels: CRD only: [N] labels of the training split in dataset-index order.
  """
  c = features_config
  method = c.method
  if method not in METHODS:
    raise ValueError(f"config.features.method={method!r} is unknown; choose '' (off) or one of {METHODS}")
  weight = float(c.weight)
  if not weight >= 0:
    raise ValueError(f"config.features.weight must be >= 0, got {c.weight!r}")
  teacher = shapes["teacher"]
  connectors, inputs, options = {}, {}, {}
  class_index, num_data = None, 0
  if method == "reviewkd":
    sub = c.reviewkd
    options = {"student_preact": bool(sub.student_preact),
               "pool_sizes": tuple(int(k) for k in sub.pool_sizes)}
    teacher_levels = _level_shapes(teacher, preact=True)
    out_features = tuple(int(f.shape[-1]) for f in teacher_levels)
    for target in targets:
      levels = _level_shapes(shapes[target], preact=options["student_preact"])
      # mdistiller's default width is read from the student's own deepest level, so the DT's
      # connector gets the same inner width as the student's (the reference's abfs_dual).
      mid = int(sub.mid_features) or fl.reviewkd_mid_features(
          _level_shapes(shapes["student"], preact=True)[-1].shape[-1])
      for i, (s, t) in enumerate(zip(levels, teacher_levels)):
        if s.shape[1:3] != t.shape[1:3]:
          raise ValueError(f"config.features.method='reviewkd': level {i} of {target!r} is "
                           f"{s.shape[1]}×{s.shape[2]} but the teacher's is {t.shape[1]}×{t.shape[2]}; "
                           "ReviewKD needs a teacher with the same stage resolutions")
      connectors[target] = fl.ReviewKDFusion(out_features=out_features, mid_features=mid)
      inputs[target] = (tuple(levels),)
  elif method == "sp":
    groups = int(c.sp.groups)
    if groups < 1:
      raise ValueError(f"config.features.sp.groups must be >= 1, got {groups}")
    options = {"groups": groups}
  elif method == "fitnet":
    layer = int(c.fitnet.hint_layer)
    n = len(teacher.stages) + 1
    if not 0 <= layer < n:
      raise ValueError(f"config.features.fitnet.hint_layer={layer} must index [stem, stage_1.."
                       f"stage_{n - 1}], i.e. lie in [0, {n})")
    options = {"hint_layer": layer}
    target_shape = tuple(int(d) for d in _hint(teacher, layer).shape[1:])
    for target in targets:
      connectors[target] = fl.FitNetRegressor(target_shape=target_shape)
      inputs[target] = (_hint(shapes[target], layer),)
  else:  # crd
    sub = c.crd
    options = {"feature_dim": int(sub.feature_dim), "num_negatives": int(sub.num_negatives),
               "temperature": float(sub.temperature), "momentum": float(sub.momentum)}
    if train_labels is None:
      raise ValueError("config.features.method='crd' needs the training labels (its memory bank "
                       "has one row per training example)")
    train_labels = np.asarray(train_labels)
    class_index = fl.crd_class_index(train_labels, int(num_classes))
    num_data = int(train_labels.shape[0])
    for target in targets:
      connectors[target] = CRDHeads(features=options["feature_dim"])
      inputs[target] = (shapes[target].pooled, teacher.pooled)
  return FeatureObjective(method=method, targets=tuple(targets), weight=weight,
                          warmup_steps=feature_warmup_steps(c, steps_per_epoch),
                          connectors=connectors, connector_inputs=inputs, options=options,
                          class_index=class_index, num_data=num_data, seed=int(seed))
