"""Gap curves of a GPD run from its metrics: static teacher, DT and student accuracy per epoch, and
the DT − student gap.

    python launch/plot_gap.py --workdir=runs/fm_experiment/dkd_gpd_seed0 \
        --baseline=runs/fm_experiment/dkd_seed0 --out=docs/gap_curves.png

``--baseline`` (optional) adds the student of a run without GPD for comparison.
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gpd_jax.metric_writer import read_metrics  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--baseline", default="")
  p.add_argument("--split", default="val")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  records = read_metrics(args.workdir, f"eval/{args.split}")
  if not records or "top1_D" not in records[0]:
    p.error(f"--workdir: {args.workdir} has no eval/{args.split} records of a GPD run")
  epochs = [r["epoch"] for r in records]
  fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
  if "top1_T" in records[0]:
    ax_acc.plot(epochs, [r["top1_T"] for r in records], "k--", label="static teacher")
  ax_acc.plot(epochs, [r["top1_D"] for r in records], "C1-o", label="dynamic teacher")
  ax_acc.plot(epochs, [r["top1_S"] for r in records], "C0-o", label="student (GPD)")
  if args.baseline:
    base = read_metrics(args.baseline, f"eval/{args.split}")
    ax_acc.plot([r["epoch"] for r in base], [r["top1_S"] for r in base], "C2-s",
                label="student (baseline)")
  ax_acc.set(xlabel="epoch", ylabel=f"{args.split} top-1 (%)", title="accuracy")
  ax_acc.legend()
  ax_gap.plot(epochs, [r["top1_D"] - r["top1_S"] for r in records], "C3-o", label="DT − student")
  if "top1_T" in records[0]:
    ax_gap.plot(epochs, [r["top1_T"] - r["top1_S"] for r in records], "k--",
                label="static teacher − student")
  ax_gap.axhline(0, color="grey", lw=0.5)
  ax_gap.set(xlabel="epoch", ylabel="top-1 gap (points)", title="gap")
  ax_gap.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
