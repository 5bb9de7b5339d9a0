"""Bad input through the launchers' entry functions: a non-zero exit, one message that names the
field or file and the fix, no traceback, and nothing on disk changed.

Every case runs ``launch/train.py``'s or ``launch/eval.py``'s ``main(argv)`` on a tiny synthetic
config; the cases that need a checkpoint share one 4-step run.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from gpd_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _load_launcher(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(ROOT, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TRAIN = _load_launcher("train")
EVAL = _load_launcher("eval")

TINY_CONFIG = f"""
import sys
sys.path.insert(0, {TESTS!r})
from gpd_jax import config_base
from test_train import tiny_config

def get_config(arg=None):
  config_base.parse_arg(arg, allowed=("runlocal",))
  return tiny_config(teacher=False, steps=4)
"""


PHASED_CONFIG = f"""
import sys
sys.path.insert(0, {TESTS!r})
from gpd_jax import config_base
from test_train import tiny_config

def get_config(arg=None):
  config_base.parse_arg(arg, allowed=("runlocal",))
  c = tiny_config(teacher=False, gpd=False, steps=NUM_TRAIN_STEPS)
  c.teacher.name, c.teacher.workdir = "resnet8", TEACHER_WORKDIR  # the finished run's export
  c.phases = (config_base.phase("stage1", 0.5, ("stage1",), ("stage_mse(stage1)",)), PHASE)
  return c
"""

# Multi-phase configs with one bad second phase (gpd_jax/phases.py): {name: (phase source, steps)}.
BAD_PHASES = {
    "phase_unknown_term": ('config_base.phase("head", 1, ("head",), ("mse",))', 0),
    "phase_tap_out_of_range": ('config_base.phase("s3", 1, ("stage3",), ("stage_mse(stage9)",))', 0),
    "phase_train_matches_nothing": ('config_base.phase("s4", 1, ("stage4",), ("ce",))', 0),
    "phase_bad_regex": ('config_base.phase("x", 1, ("layer[",), ("ce",))', 0),
    "phase_zero_epochs": ('config_base.phase("head", 0, ("head",), ("ce",))', 0),
    "phase_bad_start": ('config_base.phase("head", 1, ("head",), ("ce",), start="first")', 0),
    "phase_unknown_key": ('dict(config_base.phase("head", 1, ("head",), ("ce",)), lr=0.1)', 0),
    "phase_unknown_optim_field": ('config_base.phase("head", 1, ("head",), ("ce",), optim={"lrr": 1})', 0),
    "phase_not_a_dict": ('"head"', 0),
    "phase_with_num_train_steps": ('config_base.phase("head", 1, ("head",), ("ce",))', 4),
}


def snapshot(*roots):
  """Every path under ``roots`` with its size and mtime (directories included)."""
  state = {}
  for root in roots:
    if not os.path.exists(root):
      state[root] = None
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      for name in [""] + dirnames + filenames:
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        state[path] = (st.st_size, st.st_mtime_ns)
  return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Config files (good, broken, ...) and one finished 4-step run made through the launcher."""
  d = tmp_path_factory.mktemp("bad_input")
  paths = {"dir": str(d)}
  for name, text in {
      "tiny": TINY_CONFIG,
      "broken": "def get_config(:\n",
      "no_get_config": "X = 1\n",
      "raises": "def get_config(arg=None):\n  raise RuntimeError('boom in get_config')\n",
      "unknown_field": TINY_CONFIG.replace("return tiny_config(teacher=False, steps=4)",
                                           "c = tiny_config(teacher=False, steps=4)\n"
                                           "  c.dataset.shuffle_buffer = 10\n  return c"),
  }.items():
    path = d / f"{name}.py"
    path.write_text(text)
    paths[name] = str(path)
  for name, (phase, steps) in BAD_PHASES.items():
    text = (PHASED_CONFIG.replace("PHASE)", phase + ")").replace("NUM_TRAIN_STEPS", str(steps))
            .replace("TEACHER_WORKDIR", repr(str(d / "run"))))
    path = d / f"{name}.py"
    path.write_text(text)
    paths[name] = str(path)
  no_teacher = PHASED_CONFIG.replace("PHASE)", ")")
  no_teacher = no_teacher.replace("NUM_TRAIN_STEPS", "0").replace(
      'c.teacher.name, c.teacher.workdir = "resnet8", TEACHER_WORKDIR', 'c.loss.base = "ce"')
  (d / "phase_without_teacher.py").write_text(no_teacher)
  paths["phase_without_teacher"] = str(d / "phase_without_teacher.py")
  paths["a_file"] = str(d / "a_file.txt")
  with open(paths["a_file"], "w") as f:
    f.write("not a directory")
  # A finished run (steps 2 and 4 kept, exports written), through the launcher: exit code 0.
  paths["run"] = str(d / "run")
  assert TRAIN.main(["train.py", f"--config={paths['tiny']}", f"--workdir={paths['run']}"]) == 0
  # A corrupted export: model.json garbled.
  paths["bad_export"] = str(d / "bad_export")
  shutil.copytree(os.path.join(paths["run"], "export"), paths["bad_export"])
  with open(os.path.join(paths["bad_export"], "model.json"), "w") as f:
    f.write("{garbled")
  # Garbage Fashion-MNIST source files (never prepared before).
  paths["garbage_src"] = str(d / "garbage_src")
  os.makedirs(paths["garbage_src"])
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    with open(os.path.join(paths["garbage_src"], name), "wb") as f:
      f.write(b"\x1f\x8b this is not gzip data" * 50)
  return paths


