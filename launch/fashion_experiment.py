"""GPD against its baselines on Fashion-MNIST: one teacher, then CE / KD / DKD / DKD+GPD / GPD-scratch.

    python launch/fashion_experiment.py --root=runs/fm_experiment --seeds=0,1,2 --epochs=4

Protocol: the static teacher (``configs/fashion_mnist_teacher.py``, trained once) and every student
run share one recipe (``gpd_jax.config_base.fashion_mnist_recipe``: SGD 0.05 cosine, batch 128,
pad-crop + flip) and epoch count; model selection on the validation split (last 5k of train), the test
split evaluated once per run, at the end. Each run is an ordinary workdir under ``--root`` (resumable:
rerunning skips finished runs). Writes ``<root>/summary.json`` and prints a markdown table (mean ± std
over seeds of the last-epoch val, best val and final test top-1 of the student).
"""
import argparse
import json
import os
import time

import numpy as np

from gpd_jax import config_base
from gpd_jax.metric_writer import read_metrics
from gpd_jax.train import train_and_evaluate

METHODS = ("ce", "kd", "dkd", "dkd_gpd", "gpd_scratch")


def student_config(args, method, seed):
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=args.epochs)
  c.seed = seed
  c.model.name = args.student
  if args.student_widths:
    c.model.kwargs = {"widths": tuple(int(w) for w in args.student_widths.split(","))}
  c.dataset.num_train_examples = args.num_train_examples or None
  c.log_every_steps = 50
  if method in ("kd", "dkd", "dkd_gpd"):
    c.teacher.name = args.teacher
    c.teacher.workdir = os.path.abspath(os.path.join(args.root, "teacher"))
  if method == "kd":
    c.loss.base = "kd"
    c.loss.ce_weight, c.loss.kd_weight = 0.1, 0.9
    c.loss.kd.temperature = 4.0
  elif method in ("dkd", "dkd_gpd"):
    c.loss.base = "dkd"
    c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, args.dkd_beta, 4.0
  if method in ("dkd_gpd", "gpd_scratch"):
    config_base.gpd_on(c, ratio=args.ratio, branches=not args.no_branches)
  c.optim.clip_norm = 5.0  # GPD's recipe; applied to every method for a like-for-like comparison
  return c


def teacher_config(args):
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=args.teacher_epochs)
  c.model.name = args.teacher
  c.dataset.num_train_examples = args.num_train_examples or None
  c.log_every_steps = 50
  return c


def summarize(workdir):
  val = read_metrics(workdir, "eval/val")
  test = read_metrics(workdir, "test/test")
  return {"last_val": val[-1]["top1_S"], "best_val": max(r["top1_S"] for r in val),
          "test": test[-1]["top1_S"] if test else float("nan"),
          "test_teacher": test[-1].get("top1_T", float("nan")) if test else float("nan"),
          "test_dt": test[-1].get("top1_D", float("nan")) if test else float("nan")}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--epochs", type=float, default=4)
  p.add_argument("--teacher_epochs", type=float, default=8)
  p.add_argument("--teacher", default="resnet20")
  p.add_argument("--student", default="resnet8")
  p.add_argument("--student_widths", default="", help="e.g. 8,8,16,32 for a narrower resnet8")
  p.add_argument("--num_train_examples", type=int, default=0, help="cap on the 55k train images")
  p.add_argument("--ratio", type=int, default=2)
  p.add_argument("--no_branches", action="store_true")
  p.add_argument("--dkd_beta", type=float, default=2.0)
  args = p.parse_args()
  methods = args.methods.split(",")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; choose from {METHODS}")
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.root, exist_ok=True)
  timings = {}

  teacher_dir = os.path.join(args.root, "teacher")
  if not os.path.isfile(os.path.join(teacher_dir, "export", "model.json")):  # trained once, shared
    t = time.time()
    train_and_evaluate(teacher_config(args), teacher_dir)
    timings["teacher"] = time.time() - t
  runs = {}
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(args.root, f"{method}_seed{seed}")
      t = time.time()
      train_and_evaluate(student_config(args, method, seed), workdir)
      timings[f"{method}_seed{seed}"] = time.time() - t
      runs.setdefault(method, []).append(summarize(workdir))

  teacher = summarize(os.path.join(args.root, "teacher"))
  table = ["| method | last val top-1 | best val top-1 | test top-1 (final model) |", "|---|---|---|---|"]
  table.append(f"| static teacher ({args.teacher}) | {teacher['last_val']:.2f} | {teacher['best_val']:.2f} "
               f"| {teacher['test']:.2f} |")
  stats = {}
  for method, results in runs.items():
    row = {}
    for key in ("last_val", "best_val", "test"):
      values = np.array([r[key] for r in results])
      row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    stats[method] = row
    table.append(f"| {method} | " + " | ".join(f"{row[k][0]:.2f} ± {row[k][1]:.2f}"
                                                  for k in ("last_val", "best_val", "test")) + " |")
  print("\n".join(table))
  with open(os.path.join(args.root, "summary.json"), "w") as f:
    json.dump({"args": vars(args), "teacher": teacher, "runs": runs, "stats": stats,
               "wall_seconds": timings}, f, indent=2)


if __name__ == "__main__":
  main()
