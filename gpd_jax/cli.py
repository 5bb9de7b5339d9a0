"""What the launchers share: flags parsed into a fresh ``FlagValues`` per call, and errors reported.

An expected mistake (a bad config field or file, a bad workdir, a damaged checkpoint or export, a
missing dataset, a NaN loss) prints one ``error: ...`` line per problem (what, which field or file,
the fix) and returns exit code 1 (2 for a bad command line); ``--debug`` adds the traceback. Any
other exception keeps its traceback: it is a bug, not a mistake in the input.

Each launcher's ``main(argv) -> int`` is callable from tests; ``run_cli(main)`` is its ``__main__``.
"""
from __future__ import annotations

import difflib
import logging
import re
import sys
import traceback
from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from gpd_jax import checkpoint, data, interop, train, validate

EXPECTED_ERRORS = (validate.ConfigError, checkpoint.CheckpointMismatchError,
                   checkpoint.CheckpointCorruptError, checkpoint.ExportError,
                   checkpoint.NonFiniteStateError, data.DatasetNotReadyError,
                   train.NonFiniteLossError, interop.WeightFileError,
                   interop.StateDictMismatchError)


class UsageError(Exception):
  """A bad command line (unknown flag, missing flag, bad value)."""


def print_error(message: str) -> None:
  for line in str(message).strip().splitlines() or [""]:
    print(f"error: {line}", file=sys.stderr, flush=True)


def define_config_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  """``--config`` (with the ``--config.field=value`` overrides found in ``argv``) and ``--debug``."""
  config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).",
                                  flag_values=flag_values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_bool("debug", False, "Show the traceback of expected errors too.",
                    flag_values=flag_values)


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv``, before absl parses it."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f"--{name}="):
      return arg[len(name) + 3:]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_field(field: str) -> str:
  parent, _, last = field.rpartition(".")
  siblings = {f.rpartition(".")[2]: f for f in validate.FIELDS if f.rpartition(".")[0] == parent}
  close = difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.7)
  suggestion = f"; did you mean --config.{siblings[close[0]]}?" if close else ""
  return (f"--config.{field}: config.{field} is not a config field{suggestion} (the fields are "
          "listed in gpd_jax/config_base.py); fix the name")


def _check_overrides(config, argv: list[str]) -> None:
  """Every ``--config.a.b=value`` names an existing field of ``config``."""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    field = arg[len("--config."):].partition("=")[0]
    node = config
    for part in field.split("."):
      try:
        node = node[part]
      except (KeyError, AttributeError, TypeError, IndexError):
        raise UsageError(_unknown_field(field)) from None


def parse(flag_values: flags.FlagValues, argv: list[str]) -> None:
  """Parses ``argv`` into ``flag_values``; raises UsageError or ConfigError with one clear line."""
  spec = flag_value(argv, "config")
  if spec:  # load it ourselves first: clear errors for a missing or broken file or a bad argument
    try:
      config = train.load_config_file(spec)
    except validate.ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise validate.ConfigError(f"--config={spec}: get_config failed ({type(e).__name__}: {e}); fix "
                                 "the config file or its argument") from None
    _check_overrides(config, argv)
  try:
    rest = flag_values(argv)
  except flags.UnrecognizedFlagError as e:
    close = difflib.get_close_matches(e.flagname, list(flag_values), n=1)
    suggestion = f"; did you mean --{close[0]}?" if close else ""
    raise UsageError(f"unknown flag --{e.flagname}{suggestion}; run with --help for the flags") from None
  except flags.IllegalFlagValueError as e:
    missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
    if missing:
      raise UsageError(f"--{missing.group(1)} is required; give --{missing.group(1)}=...") from None
    raise UsageError(" ".join(str(e).split()) + "; give a value of the flag's type") from None
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    raise UsageError(" ".join(str(e).split()) + "; give a value of the flag's type") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]}; every option is a --flag=value")


def run(argv: list[str], flag_values: flags.FlagValues, body: Callable[[], None]) -> int:
  """Parses ``argv`` and runs ``body``; returns the exit code (0, 1 expected error, 2 usage)."""
  debug = "--debug" in argv
  if not debug:
    # Library chatter (no TPU found, OpenCV missing, orbax notes) buries the run's own output; our
    # messages are printed, not logged. --debug keeps the libraries' logs.
    for name in ("", "absl"):
      logging.getLogger(name).setLevel(logging.ERROR)
  try:
    parse(flag_values, argv)
    body()
  except UsageError as e:
    if debug:
      traceback.print_exc()
    print_error(e)
    return 2
  except EXPECTED_ERRORS as e:
    if debug:
      traceback.print_exc()
    print_error(e)
    return 1
  return 0


def run_cli(main: Callable[[list[str]], int]) -> None:
  """``app.run`` for a ``main(argv) -> int`` that parses its own flags (absl's own stay default)."""
  def parse_nothing(argv):
    flags.FLAGS([argv[0]])
    return argv
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_nothing)
