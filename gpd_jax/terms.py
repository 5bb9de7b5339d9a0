"""Objective terms between named networks, written in the config as short strings.

A run's networks are named: ``student`` (the trained network, or GPD's student view), ``dt`` (GPD's
dynamic teacher), ``teacher`` (the static teacher), each online peer by its key in
``config.online.peers`` (a GPD peer ``p`` also gives ``p_dt``), and each extra frozen teacher by its
key in ``config.online.teachers``. ``config.online.terms`` adds to the base objective (CE/KD/GPD of
``gpd_jax.objective``) a sum of terms, each ``[weight*]loss(target)`` or ``[weight*]loss(target<-a,b)``:

    ce(peer)                  CE(z_peer, y)
    kd(student<-teacher_2)    T²·KL(sg(p_teacher_2) ‖ p_student)         (online.temperature)
    dml(student<-peer)        DML peer term: mean over the sources of the KD term, T = online.temperature
    dml(student<->peer)       both directions: dml(student<-peer) + dml(peer<-student)
    reverse_kl(peer<-student) T²·KL(p_peer ‖ sg(p_student))
    bdkd(student<-peer)       BD-KD's entropy-gated forward + reverse KL (online.bdkd_gain)
    camkd(student<-t1,t2)     CA-MKD: label-confidence-weighted KD over >= 2 teachers (online.camkd_temperature)
    sce(peer<-peer_dt)        GPD's smoothed soft-target CE (gpd.sce_smoothing)

The sources are always behind ``stop_gradient``: a network receives exactly the gradient of the
terms it is the target of. Each term is logged under ``<loss>_<target>`` or
``<loss>_<target>_from_<sources>`` (unweighted batch mean).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax.numpy as jnp

from gpd_jax import losses, online_losses

__all__ = ["Term", "parse_terms", "make_terms_objective", "LOSSES"]

LOSSES = ("ce", "kd", "dml", "reverse_kl", "bdkd", "camkd", "sce")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TERM = re.compile(rf"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<loss>{_NAME})\s*\(\s*(?P<target>{_NAME})\s*"
                   rf"(?:(?P<arrow><->|<-)\s*(?P<sources>{_NAME}(?:\s*,\s*{_NAME})*))?\s*\)\s*$")


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss of ``target`` towards ``sources`` (empty for label-only losses)."""
  loss: str
  target: str
  sources: tuple[str, ...]
  weight: float

  @property
  def key(self) -> str:
    return f"{self.loss}_{self.target}" + (f"_from_{'_'.join(self.sources)}" if self.sources else "")


def parse_terms(specs, networks, *, field: str = "config.online.terms") -> tuple[Term, ...]:
  """Parses the term strings and checks each loss and network name against ``networks``."""
  if isinstance(specs, str):
    raise ValueError(f"{field} must be a list of strings like 'dml(student<->peer)', got one string")
  networks = tuple(networks)
  parsed = []
  for spec in specs:
    match = _TERM.match(str(spec))
    if not match:
      raise ValueError(f"{field}: cannot read {spec!r}; write '[weight*]loss(target)' or "
                       "'[weight*]loss(target<-source[,source...])', e.g. '0.5*kd(student<-peer)'")
    loss, target = match["loss"], match["target"]
    sources = tuple(s.strip() for s in match["sources"].split(",")) if match["sources"] else ()
    try:
      weight = float(match["w"]) if match["w"] else 1.0
    except ValueError:
      raise ValueError(f"{field}: the weight of {spec!r} is not a number") from None
    if loss not in LOSSES:
      raise ValueError(f"{field}: unknown loss {loss!r} in {spec!r}; choose one of {LOSSES}")
    for name in (target, *sources):
      if name not in networks:
        raise ValueError(f"{field}: {spec!r} names the network {name!r}, but this run has "
                         f"{networks}; add it to config.online.peers or config.online.teachers")
    if (loss == "ce") != (not sources):
      raise ValueError(f"{field}: {spec!r}: 'ce' takes only a target, every other loss a "
                       "'target<-source'")
    if target in sources:
      raise ValueError(f"{field}: {spec!r} distils {target!r} from itself")
    if loss == "camkd" and len(sources) < 2:
      raise ValueError(f"{field}: {spec!r}: camkd needs >= 2 teachers after '<-'")
    if loss not in ("dml", "camkd") and len(sources) > 1:
      raise ValueError(f"{field}: {spec!r}: {loss!r} takes one source")
    if match["arrow"] == "<->":
      if loss != "dml" or len(sources) != 1:
        raise ValueError(f"{field}: {spec!r}: '<->' is for two-network dml only")
      parsed += [Term(loss, target, sources, weight), Term(loss, sources[0], (target,), weight)]
    else:
      parsed.append(Term(loss, target, sources, weight))
  keys = [t.key for t in parsed]
  duplicates = sorted({k for k in keys if keys.count(k) > 1})
  if duplicates:
    raise ValueError(f"{field}: the terms {duplicates} appear more than once; merge their weights")
  return tuple(parsed)


def _per_example_loss(term: Term, online_config, sce_smoothing: float,
                      label_smoothing: float) -> Callable:
  """``fn(logits: dict[name, [B, K]], labels [B]) -> [B]`` for one term."""
  temperature = float(online_config.get("temperature", 1.0))
  t, src = term.target, term.sources
  if term.loss == "ce":
    return lambda z, y: losses.cross_entropy(z[t], y, label_smoothing=label_smoothing)
  if term.loss == "kd":
    return lambda z, y: losses.kd(z[t], z[src[0]], temperature=temperature)
  if term.loss == "dml":
    return lambda z, y: online_losses.mutual_kl(z[t], [z[s] for s in src], temperature=temperature)
  if term.loss == "reverse_kl":
    return lambda z, y: online_losses.reverse_kl(z[t], z[src[0]], temperature=temperature)
  if term.loss == "bdkd":
    gain = float(online_config.get("bdkd_gain", 2.0))
    return lambda z, y: online_losses.balanced_kl(z[t], z[src[0]], temperature=temperature, gain=gain)
  if term.loss == "camkd":
    camkd_t = float(online_config.get("camkd_temperature", 4.0))
    return lambda z, y: online_losses.multi_teacher_kd(z[t], [z[s] for s in src], y,
                                                       temperature=camkd_t)
  assert term.loss == "sce", term.loss
  return lambda z, y: losses.gpd_sce(z[t], z[src[0]], smoothing=sce_smoothing)


def make_terms_objective(terms: tuple[Term, ...], online_config, *, sce_smoothing: float = 0.1,
                         label_smoothing: float = 0.0):
  """``objective(logits, labels) -> (total, metrics)``: the weighted sum of ``terms``.

  ``logits``: dict name -> ``[B, K]``; ``labels``: ``[B]``. ``metrics``: each term's unweighted
  batch mean under ``Term.key``, and ``acc_<target>`` for every target that is not ``student``
  or ``dt`` (those are logged by the base objective). With no terms the total is 0.
  """
  fns = [(term, _per_example_loss(term, online_config, sce_smoothing, label_smoothing))
         for term in terms]
  extra_targets = sorted({t.target for t in terms} - {"student", "dt"})

  def objective(logits, labels):
    total, metrics = jnp.zeros((), jnp.float32), {}
    for term, fn in fns:
      metrics[term.key] = jnp.mean(fn(logits, labels))
      total = total + term.weight * metrics[term.key]
    for name in extra_targets:
      metrics[f"acc_{name}"] = jnp.mean(losses.top_k_correct(logits[name], labels, 1))
    return total, metrics

  return objective
