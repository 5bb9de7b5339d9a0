"""What the small-scale protocols (``launch/*_experiment.py``) share: training a run once, reading a
finished run's accuracies, and the mean ± std table over seeds.

A protocol is a set of ordinary, resumable workdirs under one root (``<root>/<method>_seed<k>``,
``<root>/teacher``); a rerun skips what has finished. The summary (``<root>/summary.json``) is
written after every run, so an interrupted protocol still leaves the finished runs' numbers.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from gpd_jax.metric_writer import read_metrics
from gpd_jax.train import train_and_evaluate

# The columns of every protocol table: the student's last and best validation top-1, and the test
# top-1 of the final weights (evaluated once, at the end).
COLUMNS = ("last_val", "best_val", "test")


def is_finished(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "export", "model.json"))


def train_once(config, workdir: str, timings: dict, name: str) -> None:
  """Trains ``config`` in ``workdir`` unless it has finished there; records the wall time in
  ``timings[name]`` when it trained."""
  if is_finished(workdir):
    return
  start = time.time()
  train_and_evaluate(config, workdir)
  timings[name] = time.time() - start


def summarize(workdir: str) -> dict:
  """A finished run's student accuracies (``COLUMNS``), and at test the static teacher's
  (``test_teacher``) and the DT's (``test_dt``) where they exist (NaN otherwise)."""
  val = read_metrics(workdir, "eval/val")
  test = read_metrics(workdir, "test/test")
  last_test = test[-1] if test else {}
  return {"last_val": val[-1]["top1_S"], "best_val": max(r["top1_S"] for r in val),
          "test": last_test.get("top1_S", float("nan")),
          "test_teacher": last_test.get("top1_T", float("nan")),
          "test_dt": last_test.get("top1_D", float("nan"))}


def seed_stats(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
  """``{method: {column: (mean, sample std)}}`` over each method's runs (std 0 for one run)."""
  stats = {}
  for method, results in runs.items():
    row = {}
    for key in COLUMNS:
      values = np.array([r[key] for r in results], np.float64)
      row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    stats[method] = row
  return stats


def table(stats: dict, *, reference_rows: dict[str, dict] = None, labels: dict[str, str] = None) -> list[str]:
  """Markdown rows: single runs first (``reference_rows``: ``{label: summarize(...)}``, e.g. the
  teacher), then one row of mean ± std per method (``labels`` may rename a method's row)."""
  rows = ["| method | last val top-1 | best val top-1 | test top-1 (final model) |",
          "|---|---|---|---|"]
  for label, r in (reference_rows or {}).items():
    rows.append(f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in COLUMNS) + " |")
  for method, row in stats.items():
    label = (labels or {}).get(method, method)
    rows.append(f"| {label} | " + " | ".join(f"{row[k][0]:.2f} ± {row[k][1]:.2f}" for k in COLUMNS)
                + " |")
  return rows


def write_summary(root: str, args: dict, runs: dict[str, list[dict]], timings: dict,
                  **extra) -> dict:
  """Writes ``<root>/summary.json``: the arguments, every run, the stats, the wall times and
  ``extra``. Methods (and wall times) an earlier invocation under ``root`` recorded, and this one
  does not, are kept. Returns the stats of all methods."""
  path = os.path.join(root, "summary.json")
  if os.path.isfile(path):
    with open(path) as f:
      earlier = json.load(f)
    runs = {**{m: r for m, r in earlier.get("runs", {}).items() if m not in runs}, **runs}
    timings = {**earlier.get("wall_seconds", {}), **timings}
  stats = seed_stats(runs)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump({"args": args, **extra, "runs": runs, "stats": stats, "wall_seconds": timings}, f,
              indent=2)
  os.replace(tmp, path)
  return stats


def parse_names(parser, flag: str, value: str, allowed) -> list[str]:
  """``value`` split at commas; an unknown name exits through ``parser.error`` naming ``flag``."""
  names = [v for v in value.split(",") if v]
  bad = [n for n in names if n not in allowed]
  if bad or not names:
    parser.error(f"{flag}: unknown {bad or value!r}; choose from {tuple(allowed)}")
  return names


def parse_seeds(parser, value: str) -> list[int]:
  try:
    return [int(s) for s in value.split(",")]
  except ValueError:
    parser.error(f"--seeds: {value!r} is not a comma-separated list of integers, e.g. 0,1,2")
