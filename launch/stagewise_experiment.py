"""Stagewise KD and SSKD on Fashion-MNIST, with the teacher and data of fashion_experiment.py.

    python launch/stagewise_experiment.py --root=runs/fm_stagewise --seeds=0,1,2 \
        --teacher_epochs=4 --num_train_examples=10000

Every student run is ``configs/fashion_mnist_stagewise.py:<method>`` (3 epochs in all, the protocol's
student budget; see that file for the phases) with the data cap given here; ``stagewise_data20`` is
Stagewise KD on a seeded 20 % of the (capped) training split. The ResNet-20 teacher is trained once
under ``--root`` as fashion_experiment.py trains it (configs/fashion_mnist_teacher.py, CE). Runs are
ordinary resumable workdirs: rerunning skips finished ones. Writes ``<root>/summary.json`` and prints
a markdown table (mean ± std over seeds of the student's last val, best val and test top-1; the test
is of the final weights, i.e. after the head phase).
"""
import argparse
import os

from gpd_jax import experiment
from gpd_jax.metric_writer import read_metrics
from gpd_jax.train import load_config_file

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STAGEWISE = os.path.join(CONFIG_DIR, "fashion_mnist_stagewise.py")
TEACHER = os.path.join(CONFIG_DIR, "fashion_mnist_teacher.py")
METHODS = {"stagewise": "stagewise", "sskd": "sskd", "stagewise_data20": "stagewise,data20"}


def teacher_config(args):
  """configs/fashion_mnist_teacher.py with --teacher_epochs and the data cap."""
  c = load_config_file(TEACHER + (":runlocal" if args.runlocal else ""))
  if args.teacher_epochs is not None:
    c.num_epochs = float(args.teacher_epochs)
  if args.num_train_examples:
    c.dataset.num_train_examples = args.num_train_examples
  return c


def method_config(args, method, seed):
  """One student run: the method's config, the data cap, the seed, the shared teacher."""
  c = load_config_file(f"{STAGEWISE}:{METHODS[method]}" + (",runlocal" if args.runlocal else ""))
  c.seed = seed
  if args.num_train_examples:
    c.dataset.num_train_examples = args.num_train_examples
  c.teacher.workdir = os.path.abspath(os.path.join(args.root, "teacher"))
  c.teacher.config = ""
  if args.phase_epochs_scale != 1.0:
    c.phases = tuple({**dict(p), "epochs": float(p["epochs"]) * args.phase_epochs_scale}
                     for p in c.phases)
    c.num_epochs = sum(p["epochs"] for p in c.phases)
  return c


def summarize(workdir):
  """experiment.summarize, plus each phase's end: (step, phase index, val loss)."""
  return {**experiment.summarize(workdir),
          "phase_val_losses": [(r["step"], int(r["index"]), r["val_loss"])
                               for r in read_metrics(workdir, "phase")]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True, help="directory for the teacher, every run and summary.json")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {tuple(METHODS)}")
  p.add_argument("--teacher_epochs", type=float, default=None, help="teacher epochs (default: its config's)")
  p.add_argument("--num_train_examples", type=int, default=0, help="cap on the train images (0: all)")
  p.add_argument("--runlocal", action="store_true", help="shrink every run like the configs' :runlocal")
  p.add_argument("--phase_epochs_scale", type=float, default=1.0,
                 help="multiply every phase's length by this (1: the protocol's 3 epochs in all)")
  p.add_argument("--summary_only", action="store_true",
                 help="train nothing: summarise the runs under --root that have finished")
  args = p.parse_args(argv)
  methods = experiment.parse_names(p, "--methods", args.methods, METHODS)
  seeds = experiment.parse_seeds(p, args.seeds)
  os.makedirs(args.root, exist_ok=True)
  timings = {}
  if not args.summary_only:
    experiment.train_once(teacher_config(args), os.path.join(args.root, "teacher"), timings, "teacher")
  runs = {}
  for seed in seeds:  # seed-major: an interrupted sweep has every method at the first seeds
    for method in methods:
      name = f"{method}_seed{seed}"
      workdir = os.path.join(args.root, name)
      if not args.summary_only:
        experiment.train_once(method_config(args, method, seed), workdir, timings, name)
      elif not experiment.is_finished(workdir):
        continue
      runs.setdefault(method, []).append({"seed": seed, **summarize(workdir)})
  teacher = experiment.summarize(os.path.join(args.root, "teacher"))
  stats = experiment.write_summary(args.root, vars(args), runs, timings, teacher=teacher)
  labels = {m: f"{m} (seeds {[r['seed'] for r in results]})" for m, results in runs.items()}
  print("\n".join(experiment.table({m: stats[m] for m in runs}, labels=labels,
                                    reference_rows={"static teacher (resnet20)": teacher})))


if __name__ == "__main__":
  main()
