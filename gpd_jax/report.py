"""The end of a run, in words: a table of top-1 accuracies, where the exports are, how to load one."""
from __future__ import annotations

# (metric suffix, row label); a row appears when any split has its top-1.
NETWORKS = (("S", "student"), ("S_ema", "student (EMA)"), ("D", "dynamic teacher"),
            ("D_ema", "dynamic teacher (EMA)"), ("T", "static teacher"))


def accuracy_table(results: dict[str, dict[str, float]]) -> list[str]:
  """Rows of top-1 (%) per network (student, EMA, DT, static teacher) and split.

  Args:
    results: ``{split label: metrics}``, e.g. ``{'val': {...}, 'test': {...}}``, where metrics hold
      ``top1_S``, ``top1_D``, ``top1_T``, ``top1_S_ema`` … as produced by the eval step.
  Returns:
    the table as lines of text (empty when there are no results).
  """
  columns = [label for label, metrics in results.items() if metrics]
  rows = [(suffix, name) for suffix, name in NETWORKS
          if any(f"top1_{suffix}" in results[c] for c in columns)]
  if not columns or not rows:
    return []
  width = max(len(name) for _, name in rows)
  lines = [" " * width + "".join(f"  {c + ' top-1':>12}" for c in columns)]
  for suffix, name in rows:
    cells = []
    for c in columns:
      value = results[c].get(f"top1_{suffix}")
      cells.append(f"  {'—' if value is None else f'{value:.2f}':>12}")
    lines.append(f"{name:<{width}}" + "".join(cells))
  return lines


def load_snippet(export_dir: str) -> list[str]:
  """Two lines of Python that load an export and classify a batch of NHWC images."""
  return [f"module, variables, info = gpd_jax.checkpoint.load_export({export_dir!r})",
          "logits = module.apply(variables, images, train=False)  # images: float32 [N, H, W, C]"]


def end_of_run(*, step: int, epoch: float, seconds: float | None, results: dict,
               best: tuple[str, float, int] | None, exports: dict[str, str]) -> str:
  """The message printed when a run ends.

  Args:
    step, epoch: where the run ended.
    seconds: the wall time of the training loop in this invocation, or None.
    results: ``{split label: metrics}`` of the final evaluation (see :func:`accuracy_table`).
    best: ``(metric, value, step)`` of the model selection, or None.
    exports: ``{what: directory}`` of the exports written, e.g. ``{'last': ..., 'best': ...}``.
  """
  from gpd_jax.progress import format_duration  # local: progress imports jax
  took = f"; training took {format_duration(seconds)}" if seconds is not None else ""
  lines = [f"gpd_jax: done at step {step} (epoch {epoch:.2f}){took}."]
  table = accuracy_table(results)
  if table:
    lines += [""] + table
  if best is not None:
    metric, value, at_step = best
    lines += ["", f"model selection: best {metric} = {value:.2f} at step {at_step}"]
  if exports:
    lines += ["", "exports (plain student, no GPD parts left):"]
    lines += [f"  {what:<5} {path}" for what, path in exports.items()]
    main_export = exports.get("best") or next(iter(exports.values()))
    lines += ["", "load the student in Python:", "  import gpd_jax.checkpoint"]
    lines += ["  " + line for line in load_snippet(main_export)]
  return "\n".join(lines)
