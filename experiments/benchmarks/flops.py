"""Model FLOPs of one benchmark step, counted from the shapes (the numerator of the FLOP utilisation).

The count is of the work the workload defines, the same for every system (so a system that skips work, e.g. this
project's sampler prefilling each prompt once instead of G times, gets no credit for the skipped FLOPs, and one that
recomputes gets none for the extra):

  rollout         prefill N rows x P prompt tokens (no LM head) + max_new decode steps of N rows (LM head each step),
                  attending over the tokens so far
  reference       one forward of N x (P + T) tokens, the LM head only at the T completion positions (beta > 0)
  policy          forward + backward = 3 x one such forward

`update_shared` is the update's count as this project's step runs it by default (`TrainConfig.share_prompt_forward`:
each prompt's positions once for its G samples, B x P + N x T positions per forward): the numerator of its update
FLOP rate, which measures the hardware's use, not the work saved.

Per token and layer a forward costs 2 (D E (2H + 2K) + 3 D F) matmul FLOPs plus 4 H E c for attention over c keys;
the LM head costs 2 D V. Norms, softmax, RoPE and the optimizer are not counted (they are O(params), not O(tokens x
params)).

`step_floor_s` / `sample_floor_s` turn these into a roofline: the least time any system can take on a machine with
a measured matmul peak and memory read bandwidth (`matmul_peak.py` measures both). A decode step is bound by the
larger of its FLOPs at the peak and its weights' bytes at the bandwidth (every weight is read once per step, whatever
the batch); prefill and the train forward/backward by FLOPs; AdamW by bandwidth (it reads parameters, gradients and
both moments and writes three of them: 7 float32 passes over the parameters).
"""
from __future__ import annotations

from typing import Any, Mapping


#: The Hugging Face config keys these counts read.
HF_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "vocab_size", "tie_word_embeddings")


def _shapes(hf: Mapping[str, Any]) -> dict[str, int]:
  heads = hf["num_attention_heads"]
  return dict(L=hf["num_hidden_layers"], D=hf["hidden_size"], F=hf["intermediate_size"], H=heads,
              K=hf.get("num_key_value_heads") or heads, E=hf.get("head_dim") or hf["hidden_size"] // heads,
              V=hf["vocab_size"])


def token_flops(hf: Mapping[str, Any], context: float, lm_head: bool) -> float:
  """Forward FLOPs of one token that attends over `context` keys, with or without the LM head."""
  s = _shapes(hf)
  per_layer = 2 * s["D"] * s["E"] * (2 * s["H"] + 2 * s["K"]) + 6 * s["D"] * s["F"] + 4 * s["H"] * s["E"] * context
  return s["L"] * per_layer + (2 * s["D"] * s["V"] if lm_head else 0.0)


def sequence_forward_flops(hf: Mapping[str, Any], length: int, head_positions: int) -> float:
  """Forward FLOPs of one causal sequence of `length` tokens with the LM head at `head_positions` of them."""
  s = _shapes(hf)
  body = sum(token_flops(hf, t + 1, lm_head=False) for t in range(length))
  return body + head_positions * 2 * s["D"] * s["V"]


def shared_prompt_forward_flops(hf: Mapping[str, Any], *, num_prompts: int, num_sequences: int, prompt_len: int,
                                max_new: int) -> float:
  """Forward FLOPs of `num_sequences` = B*G sequences that share their B prompts' passes (`TrainConfig.
  share_prompt_forward`): each prompt's P positions once, each completion's T positions attending over P + t keys,
  the LM head at the T completion positions. With num_prompts == num_sequences it is the full sequences' count."""
  p, t = prompt_len, max_new
  prompt = sum(token_flops(hf, i + 1, lm_head=False) for i in range(p))
  completion = sum(token_flops(hf, p + i + 1, lm_head=True) for i in range(t))
  return num_prompts * prompt + num_sequences * completion


