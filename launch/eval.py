"""Evaluates a checkpoint or an exported plain model on the config's eval and test splits.

    python launch/eval.py --config=configs/fashion_mnist_gpd.py --workdir=W        # latest checkpoint
    python launch/eval.py --config=configs/fashion_mnist_gpd.py --export=W/export  # plain student

With a checkpoint: the student (view), the DT, the static teacher and the EMA weights; with an
export: the plain model alone. ``--split=test`` evaluates one split (a key or a tfds split spec).
"""
import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gpd_jax import data
from gpd_jax.checkpoint import CheckpointMismatchError
from gpd_jax.train import evaluate_checkpoint, evaluate_export

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir: evaluate its latest checkpoint.")
_EXPORT = flags.DEFINE_string("export", None, "An export directory (or a workdir's export).")
_SPLIT = flags.DEFINE_string("split", None, "Evaluate only this split (default: eval + test).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_WORKDIR.value) == bool(_EXPORT.value):
    raise app.UsageError("give exactly one of --workdir (checkpoint) and --export")
  config = _CONFIG.value
  splits = None
  if _SPLIT.value:
    named = {**dict(config.dataset.eval_splits), **dict(config.dataset.test_splits)}
    splits = {_SPLIT.value: named.get(_SPLIT.value, _SPLIT.value)}
  try:
    if _EXPORT.value:
      results = evaluate_export(config, _EXPORT.value, splits)
    else:
      results = evaluate_checkpoint(config, _WORKDIR.value, splits)
  except (ValueError, FileNotFoundError, data.DatasetNotReadyError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
