"""GPD against its baselines on Fashion-MNIST: one teacher, then CE / KD / DKD / DKD+GPD / GPD-scratch,
and the feature methods ReviewKD / ReviewKD+GPD / SP / FitNets / CRD (configs/fashion_mnist_features.py).

    python launch/fashion_experiment.py --root=runs/fm_experiment --seeds=0,1,2

Every run starts from the offline default's config files, so the defaults are theirs:
``configs/fashion_mnist_teacher.py`` for the static teacher (trained once, shared) and
``configs/fashion_mnist_gpd.py`` (DKD + GPD) for the students; each baseline changes only its method
(``ce``: no teacher; ``kd``: τ 4, CE 0.1 / KD 0.9; ``dkd``: GPD off; ``gpd_scratch``: no teacher, GPD
on). Gradient clipping 5 (GPD's recipe) applies to every method, for a like-for-like comparison. Model
selection on the validation split (last 5k of train); the test split is evaluated once per run, at the
end. Each run is an ordinary workdir under ``--root`` (resumable: rerunning skips finished runs). Writes
``<root>/summary.json`` and prints a markdown table (mean ± std over seeds of the last-epoch val, best
val and final test top-1 of the student). ``--runlocal`` shrinks every run as the configs'
``:runlocal`` does (a smoke test of the whole protocol in a few minutes).
"""
import argparse
import os

from gpd_jax import config_base, experiment
from gpd_jax.train import load_config_file

# Feature-distillation methods: their settings come from configs/fashion_mnist_features.py:<method>.
FEATURE_METHODS = ("reviewkd", "reviewkd_gpd", "sp", "fitnet", "crd")
METHODS = ("ce", "kd", "dkd", "dkd_gpd", "gpd_scratch") + FEATURE_METHODS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STUDENT_CONFIG = os.path.join(CONFIG_DIR, "fashion_mnist_gpd.py")
FEATURES_CONFIG = os.path.join(CONFIG_DIR, "fashion_mnist_features.py")
TEACHER_CONFIG = os.path.join(CONFIG_DIR, "fashion_mnist_teacher.py")


def _load(path, runlocal):
  return load_config_file(path + (":runlocal" if runlocal else ""))


def build_parser() -> argparse.ArgumentParser:
  """The flags; their defaults are read from the config files."""
  student = _load(STUDENT_CONFIG, False)
  teacher = _load(TEACHER_CONFIG, False)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True, help="directory for the teacher, every run and summary.json")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default: 0,1,2; the "
                 "teacher uses its config's seed)")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS} (default: all)")
  p.add_argument("--epochs", type=float, default=None,
                 help=f"student epochs (default: configs/fashion_mnist_gpd.py's, {student.num_epochs:g})")
  p.add_argument("--teacher_epochs", type=float, default=None,
                 help=f"teacher epochs (default: configs/fashion_mnist_teacher.py's, "
                      f"{teacher.num_epochs:g})")
  p.add_argument("--teacher", default=teacher.model.name, help=f"static teacher model name (default: {teacher.model.name})")
  p.add_argument("--student", default=student.model.name, help=f"student model name (default: {student.model.name})")
  p.add_argument("--student_widths", default="", help="e.g. 8,8,16,32 for a narrower resnet8 "
                 "(config.model.kwargs.widths)")
  p.add_argument("--student_kwargs", default="", help="module overrides of the student, e.g. "
                 "patch_size=7,embed_dim=48,depth=3 for a smaller vit_fashion (config.model.kwargs)")
  p.add_argument("--optimizer", default=student.optim.name, choices=("sgd", "adamw"),
                 help=f"optimizer of every student run (default: the config's, {student.optim.name}); "
                      "adamw decays only the ViT recipe's leaves (no biases, norms, tokens)")
  p.add_argument("--base_lr", type=float, default=None,
                 help=f"student peak LR (default: the config's, {student.schedule.base_lr:g})")
  p.add_argument("--weight_decay", type=float, default=None,
                 help=f"student weight decay (default: the config's, {student.optim.weight_decay:g})")
  p.add_argument("--warmup_epochs", type=float, default=None,
                 help=f"student linear LR warm-up (default: the config's, "
                      f"{student.schedule.warmup_epochs:g})")
  p.add_argument("--num_train_examples", type=int, default=0,
                 help="cap on the 55k train images, for teacher and students (0: the config's)")
  p.add_argument("--ratio", type=int, default=student.gpd.ratio, help=f"GPD expansion ratio r (default: {student.gpd.ratio})")
  p.add_argument("--no_branches", action="store_true", default=not student.gpd.branches,
                 help="GPD without OREPA branches")
  p.add_argument("--dkd_beta", type=float, default=student.loss.dkd.beta, help=f"DKD β (default: "
                 f"{student.loss.dkd.beta:g}; α and T are the config's)")
  p.add_argument("--runlocal", action="store_true", help="shrink every run like the configs' :runlocal")
  p.add_argument("--order", choices=("method", "seed"), default="method",
                 help="run every seed of a method before the next method ('method', default) or "
                      "every method of a seed before the next seed ('seed')")
  return p


