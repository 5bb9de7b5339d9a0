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
import os

from gpd_jax import config_base, experiment
from gpd_jax.train import load_config_file

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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--epochs", type=float, default=3)
  p.add_argument("--teacher_epochs", type=float, default=4)
  p.add_argument("--num_train_examples", type=int, default=10000)
  args = p.parse_args(argv)
  methods = experiment.parse_names(p, "--methods", args.methods, METHODS)
  seeds = experiment.parse_seeds(p, args.seeds)
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  timings = {}
  teacher = lambda model: _shrink(load_config_file(f"{TEACHER}:{model}"), args.teacher_epochs,
                                  args.num_train_examples)
  shared = {"teacher": teacher("resnet20")}
  if "camkd" in methods:
    shared["teacher_resnet14"] = teacher("resnet14")
  if "takd" in methods:
    assistant = _shrink(load_config_file(f"{ONLINE}:assistant"), args.epochs, args.num_train_examples)
    assistant.teacher.workdir, assistant.teacher.config = os.path.join(root, "teacher"), ""
    shared["assistant"] = assistant
  for name, config in shared.items():  # in this order: the assistant learns from the teacher
    experiment.train_once(config, os.path.join(root, name), timings, name)
  runs = {}
  for seed in seeds:  # every method's seed 0 first: a cut-off experiment still covers each method
    for method in methods:
      if method == "born_again":
        gen0 = _shrink(load_config_file(f"{TEACHER}:resnet8"), args.epochs, args.num_train_examples, seed)
        experiment.train_once(gen0, os.path.join(root, f"born_again_gen0_seed{seed}"), timings,
                              f"born_again_gen0_seed{seed}")
      name = f"{method}_seed{seed}"
      workdir = os.path.join(root, name)
      experiment.train_once(method_config(args, method, seed, root), workdir, timings, name)
      runs.setdefault(method, []).append({"seed": seed, **experiment.summarize(workdir)})
      stats = experiment.write_summary(root, vars(args), runs, timings)
  shared_rows = {f"{name} (1 run)": experiment.summarize(os.path.join(root, name))
                 for name in ("teacher", "teacher_resnet14", "assistant")
                 if experiment.is_finished(os.path.join(root, name))}
  print("\n".join(experiment.table({m: stats[m] for m in runs}, reference_rows=shared_rows)))


if __name__ == "__main__":
  main()
