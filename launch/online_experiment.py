"""Online, multi-teacher and chained KD on Fashion-MNIST, with the recipe of fashion_experiment.py.

    python launch/online_experiment.py --root=runs/fm_online --seeds=0,1,2 --epochs=3 \
        --teacher_epochs=4 --num_train_examples=10000

Every run is ``configs/fashion_mnist_online.py:<method>`` with the epochs and data cap given here,
so the recipe is that of docs/results.md's table (SGD 0.05 cosine, batch 128, clip 5, ResNet-8
student). Shared, trained once under ``--root``: the ResNet-20 teacher (``teacher``, as
fashion_experiment.py trains it), a ResNet-14 teacher (``teacher_resnet14``, CA-MKD's second), the TAKD
assistant (ResNet-14 distilled from the ResNet-20, ``assistant``). Born-again generation 1 of seed s
learns from generation 0 of the same seed (a CE ResNet-8, ``born_again_gen0_seed<s>``). Runs are
ordinary resumable workdirs: rerunning skips finished ones. Writes ``<root>/summary.json`` and prints
a markdown table (mean ± std over seeds of the student's last val, best val and test top-1).
"""
import argparse
import json
import os
import time

import numpy as np

from gpd_jax import config_base
from gpd_jax.metric_writer import read_metrics
from gpd_jax.train import load_config_file, train_and_evaluate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ONLINE = os.path.join(CONFIG_DIR, "fashion_mnist_online.py")
TEACHER = os.path.join(CONFIG_DIR, "fashion_mnist_teacher.py")
METHODS = ("kd", "dml", "dml3", "dml_gpd", "sokd", "switokd", "bdkd", "camkd", "takd", "born_again")
GPD = os.path.join(CONFIG_DIR, "fashion_mnist_gpd.py")


def _shrink(c, epochs, num_train_examples, seed=None):
  c.num_epochs = float(epochs)
  if num_train_examples:
    c.dataset.num_train_examples = num_train_examples
  if seed is not None:
    c.seed = seed
  return c


def _train_once(config, workdir, timings, name):
  if not os.path.isfile(os.path.join(workdir, "export", "model.json")):
    start = time.time()
    train_and_evaluate(config, workdir)
    timings[name] = time.time() - start


def method_config(args, method, seed, root):
  """The config of one student run, its teachers pointed at the shared runs under ``root``."""
  if method == "kd":  # the KD baseline of fashion_experiment.py, against the same teacher
    c = _shrink(load_config_file(GPD), args.epochs, args.num_train_examples, seed)
    c.gpd.enabled = False
    config_base.mdistiller_kd(c)
  else:
    arg = "born_again=1" if method == "born_again" else method
    c = _shrink(load_config_file(f"{ONLINE}:{arg}"), args.epochs, args.num_train_examples, seed)
  if c.teacher.name:
    c.teacher.config = ""
    c.teacher.workdir = {"takd": os.path.join(root, "assistant"),
                         "born_again": os.path.join(root, f"born_again_gen0_seed{seed}")
                         }.get(method, os.path.join(root, "teacher"))
  if method == "camkd":
    c.online.teachers.teacher_2.workdir = os.path.join(root, "teacher_resnet14")
    c.online.teachers.teacher_2.config = ""
  if method == "sokd":
    c.online.peers.bridge.init = os.path.join(root, "teacher")
  return c


def summarize(workdir):
  val = read_metrics(workdir, "eval/val")
  test = read_metrics(workdir, "test/test")
  return {"last_val": val[-1]["top1_S"], "best_val": max(r["top1_S"] for r in val),
          "test": test[-1]["top1_S"] if test else float("nan")}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--epochs", type=float, default=3)
  p.add_argument("--teacher_epochs", type=float, default=4)
  p.add_argument("--num_train_examples", type=int, default=10000)
  args = p.parse_args(argv)
  methods = args.methods.split(",")
  bad = [m for m in methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; choose from {METHODS}")
  seeds = [int(s) for s in args.seeds.split(",")]
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  timings = {}
  teacher = lambda model: _shrink(load_config_file(f"{TEACHER}:{model}"), args.teacher_epochs,
                                  args.num_train_examples)
  _train_once(teacher("resnet20"), os.path.join(root, "teacher"), timings, "teacher")
  if "camkd" in methods:
    _train_once(teacher("resnet14"), os.path.join(root, "teacher_resnet14"), timings, "teacher_resnet14")
  if "takd" in methods:
    assistant = _shrink(load_config_file(f"{ONLINE}:assistant"), args.epochs, args.num_train_examples)
    assistant.teacher.workdir, assistant.teacher.config = os.path.join(root, "teacher"), ""
    _train_once(assistant, os.path.join(root, "assistant"), timings, "assistant")
  runs = {}
  for seed in seeds:  # every method's seed 0 first: a cut-off experiment still covers each method
    for method in methods:
      if method == "born_again":
        gen0 = _shrink(load_config_file(f"{TEACHER}:resnet8"), args.epochs, args.num_train_examples, seed)
        _train_once(gen0, os.path.join(root, f"born_again_gen0_seed{seed}"), timings,
                    f"born_again_gen0_seed{seed}")
      workdir = os.path.join(root, f"{method}_seed{seed}")
      start = time.time()
      train_and_evaluate(method_config(args, method, seed, root), workdir)
      timings[f"{method}_seed{seed}"] = time.time() - start
      runs.setdefault(method, []).append(summarize(workdir))
      with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "wall_seconds": timings}, f, indent=2)

  table = ["| method | seeds | last val top-1 | best val top-1 | test top-1 (final model) |",
           "|---|---|---|---|---|"]
  for name in ("teacher", "teacher_resnet14", "assistant"):
    if os.path.isdir(os.path.join(root, name)):
      r = summarize(os.path.join(root, name))
      table.append(f"| {name} (1 run) | 1 | {r['last_val']:.2f} | {r['best_val']:.2f} | {r['test']:.2f} |")
  for method, results in runs.items():
    cells = []
    for key in ("last_val", "best_val", "test"):
      values = np.array([r[key] for r in results])
      std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      cells.append(f"{values.mean():.2f} ± {std:.2f}")
    table.append(f"| {method} | {len(results)} | " + " | ".join(cells) + " |")
  print("\n".join(table))


if __name__ == "__main__":
  main()
