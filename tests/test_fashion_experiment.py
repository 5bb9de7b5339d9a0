"""launch/fashion_experiment.py builds every run on the config files, with help text on every flag."""
import argparse
import importlib.util
import json
import os

import pytest

from gpd_jax import config_base
from gpd_jax import experiment as ex
from gpd_jax.objective import make_objective
from gpd_jax.train import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def experiment():
  spec = importlib.util.spec_from_file_location(
      "fashion_experiment", os.path.join(ROOT, "launch", "fashion_experiment.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_flag_has_help_and_the_config_defaults(experiment):
  parser = experiment.build_parser()
  for action in parser._actions:
    assert action.help, f"{action.option_strings} has no help text"
  args = parser.parse_args(["--root=/tmp/x"])
  student = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_gpd.py"))
  teacher = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_teacher.py"))
  assert args.epochs is None and args.teacher_epochs is None  # the config's (also with --runlocal)
  assert f"{student.num_epochs:g}" in parser.format_help()
  assert (args.student, args.teacher) == (student.model.name, teacher.model.name)
  assert (args.ratio, not args.no_branches, args.dkd_beta) == (
      student.gpd.ratio, student.gpd.branches, student.loss.dkd.beta)


def test_dkd_gpd_run_is_the_offline_default_config(experiment, tmp_path):
  args = experiment.build_parser().parse_args([f"--root={tmp_path}"])
  built = experiment.student_config(args, "dkd_gpd", seed=0).to_dict()
  default = load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_gpd.py")).to_dict()
  assert built["teacher"].pop("workdir") == str(tmp_path / "teacher")
  assert built["teacher"].pop("config") == ""  # the experiment trains its shared teacher itself
  for key in ("workdir", "config"):
    default["teacher"].pop(key)
  assert built == default
  teacher = experiment.teacher_config(args).to_dict()
  assert teacher == load_config_file(os.path.join(ROOT, "configs", "fashion_mnist_teacher.py")).to_dict()
  args = experiment.build_parser().parse_args([f"--root={tmp_path}", "--epochs=3", "--teacher_epochs=4"])
  assert experiment.student_config(args, "dkd", seed=0).num_epochs == 3.0
  assert experiment.teacher_config(args).num_epochs == 4.0


def test_each_method_changes_only_its_method(experiment, tmp_path):
  args = experiment.build_parser().parse_args([f"--root={tmp_path}", "--runlocal", "--seeds=1",
                                               "--num_train_examples=512"])
  expected = {  # (loss.base, teacher?, GPD?)
      "ce": ("ce", False, False), "kd": ("kd", True, False), "dkd": ("dkd", True, False),
      "dkd_gpd": ("dkd", True, True), "gpd_scratch": ("ce", False, True)}
  for method, (base, teacher, gpd) in expected.items():
    c = experiment.student_config(args, method, seed=1)
    assert (c.loss.base, bool(c.teacher.name), c.gpd.enabled) == (base, teacher, gpd), method
    assert (c.seed, c.dataset.num_train_examples, c.optim.clip_norm) == (1, 512, 5.0), method
    assert c.num_epochs == load_config_file(
        os.path.join(ROOT, "configs", "fashion_mnist_gpd.py:runlocal")).num_epochs
    make_objective(c.loss, c.gpd if c.gpd.enabled else None, steps_per_epoch=8)
  kd = experiment.student_config(args, "kd", seed=1)
  assert (kd.loss.ce_weight, kd.loss.kd_weight, kd.loss.kd.temperature) == (0.1, 0.9, 4.0)
  assert experiment.teacher_config(args).dataset.num_train_examples == 512


def test_vit_student_flags(experiment, tmp_path):
  """--student_kwargs / --optimizer / --base_lr / --weight_decay / --warmup_epochs change every
  method's student alike (the ViT protocol), and a malformed --student_kwargs names the fix."""
  args = experiment.build_parser().parse_args([
      f"--root={tmp_path}", "--student=vit_fashion", "--student_kwargs=patch_size=7,embed_dim=48",
      "--no_branches", "--optimizer=adamw", "--base_lr=1e-3", "--weight_decay=0.05",
      "--warmup_epochs=0.5"])
  for method in experiment.METHODS:
    c = experiment.student_config(args, method, seed=0)
    assert (c.model.name, dict(c.model.kwargs)) == ("vit_fashion", {"patch_size": 7, "embed_dim": 48})
    assert (c.optim.name, c.optim.weight_decay, c.schedule.base_lr, c.schedule.warmup_epochs) == (
        "adamw", 0.05, 1e-3, 0.5)
    assert c.optim.no_decay_regex == config_base.VIT_NO_DECAY_REGEX and not c.gpd.branches
  default = experiment.student_config(experiment.build_parser().parse_args([f"--root={tmp_path}"]),
                                      "dkd", seed=0)
  assert (default.optim.name, default.optim.no_decay_regex) == ("sgd", "")
  with pytest.raises(ValueError, match=r"--student_kwargs: 'patch_size' is not key=value"):
    experiment.parse_kwargs("patch_size")


def test_protocol_summary_keeps_earlier_methods_and_computes_sample_std(tmp_path):
  """gpd_jax/experiment.py: mean and sample std (n-1) per column; a later invocation that runs
  other methods keeps the earlier ones; unknown method names exit with the flag named."""
  run = lambda v: {"last_val": v, "best_val": v + 1.0, "test": 2.0 * v}
  root = str(tmp_path)
  ex.write_summary(root, {"seeds": "0,1"}, {"a": [run(1.0), run(3.0)]}, {"a_seed0": 5.0})
  stats = ex.write_summary(root, {"seeds": "0"}, {"b": [run(10.0)]}, {"b_seed0": 7.0})
  assert stats["a"]["last_val"] == pytest.approx((2.0, 2.0 ** 0.5))  # values 1, 3
  assert stats["a"]["test"] == pytest.approx((4.0, 2.0 * 2.0 ** 0.5))  # values 2, 6
  assert stats["b"]["best_val"] == (11.0, 0.0)
  rows = ex.table(stats, reference_rows={"teacher": run(80.0)})
  assert rows[2] == "| teacher | 80.00 | 81.00 | 160.00 |"
  assert rows[3] == "| a | 2.00 ± 1.41 | 3.00 ± 1.41 | 4.00 ± 2.83 |"
  with open(os.path.join(root, "summary.json")) as f:
    saved = json.load(f)
  assert sorted(saved["runs"]) == ["a", "b"] and saved["wall_seconds"] == {"a_seed0": 5.0, "b_seed0": 7.0}
  with pytest.raises(SystemExit):
    ex.parse_names(argparse.ArgumentParser(), "--methods", "a,zz", ("a", "b"))


def test_stagewise_phase_epochs_scale_lengthens_every_phase():
  spec = importlib.util.spec_from_file_location(
      "stagewise_experiment", os.path.join(ROOT, "launch", "stagewise_experiment.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = argparse.Namespace(runlocal=False, num_train_examples=10000, root="/tmp/unused",
                            phase_epochs_scale=1.0)
  base = module.method_config(args, "stagewise", seed=0)
  args.phase_epochs_scale = 4.0
  longer = module.method_config(args, "stagewise", seed=0)
  assert [p["epochs"] for p in base.phases] == [0.5, 0.5, 0.5, 0.5, 1.0]
  assert [p["epochs"] for p in longer.phases] == [2.0, 2.0, 2.0, 2.0, 4.0]
  assert (base.num_epochs, longer.num_epochs) == (3.0, 12.0)
  assert [p["train"] for p in longer.phases] == [p["train"] for p in base.phases]