# (launcher, argv after the program name, regex the message must match). {tiny}, {run}, ... are
# paths from the `files` fixture; {new} is a workdir that must not get created; {scratch} a
# directory outside the watched ones (a dataset cache).
CASES = {
    # The config file and its argument.
    "missing_config_file": ("train", ["--config={dir}/nope.py", "--workdir={new}"], r"nope\.py.*does not exist"),
    "broken_config_file": ("train", ["--config={broken}", "--workdir={new}"], r"broken\.py.*does not load.*SyntaxError.*fix"),
    "config_without_get_config": ("train", ["--config={no_get_config}", "--workdir={new}"], r"no get_config"),
    "config_get_config_raises": ("train", ["--config={raises}", "--workdir={new}"], r"raises\.py.*get_config failed.*boom"),
    "config_arg_typo": ("train", ["--config={tiny}:runlocl", "--workdir={new}"], r"config argument 'runlocl': unknown.*did you mean 'runlocal'"),
    "unknown_field_in_file": ("train", ["--config={unknown_field}", "--workdir={new}"], r"config\.dataset\.shuffle_buffer is not a config field"),
    # The command line.
    "unknown_override": ("train", ["--config={tiny}", "--workdir={new}", "--config.optim.lrr=0.1"], r"config\.optim\.lrr is not a config field"),
    "misspelled_override": ("train", ["--config={tiny}", "--workdir={new}", "--config.optim.momentun=0.5"], r"config\.optim\.momentun is not a config field; did you mean --config\.optim\.momentum"),
    "override_of_wrong_type": ("train", ["--config={tiny}", "--workdir={new}", "--config.batch_size=abc"], r"config\.batch_size=abc.*type"),
    "unknown_flag": ("train", ["--config={tiny}", "--workdir={new}", "--wrokdir=x"], r"unknown flag --wrokdir.*did you mean --workdir"),
    "missing_workdir_flag": ("train", ["--config={tiny}"], r"--workdir is required"),
    "stray_argument": ("train", ["--config={tiny}", "--workdir={new}", "extra"], r"unexpected arguments \['extra'\]"),
    # Field types and ranges.
    "batch_size_0": ("train", ["--config={tiny}", "--workdir={new}", "--config.batch_size=0"], r"config\.batch_size=0 must be >= 1"),
    "learning_rate_0": ("train", ["--config={tiny}", "--workdir={new}", "--config.schedule.base_lr=0"], r"config\.schedule\.base_lr=0\.0 must be > 0"),
    "keep_checkpoints_0": ("train", ["--config={tiny}", "--workdir={new}", "--config.keep_checkpoints=0"], r"config\.keep_checkpoints=0 must be >= 1.*delete every checkpoint"),
    "no_steps": ("train", ["--config={tiny}", "--workdir={new}", "--config.num_epochs=0", "--config.num_train_steps=0"], r"config\.num_epochs=0.*no steps"),
    "negative_steps": ("train", ["--config={tiny}", "--workdir={new}", "--config.num_train_steps=-3"], r"config\.num_train_steps=-3 must be >= 0"),
    "ema_decay_1": ("train", ["--config={tiny}", "--workdir={new}", "--config.ema_decay=1.0"], r"config\.ema_decay=1\.0 must be >= 0 and < 1"),
    "label_smoothing_above_1": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.label_smoothing=1.5"], r"config\.loss\.label_smoothing=1\.5 must be"),
    "kd_temperature_0": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.kd.temperature=0"], r"config\.loss\.kd\.temperature"),
    "gpd_ratio_1": ("train", ["--config={tiny}", "--workdir={new}", "--config.gpd.ratio=1"], r"config\.gpd\.ratio=1 must be >= 2"),
    "unknown_model": ("train", ["--config={tiny}", "--workdir={new}", "--config.model.name=resnet9"], r"config\.model\.name: unknown model name 'resnet9'.*did you mean"),
    "unknown_dataset": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.name=cifar1000"], r"config\.dataset\.name.*'cifar1000'.*did you mean 'cifar100'"),
    "unknown_optimizer": ("train", ["--config={tiny}", "--workdir={new}", "--config.optim.name=adam"], r"config\.optim\.name.*'adam'.*choose one of"),
    "unknown_schedule": ("train", ["--config={tiny}", "--workdir={new}", "--config.schedule.name=linear"], r"config\.schedule\.name.*'linear'"),
    "unknown_loss": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.base=fitnet"], r"config\.loss\.base.*'fitnet'"),
    # The ViT data recipe.
    "rand_augment_typo": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.rand_augment=rand-m9-msd0.5"], r"config\.dataset\.rand_augment.*'msd0\.5'.*m<float> \(magnitude\)"),
    "mixup_prob_above_1": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.mixup_prob=1.5"], r"config\.dataset\.mixup_prob=1\.5 must be >= 0 and <= 1"),
    "repeats_above_batch": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.repeated_augmentations=64"], r"config\.dataset\.repeated_augmentations=64 is above config\.batch_size"),
    "unknown_dtype": ("train", ["--config={tiny}", "--workdir={new}", "--config.model.dtype=float8"], r"config\.model\.dtype.*'float8'"),
    "bad_no_decay_regex": ("train", ["--config={tiny}", "--workdir={new}", "--config.optim.no_decay_regex=(bias"], r"config\.optim\.no_decay_regex.*not a regular expression"),
    # Fields that depend on each other, on the devices or on the data.
    "batch_not_divisible": ("train", ["--config={tiny}", "--workdir={new}", "--config.batch_size=6", "--config.mesh.shape=(4,)"], r"config\.batch_size=6.*not divisible by the 4 devices"),
    "batch_larger_than_data": ("train", ["--config={tiny}", "--workdir={new}", "--config.batch_size=64"], r"config\.batch_size=64 is larger than the 32 training examples"),
    "kd_without_teacher": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.base=kd"], r"config\.loss\.base='kd'.*config\.teacher\.name is empty"),
    "missing_teacher": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.base=kd", "--config.teacher.name=resnet8", "--config.teacher.workdir=teacher"], r"config\.teacher\.workdir: no trained teacher.*Train one first"),
    "missing_teacher_config": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.base=kd", "--config.teacher.name=resnet8", "--config.teacher.workdir=teacher", "--config.teacher.config={dir}/nope.py"], r"config\.teacher\.config=.*nope\.py.*does not exist"),
    "teacher_of_other_model": ("train", ["--config={tiny}", "--workdir={new}", "--config.loss.base=kd", "--config.teacher.name=resnet20", "--config.teacher.workdir={run}"], r"config\.teacher\.workdir: the export at .* is a 'resnet8'.*expects a 'resnet20'"),
    "missing_pretrained_student": ("train", ["--config={tiny}", "--workdir={new}", "--config.init.student={dir}/no_student"], r"config\.init\.student: no exported model"),
    "corrupted_pretrained_student": ("train", ["--config={tiny}", "--workdir={new}", "--config.init.student={bad_export}"], r"config\.init\.student:.*model\.json is unreadable.*export the model again"),
    "eval_split_typo": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.name=fashion_mnist", "--config.dataset.eval_splits.val=tset"], r"config\.dataset\.eval_splits\['val'\]='tset'.*Unknown split"),
    "garbage_dataset_files": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.name=fashion_mnist", "--config.dataset.source_dir={garbage_src}", "--config.dataset.data_dir={scratch}/tfds"], r"config\.dataset\.train_split='train': dataset 'fashion_mnist' cannot be read.*re-prepare"),
    # Multi-phase runs (config.phases) and reduced data: the phase's field and the fix.
    "phase_unknown_term": ("train", ["--config={phase_unknown_term}", "--workdir={new}"], r"config\.phases\[1\]\.terms: 'mse' is not a term; use 'base', 'ce' or 'stage_mse"),
    "phase_tap_out_of_range": ("train", ["--config={phase_tap_out_of_range}", "--workdir={new}"], r"config\.phases\[1\]\.terms: the student's tap 'stage9': the model has 3 stages"),
    "phase_train_matches_nothing": ("train", ["--config={phase_train_matches_nothing}", "--workdir={new}"], r"config\.phases\[1\]\.train: 'stage4' \(regex .*\) matches no parameter"),
    "phase_bad_regex": ("train", ["--config={phase_bad_regex}", "--workdir={new}"], r"config\.phases\[1\]\.train: 'layer\[' is not a stage name or a regular expression"),
    "phase_zero_epochs": ("train", ["--config={phase_zero_epochs}", "--workdir={new}"], r"config\.phases\[1\]\.epochs=0\.0 must be a number > 0"),
    "phase_bad_start": ("train", ["--config={phase_bad_start}", "--workdir={new}"], r"config\.phases\[1\]\.start='first' must be one of \('best', 'last'\)"),
    "phase_unknown_key": ("train", ["--config={phase_unknown_key}", "--workdir={new}"], r"config\.phases\[1\] has unknown keys \['lr'\]"),
    "phase_unknown_optim_field": ("train", ["--config={phase_unknown_optim_field}", "--workdir={new}"], r"config\.phases\[1\]\.optim\.lrr is not a field of optim"),
    "phase_not_a_dict": ("train", ["--config={phase_not_a_dict}", "--workdir={new}"], r"config\.phases\[1\]='head' must be a dict"),
    "phase_with_num_train_steps": ("train", ["--config={phase_with_num_train_steps}", "--workdir={new}"], r"config\.num_train_steps=4 with config\.phases.*set num_train_steps=0"),
    "phase_without_teacher": ("train", ["--config={phase_without_teacher}", "--workdir={new}"], r"config\.phases\[0\]\.terms=.*static teacher, but config\.teacher\.name is empty"),
    "train_fraction_0": ("train", ["--config={tiny}", "--workdir={new}", "--config.dataset.train_fraction=0"], r"config\.dataset\.train_fraction=0\.0 must be > 0 and <= 1"),
    "resume_other_train_fraction": ("train", ["--config={tiny}", "--workdir={run}", "--config.dataset.train_fraction=0.5", "--config.num_train_steps=8"], r"dataset: checkpoint has .*config gives .*'train_fraction': 0\.5"),
    # The workdir.
    "workdir_is_a_file": ("train", ["--config={tiny}", "--workdir={a_file}"], r"--workdir=.*a_file\.txt is a file"),
    "workdir_under_a_file": ("train", ["--config={tiny}", "--workdir={a_file}/sub"], r"a_file\.txt is a file, so the workdir cannot be created"),
    "workdir_not_writable": ("train", ["--config={tiny}", "--workdir=/proc/self/gpd_run"], r"/proc/self is not writable"),
    # Resuming a checkpoint of another setup: the field, both values and the fix.
    "resume_other_batch": ("train", ["--config={tiny}", "--workdir={run}", "--config.batch_size=16", "--config.num_train_steps=8"], r"batch_size: checkpoint has 8, config gives 16.*new --workdir"),
    "resume_other_dataset_size": ("train", ["--config={tiny}", "--workdir={run}", "--config.dataset.num_train_examples=16", "--config.num_train_steps=8"], r"dataset: checkpoint has .*'num_train_examples': None.*config gives .*'num_train_examples': 16"),
    "resume_other_schedule": ("train", ["--config={tiny}", "--workdir={run}", "--config.schedule.name=cosine", "--config.num_train_steps=8"], r"schedule: checkpoint has .*'constant'.*'cosine'"),
    "resume_other_ratio": ("train", ["--config={tiny}", "--workdir={run}", "--config.gpd.ratio=3", "--config.num_train_steps=8"], r"ratio: checkpoint has 2, config gives 3"),
    # Evaluation is read-only and never trains.
    "eval_workdir_typo": ("eval", ["--config={tiny}", "--workdir={new}"], r"--workdir=.* does not exist.*typos"),
    "eval_workdir_without_checkpoints": ("eval", ["--config={tiny}", "--workdir={dir}"], r"holds no checkpoints/"),
    "eval_missing_teacher_is_not_trained": ("eval", ["--config={tiny}", "--workdir={run}", "--config.loss.base=kd", "--config.teacher.name=resnet8", "--config.teacher.workdir=teacher", "--config.teacher.config={tiny}"], r"no trained teacher.*evaluation never trains"),
    "eval_other_model": ("eval", ["--config={tiny}", "--workdir={run}", "--config.gpd.ratio=3"], r"ratio: checkpoint has 2, config gives 3"),
    "eval_both_sources": ("eval", ["--config={tiny}", "--workdir={run}", "--export={run}/export"], r"exactly one of --workdir .* and --export"),
    "eval_missing_export": ("eval", ["--config={tiny}", "--export={dir}/no_export"], r"--export: no exported model"),
    "eval_corrupted_export": ("eval", ["--config={tiny}", "--export={bad_export}"], r"model\.json is unreadable"),
    "eval_bad_field": ("eval", ["--config={tiny}", "--workdir={run}", "--config.eval_batch_size=-8"], r"config\.eval_batch_size=-8 must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_nonzero_with_a_clear_message_and_changes_nothing(files, case, capsys, tmp_path):
  launcher, args, pattern = CASES[case]
  new = str(tmp_path / "new_workdir")
  scratch = str(tmp_path / "scratch")
  argv = [f"{launcher}.py"] + [a.format(new=new, scratch=scratch, **files) for a in args]
  watched = [files["dir"], new]
  before = snapshot(*watched)
  capsys.readouterr()
  code = (TRAIN if launcher == "train" else EVAL).main(argv)
  err = capsys.readouterr().err
  assert code != 0, err
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert errors, err
  assert any(re.search(pattern, line) for line in errors), err
  after = snapshot(*watched)
  changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
  assert not changed, changed


def test_debug_flag_shows_the_traceback_of_an_expected_error(files, capsys, tmp_path):
  code = TRAIN.main(["train.py", f"--config={files['tiny']}", f"--workdir={tmp_path / 'w'}",
                     "--config.batch_size=0", "--debug"])
  err = capsys.readouterr().err
  assert code == 1 and "Traceback" in err and "error: config.batch_size=0" in err


def test_an_unexpected_error_keeps_its_traceback(files, monkeypatch, tmp_path):
  def broken(config, workdir):
    raise KeyError("a bug, not an input mistake")
  monkeypatch.setattr(TRAIN, "train_and_evaluate", broken)
  with pytest.raises(KeyError, match="a bug"):
    TRAIN.main(["train.py", f"--config={files['tiny']}", f"--workdir={tmp_path / 'w'}"])


def test_eval_of_a_good_run_works_and_writes_nothing(files, capsys):
  before = snapshot(files["run"])
  assert EVAL.main(["eval.py", f"--config={files['tiny']}", f"--workdir={files['run']}"]) == 0
  assert '"top1_S"' in capsys.readouterr().out
  assert snapshot(files["run"]) == before
  assert checkpoint.Checkpointer(os.path.join(files["run"], "checkpoints"), read_only=True).all_steps() == [2, 4]


def test_cli_subprocess_prints_one_line(files, tmp_path):
  """The real command line: exit code 1 and the message, without a traceback."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={files['tiny']}",
       f"--workdir={tmp_path / 'w'}", "--config.keep_checkpoints=0"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "error: config.keep_checkpoints=0 must be >= 1" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_every_shipped_config_passes_the_checks(arg):
  from gpd_jax import validate  # pylint: disable=import-outside-toplevel
  from gpd_jax.train import load_config_file  # pylint: disable=import-outside-toplevel
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    validate.check_config(load_config_file(path + arg))
