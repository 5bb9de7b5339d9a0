"""Training progress that tells the truth, for a terminal and for a log file.

JAX dispatches steps asynchronously: ``train_step(...)`` returns long before the device has run it.
A bar advanced on dispatch races ahead and then stalls at every host sync. :class:`Progress`
instead keeps the metrics of the steps in flight and advances only for steps whose results are
ready, holding at most ``max_in_flight`` steps ahead of the device (enough to keep it busy).

Output: a tqdm bar when the stream is a terminal; otherwise one plain line per logged window
(no carriage returns filling a log file). Throughput counts training time only: the first step's
compilation and the evaluation passes are timed apart and excluded.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import tqdm


def format_duration(seconds: float) -> str:
  """``75.2 -> '1 min 15 s'``, ``3.1 -> '3.1 s'``, ``7300 -> '2 h 1 min'``."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {secs} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes} min"


class Progress:
  """Progress of one training run over steps ``initial_step .. total_steps``.

  Args:
    total_steps: the run's last step.
    initial_step: the step the run starts (or resumes) from.
    enabled: False on processes other than 0: every method is then a no-op (but still waits for
      in-flight steps, so all processes keep the same pace).
    stream: where to write (default stderr).
    interactive: a tqdm bar (True) or plain lines (False); default: whether ``stream`` is a TTY.
    max_in_flight: how many dispatched steps may be unfinished before the loop waits for one.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True,
               stream=None, interactive: bool | None = None, max_in_flight: int = 2):
    self.total_steps = int(total_steps)
    self.finished_step = int(initial_step)
    self.enabled = enabled
    self.stream = stream if stream is not None else sys.stderr
    if interactive is None:
      isatty = getattr(self.stream, "isatty", None)
      interactive = bool(isatty and isatty())
    self.interactive = interactive
    self.max_in_flight = max(1, int(max_in_flight))
    self._in_flight: collections.deque = collections.deque()
    self._bar = None
    if enabled and interactive:
      self._bar = tqdm.tqdm(total=self.total_steps, initial=self.finished_step, desc="train",
                            file=self.stream, dynamic_ncols=True, smoothing=0.1)
    # Training time only: wall time since the window opened, minus the time spent in evaluation.
    self._window_start = time.perf_counter()
    self._window_excluded = 0.0

  # -- messages --------------------------------------------------------------------------------

  def write(self, message: str) -> None:
    """One line above the bar (or a plain line)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message, file=self.stream)
    else:
      print(message, file=self.stream, flush=True)

  @contextlib.contextmanager
  def timed(self, what: str, *, exclude: bool = True) -> Iterator[None]:
    """Says ``what …`` before the block and how long it took after it; the block's time is
    excluded from the throughput window when ``exclude``."""
    self.write(f"{what} …")
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if exclude:
      self._window_excluded += elapsed
    self.write(f"{what}: done in {format_duration(elapsed)}")

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Excludes the block (a checkpoint, an export) from the throughput window."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._window_excluded += time.perf_counter() - start

  # -- steps -----------------------------------------------------------------------------------

  def dispatched(self, step_output: Any) -> None:
    """Records one dispatched step (its output pytree); waits for the oldest step in flight once
    more than ``max_in_flight`` are unfinished, and advances past every finished one."""
    self._in_flight.append(step_output)
    while len(self._in_flight) > self.max_in_flight:
      self._finish_oldest()

  def wait_all(self) -> None:
    """Waits for every step in flight (before logging, evaluating or checkpointing)."""
    while self._in_flight:
      self._finish_oldest()

  def _finish_oldest(self) -> None:
    jax.block_until_ready(self._in_flight.popleft())
    self.finished_step += 1
    if self._bar is not None:
      self._bar.update(1)

  def window_seconds(self) -> float:
    """Training seconds since the last :meth:`log` (evaluation and compilation excluded)."""
    return max(time.perf_counter() - self._window_start - self._window_excluded, 1e-9)

  def log(self, step: int, means: dict, *, epoch: float) -> None:
    """Shows one logged window (``means`` of the train metrics) and opens the next window."""
    if self.enabled:
      loss, lr = means.get("total", float("nan")), means.get("lr", float("nan"))
      rate = means.get("images_per_sec")
      if self._bar is not None:
        postfix = {"loss": f"{loss:.3f}", "lr": f"{lr:.3g}"}
        if rate is not None:
          postfix["img/s"] = f"{rate:.0f}"
        self._bar.set_postfix(postfix, refresh=True)
      else:
        fraction = step / max(self.total_steps, 1)
        line = (f"step {step}/{self.total_steps} ({100 * fraction:.0f}%) epoch {epoch:.2f} "
                f"loss {loss:.4f} lr {lr:.3g}")
        if rate is not None:
          line += f" {rate:.0f} img/s"
          remaining = (self.total_steps - step) * means.get("seconds_per_step", 0.0)
          if remaining > 0:
            line += f" ETA {format_duration(remaining)}"
        print(line, file=self.stream, flush=True)
    self._window_start = time.perf_counter()
    self._window_excluded = 0.0

  # -- evaluation ------------------------------------------------------------------------------

  def eval_batches(self, batches: Iterable, *, desc: str, total: int | None = None) -> Iterable:
    """Wraps one evaluation pass: a transient bar in a terminal, nothing in a log file. Its time
    is excluded from the throughput window."""
    start = time.perf_counter()
    try:
      if self.enabled and self.interactive:
        yield from tqdm.tqdm(batches, desc=desc, total=total, leave=False, file=self.stream,
                             dynamic_ncols=True)
      else:
        yield from batches
    finally:
      self._window_excluded += time.perf_counter() - start

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
