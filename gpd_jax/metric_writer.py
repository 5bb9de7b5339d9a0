"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and a JSON-lines file.

Every record is one line of ``<workdir>/metrics.jsonl``::

  {"step": 120, "kind": "train", "epoch": 2.0, "ce_S": 0.71, "lr": 0.05, ...}

and one scalar per value under ``<kind>/<name>`` in ``<workdir>/tensorboard``.
"""
from __future__ import annotations

import json
import math
import os

import tensorboardX


class MetricWriter:
  """Writes scalars; a no-op when ``enabled`` is False (processes other than 0)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, kind: str, scalars: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "kind": kind,
              **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(f"{kind}/{name}", value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl`` (optionally of one ``kind``), sorted by step.

  A run that resumed from an earlier checkpoint logs some steps twice; the later record wins.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  latest = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        latest[(record["kind"], record["step"])] = record
  return sorted((r for r in latest.values() if kind is None or r["kind"] == kind),
                key=lambda r: r["step"])
