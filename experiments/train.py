"""The training CLI: `python -m experiments.train --config NAME --workdir DIR [--set key=value ...]`.

NAME is a module of `experiments/configs/` (its docstring gives the command, the expected runtime and result)
or the path of a .py file that defines `get_config()`.
`--set` overrides any `TrainConfig` key (unknown keys and impossible values are errors that list the valid ones).
On a multi-host job every process runs this same command (see tsallis_jax/distributed.py); a workdir that holds a
checkpoint is resumed.

Exit status: 0 done; 2 a bad input (`tsallis_jax.errors.InputError`: config key, task, data folder or record, model
or tokenizer file, prompt budget, a workdir that is locked or cannot be written), printed as one line
(`config error: ...` or `error: ...`), no traceback; 75 preempted (SIGTERM, or JAX's preemption sync point on a
multi-host job): a checkpoint of the current step was saved and the same command resumes it (`launch/host.sh` and
`launch.tpu up --retries` treat 75 as "run again"); 1 a failed checkpoint save (one line; earlier checkpoints are
kept) or a bug (traceback).
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

  # Before anything touches a JAX backend: the host allocator (CPU backends; tsallis_jax/host_memory.py), then
  # multi-host start-up.
  from tsallis_jax import distributed, host_memory
  host_memory.keep_freed_memory()
  distributed.maybe_initialize()
  logging.basicConfig(level=logging.INFO if distributed.is_main_process() else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
  from tsallis_jax.errors import InputError
  from tsallis_jax.train import ConfigError, load_config, train_and_evaluate
  from tsallis_jax.train.checkpoint import CheckpointSaveError
  from tsallis_jax.train.preemption import PREEMPTED_EXIT_STATUS, Preempted

  def one_line(prefix: str, error: BaseException, status: int) -> int:
    print(f"{prefix}: " + " ".join(str(error).split()), file=sys.stderr)
    return status

  try:
    cfg = load_config(args.config, args.set)
    if args.print_config:
      print(json.dumps(cfg.to_dict(), indent=1))
      return 0
    results = train_and_evaluate(cfg, args.workdir)
  except ConfigError as e:
    return one_line("config error", e, 2)
  except InputError as e:
    return one_line("error", e, 2)
  except Preempted as e:
    return one_line("preempted", e, PREEMPTED_EXIT_STATUS)
  except CheckpointSaveError as e:
    return one_line("error", e, 1)
  if distributed.is_main_process():
    print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
