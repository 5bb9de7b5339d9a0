"""Progress reporting counts finished steps, writes plain lines to a log, excludes eval time; the
end-of-run report shows the accuracy table, the exports and a loading snippet."""
import io

import pytest

from gpd_jax import progress as progress_lib
from gpd_jax import report


class FakeStepOutput:
  """A step's output whose readiness the test observes (jax.block_until_ready calls this)."""

  def __init__(self, log, index):
    self.log, self.index = log, index

  def block_until_ready(self):
    self.log.append(self.index)
    return self


def test_advances_only_on_finished_steps():
  waited = []
  p = progress_lib.Progress(10, 0, stream=io.StringIO(), interactive=False, max_in_flight=2)
  for i in range(5):
    p.dispatched(FakeStepOutput(waited, i))
    # At most two steps in flight; every counted step was waited for, in order.
    assert p.finished_step == max(0, i + 1 - 2)
    assert waited == list(range(p.finished_step))
  p.wait_all()
  assert p.finished_step == 5 and waited == [0, 1, 2, 3, 4]


def test_resumed_run_starts_at_its_step():
  p = progress_lib.Progress(10, 6, stream=io.StringIO(), interactive=False)
  p.dispatched(FakeStepOutput([], 0))
  p.wait_all()
  assert p.finished_step == 7


def test_plain_lines_when_not_a_terminal():
  stream = io.StringIO()
  p = progress_lib.Progress(8, 0, stream=stream, interactive=False)
  p.log(4, {"total": 1.25, "lr": 0.05, "images_per_sec": 100.0, "seconds_per_step": 2.0},
        epoch=0.5)
  p.write("a message")
  p.close()
  out = stream.getvalue()
  assert "\r" not in out
  lines = out.splitlines()
  assert lines[0].startswith("step 4/8 (50%) epoch 0.50 loss 1.2500 lr 0.05 100 img/s")
  assert lines[0].endswith("ETA 8.0 s")  # 4 steps left at 2 s each
  assert lines[1] == "a message"


def test_bar_in_a_terminal_writes_messages_above_it():
  stream = io.StringIO()
  p = progress_lib.Progress(4, 0, stream=stream, interactive=True)
  p.dispatched(FakeStepOutput([], 0))
  p.wait_all()
  p.write("hello")
  p.close()
  out = stream.getvalue()
  assert "hello" in out and "train" in out and "1/4" in out


def test_disabled_process_prints_nothing_but_still_waits():
  stream, waited = io.StringIO(), []
  p = progress_lib.Progress(4, 0, enabled=False, stream=stream, interactive=False)
  p.dispatched(FakeStepOutput(waited, 0))
  p.wait_all()
  p.write("x")
  p.log(1, {"total": 1.0, "lr": 0.1}, epoch=0.1)
  assert waited == [0] and stream.getvalue() == ""


def test_eval_and_compile_time_excluded_from_the_window(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
  p = progress_lib.Progress(4, 0, stream=io.StringIO(), interactive=False)
  clock[0] += 2.0  # training
  with p.timed("compiling the train step"):
    clock[0] += 30.0
  for _ in p.eval_batches(range(3), desc="eval"):
    clock[0] += 1.0  # 3 s of evaluation
  clock[0] += 1.0  # training
  assert p.window_seconds() == pytest.approx(3.0)
  p.log(2, {"total": 1.0, "lr": 0.1}, epoch=0.5)
  clock[0] += 0.5
  assert p.window_seconds() == pytest.approx(0.5)  # a new window after log


def test_timed_says_what_and_how_long(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
  stream = io.StringIO()
  p = progress_lib.Progress(4, 0, stream=stream, interactive=False)
  with p.timed("compiling the train step"):
    clock[0] += 75.0
  assert stream.getvalue().splitlines() == ["compiling the train step …",
                                            "compiling the train step: done in 1 min 15 s"]


@pytest.mark.parametrize("seconds,text", [(3.14, "3.1 s"), (75, "1 min 15 s"),
                                          (7300, "2 h 1 min")])
def test_format_duration(seconds, text):
  assert progress_lib.format_duration(seconds) == text


def test_end_of_run_report():
  results = {"val": {"top1_S": 71.5, "top1_D": 73.25, "top1_T": 80.0, "top1_S_ema": 72.0},
             "test": {"top1_S": 70.125, "top1_D": 72.0, "top1_T": 79.5}}
  text = report.end_of_run(step=32, epoch=2.0, seconds=83.0, results=results,
                           best=("top1_S", 72.5, 16),
                           exports={"last": "/w/export", "best": "/w/export_best"})
  lines = text.splitlines()
  assert lines[0] == "gpd_jax: done at step 32 (epoch 2.00); training took 1 min 23 s."
  row = {line.split("  ")[0].strip(): line.split() for line in lines if line[:1].isalpha()}
  assert row["student"][-2:] == ["71.50", "70.12"]
  assert row["student (EMA)"][-2:] == ["72.00", "—"]
  assert row["dynamic teacher"][-2:] == ["73.25", "72.00"]
  assert row["static teacher"][-2:] == ["80.00", "79.50"]
  assert "val top-1" in lines[2] and "test top-1" in lines[2]
  assert "model selection: best top1_S = 72.50 at step 16" in lines
  assert "  best  /w/export_best" in lines
  assert "  module, variables, info = gpd_jax.checkpoint.load_export('/w/export_best')" in lines


def test_end_of_run_report_without_gpd_or_teacher():
  text = report.end_of_run(step=4, epoch=1.0, seconds=None, results={"val": {"top1_S": 50.0}},
                           best=None, exports={"last": "/w/export"})
  assert "dynamic teacher" not in text and "static teacher" not in text
  assert "load_export('/w/export')" in text