def step_flops(hf: Mapping[str, Any], *, num_sequences: int, prompt_len: int, max_new: int,
               beta: float, num_prompts: int | None = None) -> dict[str, float]:
  """FLOPs of one GRPO step by phase: {'rollout', 'reference', 'policy', 'update', 'total'} (update = ref + policy),
  the workload's count for every system. With `num_prompts` also 'update_shared': the update's FLOPs when each
  prompt's forward and backward run once for its G = num_sequences / num_prompts samples (what this project's step
  executes by default; the numerator of its update FLOP rate), and 'total_shared': the whole step's least work
  (that update, and the rollout's prefill once per prompt)."""
  if min(num_sequences, prompt_len, max_new) <= 0:
    raise ValueError(f"step_flops needs positive sizes, got N={num_sequences}, P={prompt_len}, T={max_new}.")
  n, p, t = num_sequences, prompt_len, max_new
  prefill_one = sum(token_flops(hf, i + 1, lm_head=False) for i in range(p - 1))
  prefill = n * prefill_one
  decode = n * sum(token_flops(hf, p + i, lm_head=True) for i in range(t))
  forward = n * sequence_forward_flops(hf, p + t, head_positions=t)
  out = {"rollout": prefill + decode, "reference": forward if beta > 0 else 0.0, "policy": 3 * forward}
  out["update"] = out["reference"] + out["policy"]
  out["total"] = out["rollout"] + out["update"]
  if num_prompts is not None:
    if num_prompts <= 0 or n % num_prompts:
      raise ValueError(f"num_prompts={num_prompts} must divide num_sequences={n} (G samples per prompt).")
    shared = shared_prompt_forward_flops(hf, num_prompts=num_prompts, num_sequences=n, prompt_len=p, max_new=t)
    out["update_shared"] = (shared if beta > 0 else 0.0) + 3 * shared
    # the least work of the whole step: the rollout's prefill once per prompt too
    out["total_shared"] = num_prompts * prefill_one + decode + out["update_shared"]
  return out


def executed_flops(counts: Mapping[str, float], share_prompt_forward: bool = True) -> float:
  """The FLOPs one step of this project's trainer executes, from `step_flops(..., num_prompts=B)`: its rollout
  prefills each prompt once, and with `share_prompt_forward` its update runs each prompt once per group
  ('total_shared'); without, the update runs every full sequence. Counts without 'total_shared' give 'total'."""
  if "total_shared" not in counts:
    return counts["total"]
  if share_prompt_forward:
    return counts["total_shared"]
  return counts["total_shared"] - counts["update_shared"] + counts["update"]


def sample_flops(hf: Mapping[str, Any], *, batch: int, prompt_len: int, max_new: int) -> float:
  """FLOPs of one sampler call: prefill `batch` rows, then `max_new` decode steps."""
  prefill = batch * sum(token_flops(hf, i + 1, lm_head=False) for i in range(prompt_len - 1))
  return prefill + batch * sum(token_flops(hf, prompt_len + i, lm_head=True) for i in range(max_new))


def parameter_count(hf: Mapping[str, Any]) -> int:
  """Parameters of the matmuls and embeddings (norms and biases are O(L D), left out); tied embeddings once."""
  s = _shapes(hf)
  per_layer = s["D"] * s["E"] * (2 * s["H"] + 2 * s["K"]) + 3 * s["D"] * s["F"]
  embed = s["V"] * s["D"] * (1 if hf.get("tie_word_embeddings", False) else 2)
  return s["L"] * per_layer + embed


def _decode_floor_s(hf: Mapping[str, Any], rows: int, prompt_len: int, max_new: int, peak_gflops: float,
                    bandwidth_gbs: float) -> float:
  weight_s = 4.0 * parameter_count(hf) / bandwidth_gbs / 1e9  # float32 weights streamed once per decode step
  return sum(max(rows * token_flops(hf, prompt_len + i, lm_head=True) / peak_gflops / 1e9, weight_s)
             for i in range(max_new))


def step_floor_s(hf: Mapping[str, Any], *, num_prompts: int, num_sequences: int, prompt_len: int, max_new: int,
                 beta: float, peak_gflops: float, bandwidth_gbs: float) -> dict[str, float]:
  """The roofline of one GRPO step in seconds by phase: {'rollout', 'update', 'total'} (see the module docstring).
  The least work: the rollout prefills each of the `num_prompts` prompts once, and the update runs each prompt's
  forward and backward once for its G samples ('update_shared' of `step_flops`)."""
  f = step_flops(hf, num_sequences=num_sequences, prompt_len=prompt_len, max_new=max_new, beta=beta,
                 num_prompts=num_prompts)
  prefill = num_prompts * sum(token_flops(hf, i + 1, lm_head=False) for i in range(prompt_len - 1))
  rollout = prefill / peak_gflops / 1e9 + _decode_floor_s(hf, num_sequences, prompt_len, max_new, peak_gflops,
                                                          bandwidth_gbs)
  update = f["update_shared"] / peak_gflops / 1e9 + 7 * 4.0 * parameter_count(hf) / bandwidth_gbs / 1e9
  return {"rollout": rollout, "update": update, "total": rollout + update}


def sample_floor_s(hf: Mapping[str, Any], *, batch: int, prompt_len: int, max_new: int, peak_gflops: float,
                   bandwidth_gbs: float) -> float:
  """The roofline of one sampler call (every row prefilled, then `max_new` decode steps) in seconds."""
  prefill = batch * sum(token_flops(hf, i + 1, lm_head=False) for i in range(prompt_len - 1))
  return prefill / peak_gflops / 1e9 + _decode_floor_s(hf, batch, prompt_len, max_new, peak_gflops, bandwidth_gbs)
