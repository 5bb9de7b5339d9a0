"""Evaluates a checkpoint or an exported plain model on the config's eval and test splits.

    python launch/eval.py --workdir=W            # latest checkpoint, with the run's W/config.json
    python launch/eval.py --export=W/export      # a plain student of run W (reads W/config.json)
    python launch/eval.py --config=configs/fashion_mnist_gpd.py --export=path/to/export

``--config`` is needed only when the run's ``config.json`` is not there (an export copied
elsewhere, a run made before configs were saved); ``--config.x=y`` overrides work either way.

With a checkpoint: the student (view), the DT, the static teacher and the EMA weights; with an
export: the plain model alone. ``--split=test`` evaluates one split (a key or a tfds split spec).
Read-only: it never trains, creates, moves or deletes anything (a damaged newest checkpoint is
reported and the newest intact one evaluated).
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from gpd_jax import cli
from gpd_jax.train import CONFIG_FILE, evaluate_checkpoint, evaluate_export, load_saved_config


def _saved_run_dir(argv: list[str]) -> str | None:
  """The run directory whose config.json stands in for --config: --workdir itself, or the run
  an --export belongs to (the export's parent directory)."""
  workdir, export = cli.flag_value(argv, "workdir"), cli.flag_value(argv, "export")
  candidates = [workdir] if workdir else []
  if export:
    export = os.path.abspath(export)
    candidates += [export, os.path.dirname(export)]
  for directory in candidates:
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
      return directory
  return None


def main(argv: list[str]) -> int:
  """The launcher with its own flags: ``main(['eval.py', '--config=...', '--workdir=...'])``."""
  fv = flags.FlagValues()
  saved = None if cli.flag_value(argv, "config") else _saved_run_dir(argv)
  if saved:
    # The run's own config: overrides (--config.x=y) still apply; nothing is trained or written.
    config_flags.DEFINE_config_dict("config", load_saved_config(saved), "The run's config.json.",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_bool("debug", False, "Show the traceback of expected errors too.", flag_values=fv)
  else:
    cli.define_config_flags(fv, argv)
  flags.DEFINE_string("workdir", None, "A training workdir: evaluate its latest checkpoint.",
                      flag_values=fv)
  flags.DEFINE_string("export", None, "An export directory (or a workdir's export).", flag_values=fv)
  flags.DEFINE_string("split", None, "Evaluate only this split (default: eval + test).",
                      flag_values=fv)

  def body():
    if bool(fv.workdir) == bool(fv.export):
      raise cli.UsageError("give exactly one of --workdir (a checkpoint) and --export (a plain model)")
    if fv.config is None:
      where = fv.workdir or fv.export
      raise cli.UsageError(f"--config is required: {where} holds no {CONFIG_FILE} of its run; give "
                           "--config=configs/<the run's config>.py")
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
