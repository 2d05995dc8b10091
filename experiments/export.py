"""Export a training run as a Hugging Face folder: `python -m experiments.export --workdir DIR --out DIR`.

Options: `--best` (the best-by-validation checkpoint instead of the newest), `--dtype bfloat16` (halves the files;
default: the trained float32), `--max-shard-size 5GB` (above it: shards + model.safetensors.index.json),
`--push-to-hub ORG/NAME` (uploads the folder with `huggingface_hub`; needs `hf auth login` or HF_TOKEN).
The folder loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer`, and as
`--set model=hf --set model_path=DIR` here. What is written: tsallis_jax/train/export.py.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the run folder (config.json, checkpoints/, best/)")
  parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
  parser.add_argument("--best", action="store_true", help="export workdir/best (best validation maj@k)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="stored dtype (default: the parameters' dtype)")
  parser.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
  parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="upload the folder to this Hub repo")
  parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push-to-hub)")
  args = parser.parse_args(argv)

  from tsallis_jax.errors import InputError
  from tsallis_jax.train.export import export_workdir, push_to_hub
  try:
    folder, step = export_workdir(args.workdir, args.out, best=args.best, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size)
  except InputError as e:  # ExportError, ConfigError, a missing model or tokenizer file, ...
    print(f"export error: {e}", file=sys.stderr)
    return 2
  print(f"exported step {step} of {args.workdir} ({'best' if args.best else 'latest'}) to {folder}")
  if args.push_to_hub:
    push_to_hub(folder, args.push_to_hub, private=args.private,
                commit_message=f"tsallis_jax export of step {step} ({'best' if args.best else 'latest'})")
    print(f"uploaded {folder} to https://huggingface.co/{args.push_to_hub}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
