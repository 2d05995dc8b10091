"""The training CLI: `python -m experiments.train --config NAME --workdir DIR [--set key=value ...]`.

NAME is a module of `experiments/configs/` (its docstring gives the command, the expected runtime and result)
or the path of a .py file that defines `get_config()`.
`--set` overrides any `TrainConfig` key (unknown keys and impossible values are errors that list the valid ones).
On a multi-host job every process runs this same command (see tsallis_jax/distributed.py); a workdir that holds a
checkpoint is resumed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="a module name under experiments/configs (e.g. demo) or a .py file defining get_config()")
  parser.add_argument("--workdir", required=True, help="run folder: checkpoints, metrics.jsonl, tb/, results.json")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = parser.parse_args(argv)

  # Multi-host start-up must happen before anything touches a JAX backend.
  from tsallis_jax import distributed
  distributed.maybe_initialize()
  logging.basicConfig(level=logging.INFO if distributed.is_main_process() else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
  from tsallis_jax.train import ConfigError, load_config, train_and_evaluate
  try:
    cfg = load_config(args.config, args.set)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=1))
    return 0
  results = train_and_evaluate(cfg, args.workdir)
  if distributed.is_main_process():
    print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
