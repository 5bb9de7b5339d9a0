"""Gap curves of a GPD run from its metrics: static teacher, DT and student accuracy per epoch, and
the DT − student gap.

    python launch/plot_gap.py --workdir=runs/fm_experiment/dkd_gpd_seed0 \
        --baseline=runs/fm_experiment/dkd_seed0 --out=docs/gap_curves.png

``--baseline`` (optional) adds the student of a run without GPD for comparison. In Python (e.g. the
notebook): ``plot_gap(workdir, baseline=...)`` returns the matplotlib ``Figure``.
"""
import argparse

from matplotlib.figure import Figure

from gpd_jax.metric_writer import read_metrics


def plot_gap(workdir: str, *, baseline: str = "", split: str = "val") -> Figure:
  """Two panels: top-1 per epoch (static teacher, DT, student[, baseline student]) and the gaps.

  Raises:
    ValueError: ``workdir`` has no ``eval/<split>`` records of a GPD run (no ``top1_D``).
  """
  records = read_metrics(workdir, f"eval/{split}")
  if not records or "top1_D" not in records[0]:
    raise ValueError(f"workdir {workdir!r} has no eval/{split} records of a GPD run (top1_D); plot a "
                     "run with config.gpd.enabled=True, or pick --split from its eval splits")
  epochs = [r["epoch"] for r in records]
  fig = Figure(figsize=(11, 4))  # no pyplot: no global figure state, no backend to select
  ax_acc, ax_gap = fig.subplots(1, 2)
  if "top1_T" in records[0]:
    ax_acc.plot(epochs, [r["top1_T"] for r in records], "k--", label="static teacher")
  ax_acc.plot(epochs, [r["top1_D"] for r in records], "C1-o", label="dynamic teacher")
  ax_acc.plot(epochs, [r["top1_S"] for r in records], "C0-o", label="student (GPD)")
  if baseline:
    base = read_metrics(baseline, f"eval/{split}")
    ax_acc.plot([r["epoch"] for r in base], [r["top1_S"] for r in base], "C2-s",
                label="student (baseline)")
  ax_acc.set(xlabel="epoch", ylabel=f"{split} top-1 (%)", title="accuracy")
  ax_acc.legend()
  ax_gap.plot(epochs, [r["top1_D"] - r["top1_S"] for r in records], "C3-o", label="DT − student")
  if "top1_T" in records[0]:
    ax_gap.plot(epochs, [r["top1_T"] - r["top1_S"] for r in records], "k--",
                label="static teacher − student")
  ax_gap.axhline(0, color="grey", lw=0.5)
  ax_gap.set(xlabel="epoch", ylabel="top-1 gap (points)", title="gap")
  ax_gap.legend()
  fig.tight_layout()
  return fig


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="the workdir of a GPD run")
  p.add_argument("--baseline", default="", help="optional: the workdir of a run without GPD")
  p.add_argument("--split", default="val", help="the eval split to plot (a key of eval_splits)")
  p.add_argument("--out", required=True, help="the image file to write (.png, .pdf, .svg)")
  args = p.parse_args()
  try:
    fig = plot_gap(args.workdir, baseline=args.baseline, split=args.split)
  except ValueError as e:
    p.error(f"--workdir: {e}")
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
