"""What a run leaves behind and says: config.json (read by eval.py), the best-by-select_metric
export next to the last one, and the end-of-run table."""
import json
import os
import sys

import numpy as np
import pytest

from gpd_jax import checkpoint, train
from gpd_jax.metric_writer import read_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "launch"))
import eval as eval_launcher  # noqa: E402  (launch/eval.py)
from test_train import make_teacher, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A 4-step GPD run evaluated after every step, selecting by the static teacher's top-1: that
  never improves after the first evaluation, so the best export is the step-1 student."""
  workdir = str(tmp_path_factory.mktemp("run"))
  make_teacher(workdir)
  config = tiny_config(steps=4)
  config.eval_every_epochs = 0.25  # 4 steps per epoch: evaluate after every step
  config.select_metric = "top1_T"
  final = train.train_and_evaluate(config, workdir)
  return workdir, config, final


def test_config_json_is_the_run_config(finished):
  workdir, config, _ = finished
  saved = train.load_saved_config(workdir)
  assert saved.model.kwargs.widths == (4, 4, 8, 8)  # JSON lists come back as tuples
  assert saved.to_dict() == train.load_saved_config(workdir).to_dict()
  assert json.loads(config.to_json_best_effort()) == json.loads(saved.to_json_best_effort())


def test_best_export_is_the_student_at_the_best_step(finished):
  workdir, config, final = finished
  assert final["best_step"] == 1  # top1_T is constant: only the first evaluation improves it
  evals = {r["step"]: r for r in read_metrics(workdir, "eval/val")}
  assert sorted(evals) == [1, 2, 3, 4]
  best = train.evaluate_export(config, os.path.join(workdir, "export_best"), {"val": "validation"})
  last = train.evaluate_export(config, os.path.join(workdir, "export"), {"val": "validation"})
  # Each export scores what its training-time student view scored at its step.
  np.testing.assert_allclose(best["val"]["ce"], evals[1]["ce_S"], rtol=1e-5)
  np.testing.assert_allclose(last["val"]["ce"], evals[4]["ce_S"], rtol=1e-5)
  assert best["val"]["ce"] != last["val"]["ce"]
  _, best_vars, _ = checkpoint.load_export(os.path.join(workdir, "export_best"))
  _, last_vars, _ = checkpoint.load_export(os.path.join(workdir, "export"))
  assert not np.array_equal(np.asarray(best_vars["params"]["fc"]["kernel"]),
                            np.asarray(last_vars["params"]["fc"]["kernel"]))


def test_eval_launcher_reads_the_saved_config(finished, capsys):
  workdir, config, final = finished
  capsys.readouterr()
  assert eval_launcher.main(["eval.py", f"--workdir={workdir}"]) == 0
  results = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after "evaluating step 4"
  np.testing.assert_allclose(results["val"]["top1_S"], final["eval"]["val"]["top1_S"])
  np.testing.assert_allclose(results["val"]["ce_D"], final["eval"]["val"]["ce_D"], rtol=1e-6)
  # An export of the run finds the config in the run's directory; overrides still apply.
  assert eval_launcher.main(["eval.py", f"--export={workdir}/export_best",
                             "--config.eval_batch_size=4"]) == 0
  results = json.loads(capsys.readouterr().out)
  evals = {r["step"]: r for r in read_metrics(workdir, "eval/val")}
  np.testing.assert_allclose(results["val"]["ce"], evals[1]["ce_S"], rtol=1e-5)


def test_eval_launcher_without_any_config_says_so(tmp_path, capsys):
  assert eval_launcher.main(["eval.py", f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "--config is required" in err and "config.json" in err
  assert os.listdir(tmp_path) == []


def test_end_of_run_report_is_printed(tmp_path, capsys):
  make_teacher(str(tmp_path))
  config = tiny_config(steps=2)
  config.dataset.test_splits = {"test": "validation[:8]"}
  train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "gpd_jax: done at step 2 (epoch 0.50); training took" in out
  lines = out.splitlines()
  header = next(line for line in lines if "val top-1" in line)
  assert "test top-1" in header
  for row in ("student ", "student (EMA)", "dynamic teacher ", "static teacher"):
    assert any(line.startswith(row) for line in lines), row
  assert f"  last  {tmp_path}/export" in lines and f"  ema   {tmp_path}/export_ema" in lines
  assert f"  best  {tmp_path}/export_best" in lines
  assert "model selection: best top1_S" in out
