"""Learning-rate schedules and optimizers from the config, built from optax pieces.

Config fields (``config.schedule`` and ``config.optim``)::

  schedule.name          'step' | 'cosine' | 'constant'
  schedule.base_lr       peak learning rate
  schedule.warmup_epochs linear warm-up from ``warmup_init_lr`` (0 = none)
  schedule.warmup_init_lr the warm-up's first learning rate (default 0; timm's ViT recipes: 1e-6)
  schedule.cooldown_epochs 'cosine': the last epochs held at ``min_lr`` (timm's cool-down; default 0)
  schedule.boundaries    'step': epochs at which the LR is multiplied by ``decay_factor``
  schedule.decay_factor  'step': e.g. 0.1
  schedule.min_lr        'cosine': final learning rate
  optim.name             'sgd' | 'adamw'
  optim.momentum, optim.nesterov            (sgd)
  optim.b1, optim.b2, optim.eps             (adamw)
  optim.weight_decay     coupled (sgd: g + wd·θ, as torch.optim.SGD) or decoupled (adamw)
  optim.no_decay_regex   leaves whose path matches are not decayed ('' = decay all, the GPD CNN recipe)
  optim.clip_norm        clip the gradient's global L2 norm before anything else (0 = off)

Schedules are functions of the optimizer step; epochs are converted with ``steps_per_epoch``.
"""
from __future__ import annotations

import re

import jax
import optax

from gpd_jax.transforms.spec import leaf_key

SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")


def make_schedule(schedule_config, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step (``config.schedule``)."""
  c = schedule_config
  if c.name not in SCHEDULES:
    raise ValueError(f"config.schedule.name={c.name!r} is unknown; choose one of {SCHEDULES}")
  warmup = int(round(c.get("warmup_epochs", 0) * steps_per_epoch))
  if c.name == "step":
    boundaries = {int(round(e * steps_per_epoch)) - warmup: c.decay_factor for e in c.boundaries}
    if any(b <= 0 for b in boundaries):
      raise ValueError("config.schedule.boundaries must lie after the warm-up epochs, "
                       f"got {tuple(c.boundaries)} with warmup_epochs={c.get('warmup_epochs', 0)}")
    main = optax.piecewise_constant_schedule(c.base_lr, boundaries)
  elif c.name == "cosine":
    # After its decay steps optax's cosine holds alpha·base_lr = min_lr: that is the cool-down.
    cooldown = int(round(c.get("cooldown_epochs", 0) * steps_per_epoch))
    main = optax.cosine_decay_schedule(c.base_lr, max(total_steps - warmup - cooldown, 1),
                                       alpha=c.get("min_lr", 0.0) / c.base_lr)
  else:
    main = optax.constant_schedule(c.base_lr)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(c.get("warmup_init_lr", 0.0), c.base_lr, warmup), main], [warmup])


def decay_mask(params, no_decay_regex: str):
  """True for the leaves that get weight decay (path not matching ``no_decay_regex``)."""
  if not no_decay_regex:
    return jax.tree.map(lambda _: True, params)
  pattern = re.compile(no_decay_regex)
  return jax.tree_util.tree_map_with_path(lambda p, _: not pattern.search(leaf_key(p)), params)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """clip → (coupled decay → SGD-momentum) or AdamW, per ``config.optim``."""
  c = optim_config
  if c.name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name={c.name!r} is unknown; choose one of {OPTIMIZERS}")
  mask = lambda params: decay_mask(params, c.get("no_decay_regex", ""))
  parts = []
  if c.get("clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  if c.name == "sgd":
    if c.weight_decay:
      parts.append(optax.add_decayed_weights(c.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=c.momentum or None, nesterov=c.get("nesterov", False)))
  else:
    parts.append(optax.adamw(schedule, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999),
                             eps=c.get("eps", 1e-8), weight_decay=c.weight_decay, mask=mask))
  return optax.chain(*parts)