def parse_kwargs(text):
  """``'patch_size=7,embed_dim=48'`` -> {'patch_size': 7, 'embed_dim': 48} (ints, floats or strings)."""
  kwargs = {}
  for item in text.split(","):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--student_kwargs: {item!r} is not key=value (e.g. patch_size=7,depth=3)")
    for cast in (int, float, str):
      try:
        kwargs[key.strip()] = cast(value)
        break
      except ValueError:
        continue
  return kwargs


def student_config(args, method, seed):
  """The config of one student run: configs/fashion_mnist_gpd.py with the method's changes (a feature
  method: configs/fashion_mnist_features.py:<method>), then the protocol's flags."""
  if method in FEATURE_METHODS:
    c = load_config_file(f"{FEATURES_CONFIG}:{method}" + (",runlocal" if args.runlocal else ""))
  else:
    c = _load(STUDENT_CONFIG, args.runlocal)
  c.seed = seed
  if args.epochs is not None:
    c.num_epochs = float(args.epochs)
  c.model.name = args.student
  if args.student_widths:
    c.model.kwargs = {"widths": tuple(int(w) for w in args.student_widths.split(","))}
  if args.student_kwargs:
    c.model.kwargs = parse_kwargs(args.student_kwargs)
  if args.optimizer != c.optim.name:
    c.optim.name = args.optimizer
    if args.optimizer == "adamw":
      c.optim.no_decay_regex = config_base.VIT_NO_DECAY_REGEX
  if args.base_lr is not None:
    c.schedule.base_lr = args.base_lr
  if args.weight_decay is not None:
    c.optim.weight_decay = args.weight_decay
  if args.warmup_epochs is not None:
    c.schedule.warmup_epochs = args.warmup_epochs
  if args.num_train_examples:
    c.dataset.num_train_examples = args.num_train_examples
  c.teacher.name = args.teacher
  c.teacher.workdir = os.path.abspath(os.path.join(args.root, "teacher"))
  c.teacher.config = ""  # trained once by main(), with --teacher_epochs
  c.loss.dkd.beta = args.dkd_beta
  c.gpd.ratio = args.ratio
  c.gpd.branches = not args.no_branches
  if method in ("ce", "gpd_scratch"):
    c.teacher.name = c.teacher.workdir = ""
    c.loss.base = "ce"
  elif method == "kd":
    config_base.mdistiller_kd(c)
  c.gpd.enabled = method in ("dkd_gpd", "gpd_scratch", "reviewkd_gpd")
  return c


def teacher_config(args):
  """configs/fashion_mnist_teacher.py with --teacher, --teacher_epochs and the data cap."""
  c = _load(TEACHER_CONFIG, args.runlocal)
  c.model.name = args.teacher
  if args.teacher_epochs is not None:
    c.num_epochs = float(args.teacher_epochs)
  if args.num_train_examples:
    c.dataset.num_train_examples = args.num_train_examples
  return c


def main(argv=None):
  p = build_parser()
  args = p.parse_args(argv)
  methods = experiment.parse_names(p, "--methods", args.methods, METHODS)
  seeds = experiment.parse_seeds(p, args.seeds)
  os.makedirs(args.root, exist_ok=True)
  timings = {}
  experiment.train_once(teacher_config(args), os.path.join(args.root, "teacher"), timings, "teacher")
  teacher = experiment.summarize(os.path.join(args.root, "teacher"))
  runs = {}
  order = ([(m, s) for m in methods for s in seeds] if args.order == "method"
           else [(m, s) for s in seeds for m in methods])
  for method, seed in order:
    workdir = os.path.join(args.root, f"{method}_seed{seed}")
    experiment.train_once(student_config(args, method, seed), workdir, timings, f"{method}_seed{seed}")
    runs.setdefault(method, []).append({"seed": seed, **experiment.summarize(workdir)})
    stats = experiment.write_summary(args.root, vars(args), runs, timings, teacher=teacher)
  print("\n".join(experiment.table(stats, reference_rows={f"static teacher ({args.teacher})": teacher})))


if __name__ == "__main__":
  main()
