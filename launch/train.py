"""Trains per a config file: ``python launch/train.py --config=configs/x.py[:arg] --workdir=W``.

Resumes from ``W/checkpoints`` when it holds a checkpoint. Override fields on the command line,
e.g. ``--config.num_epochs=3 --config.gpd.ratio=3``.
"""
import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gpd_jax import data
from gpd_jax.checkpoint import CheckpointMismatchError
from gpd_jax.train import NonFiniteLossError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, NonFiniteLossError, data.DatasetNotReadyError,
          CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
