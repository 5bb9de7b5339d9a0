"""Trains per a config file: ``python launch/train.py --config=configs/x.py[:arg] --workdir=W``.

Resumes from ``W/checkpoints`` when it holds a checkpoint; a finished run is left as it is. Override
fields on the command line, e.g. ``--config.num_epochs=3 --config.gpd.ratio=3``. Everything is
checked before any work; a mistake prints ``error: ...`` (the field or file and the fix) and exits
non-zero (``--debug`` adds the traceback).
"""

from absl import flags

from gpd_jax import cli
from gpd_jax.train import train_and_evaluate


def main(argv: list[str]) -> int:
  """The launcher with its own flags: ``main(['train.py', '--config=...', '--workdir=...'])``."""
  fv = flags.FlagValues()
  cli.define_config_flags(fv, argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.",
                      flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  return cli.run(argv, fv, lambda: train_and_evaluate(fv.config, fv.workdir))


if __name__ == "__main__":
  cli.run_cli(main)
