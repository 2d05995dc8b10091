"""Why a demo run gained or lost P on a bucket: where the first answer token's probability mass goes.

    python -m experiments.demo_diagnose --workroot /tmp/tsallis_demo/default [--runs garl_q0.0_s0,garl_q1.0_s0]

For each run folder (written by `python -m experiments.demo`) and for the pretrained model, the gold rationale and
`</think>` of every test prompt are teacher-forced, and the model's distribution over the first answer value is split
into: the gold value (the prompt's own bucket map), the value that each *other* bucket's map gives to the same
partial result, and the identity map of the pretraining source tasks. A bucket whose P fell while another bucket's was
learned puts its mass on that other bucket's map (interference through the shared layers). Prints one table.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def first_answer_distribution(graphdef, params, records, tokenizer, max_len: int = 48) -> np.ndarray:
  """p(first answer token | x, gold rationale, `</think>`) over the vocabulary, one row per record."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tsallis_jax.data import prompts
  from tsallis_jax.model import make_attention_mask, make_positions
  close = tokenizer.convert_tokens_to_ids("</think>")
  tokens = np.full((len(records), max_len), tokenizer.pad_token_id, np.int32)
  where = np.zeros(len(records), np.int32)
  for i, r in enumerate(records):
    ids, _ = prompts.sft_example(r, tokenizer, style="cold")
    tokens[i, :len(ids)] = ids
    where[i] = ids.index(close)  # the logits here predict the first answer token
  pad = jnp.ones(tokens.shape, bool)  # right padding under a causal mask
  logits, _ = nnx.merge(graphdef, params)(jnp.asarray(tokens), make_positions(pad), make_attention_mask(pad))
  logits = np.asarray(jax.device_get(logits), np.float64)[np.arange(len(records)), where]
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  return probs / probs.sum(axis=1, keepdims=True)


def mass_by_map(probs: np.ndarray, records, mix, tokenizer) -> dict[str, dict[str, float]]:
  """Per bucket: mean probability of the gold value, of each other bucket map's value, and of the identity's."""
  from tsallis_jax.data import synthetic
  out = {}
  for b, target in zip(mix.buckets, mix.targets):
    rows = [i for i, r in enumerate(records) if r.dataset.endswith("/" + b)]
    cells = {name: [] for name in ["gold", "identity", *[o for o in mix.buckets if o != b]]}
    for i in rows:
      r = records[i]
      words = r.question.split()
      steps = tuple((op, int(x)) for op, x in zip(words[3::2], words[4::2]))
      partials, _ = synthetic.solve(target, int(words[2]), steps)
      v = partials[-target.answer_len]  # the partial result the first answer value maps

      def p(value):
        return probs[i, tokenizer.convert_tokens_to_ids(str(value))]

      cells["gold"].append(p(target.map_value(v)))
      cells["identity"].append(p(v))
      for o, other in zip(mix.buckets, mix.targets):
        if o != b:
          cells[o].append(p(other.map_value(v)))
    out[b] = {k: float(np.mean(v)) for k, v in cells.items()}
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.demo_diagnose", description=__doc__.splitlines()[0])
  parser.add_argument("--workroot", default="/tmp/tsallis_demo/default")
  parser.add_argument("--runs", default="grpo_qNone_s0,garl_q0.0_s0,garl_q0.5_s0,garl_q1.0_s0")
  args = parser.parse_args(argv)
  from flax import nnx

  from experiments.configs import demo as demo_cfg
  from tsallis_jax.model import Transformer
  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train.config import model_spec
  from tsallis_jax.train import checkpoint as ckpt_lib
  from tsallis_jax.train import export, tasks
  from tsallis_jax.train.state import pure
  cfg = demo_cfg.get_config()
  mix, _ = tasks.synthetic_target(cfg)
  task = tasks.build_task(cfg)
  mcfg = preset_config(model_spec(cfg), vocab_size=len(task.tokenizer))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
  abstract = pure(abstract)
  models = {"pretrained": ckpt_lib.load_params(demo_cfg.DEMO_INIT, abstract)}
  for name in args.runs.split(","):
    _, state_dir = export._step_dir(os.path.join(args.workroot, name), best=False)
    models[name] = export.restore_params(state_dir, abstract)
  print("first answer value: mean probability on the gold value / the other buckets' maps' values / the identity map's"
        " (chance: 0.10 each)")
  print(f"| model | {' | '.join(mix.buckets)} |")
  print("|---|" + "---|" * len(mix.buckets))
  for name, params in models.items():
    probs = first_answer_distribution(graphdef, params, task.test, task.tokenizer)
    mass = mass_by_map(probs, task.test, mix, task.tokenizer)
    cells = []
    for b in mix.buckets:
      others = " ".join(f"{o} {mass[b][o]:.2f}" for o in mix.buckets if o != b)
      cells.append(f"gold {mass[b]['gold']:.2f}; {others}; id {mass[b]['identity']:.2f}")
    print(f"| {name} | {' | '.join(cells)} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
