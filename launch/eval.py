"""Evaluates a checkpoint or an exported plain model on the config's eval and test splits.

    python launch/eval.py --config=configs/fashion_mnist_gpd.py --workdir=W        # latest checkpoint
    python launch/eval.py --config=configs/fashion_mnist_gpd.py --export=W/export  # plain student

With a checkpoint: the student (view), the DT, the static teacher and the EMA weights; with an
export: the plain model alone. ``--split=test`` evaluates one split (a key or a tfds split spec).
Read-only: it never trains, creates, moves or deletes anything (a damaged newest checkpoint is
reported and the newest intact one evaluated).
"""
import json
import logging

from absl import flags

from gpd_jax import cli
from gpd_jax.train import evaluate_checkpoint, evaluate_export


def main(argv: list[str]) -> int:
  """The launcher with its own flags: ``main(['eval.py', '--config=...', '--workdir=...'])``."""
  fv = flags.FlagValues()
  cli.define_config_flags(fv, argv)
  flags.DEFINE_string("workdir", None, "A training workdir: evaluate its latest checkpoint.",
                      flag_values=fv)
  flags.DEFINE_string("export", None, "An export directory (or a workdir's export).", flag_values=fv)
  flags.DEFINE_string("split", None, "Evaluate only this split (default: eval + test).",
                      flag_values=fv)
  flags.mark_flags_as_required(["config"], flag_values=fv)
  logging.getLogger("absl").setLevel(logging.WARNING)

  def body():
    if bool(fv.workdir) == bool(fv.export):
      raise cli.UsageError("give exactly one of --workdir (a checkpoint) and --export (a plain model)")
    config = fv.config
    splits = None
    if fv.split:
      named = {**dict(config.dataset.eval_splits), **dict(config.dataset.test_splits)}
      splits = {fv.split: named.get(fv.split, fv.split)}
    if fv.export:
      results = evaluate_export(config, fv.export, splits)
    else:
      results = evaluate_checkpoint(config, fv.workdir, splits)
    print(json.dumps(results, indent=2, sort_keys=True))

  return cli.run(argv, fv, body)


if __name__ == "__main__":
  cli.run_cli(main)
