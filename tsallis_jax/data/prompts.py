"""Cold- and warm-start prompts, the teacher-forced gold answer, and SFT examples (issue 6; spec 1.6, 1.7).

Two prompt styles, as in the paper's experiments (spec 1.7):

* **warm**: a task description and answer-format instructions, then the context and the question, as the user turn
  of the model's chat template (Qwen3 thinking format: the model writes its rationale in `<think>...</think>`, then
  the answer). A record with a `template` (the config key `prompt_template`) is asked with that template instead:
  a Python format string over `{question}`, `{context}` (the linearised, truncated context), `{id}`, `{dataset}` and
  the record's other `columns`, or, prefixed `jinja:`, a Jinja template over the same names (needs `jinja2`).
* **cold**: the linearised input only (context, then question): no description, no format instructions. The gold
  output is the bare answer string.

Rendering. With a tokenizer that has a chat template, the user message goes through
`apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`; the completion the model should write
is `<think>\\n{rationale}\\n</think>\\n\\n{answer}` followed by the template's end of turn. Without a chat template
(the synthetic word-level tokenizer), the prompt is the message followed by ` <think>` and the completion is
` {rationale} </think> {answer}` followed by EOS.

**The gold answer tokens** (`gold_answer_ids`) are the tokens after `</think>` in the tokenised full conversation,
up to and including the first EOS (the chat template's end-of-turn token is the EOS of Qwen3 instruct tokenizers):
exactly the sequence whose teacher-forced probability is the paper's weight w = p(y* | x, z) (spec 1.6, eq. 7).
They are computed on the real rendering, so merges across the `</think>` boundary cannot differ from what the model
emits. `</think>` is one token of the vocabulary or several (`close_tag_ids`: its tokens as encoded alone, which
must appear as such in the rendering).
"""
from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import numpy as np

from tsallis_jax.data import context as context_lib
from tsallis_jax.data.records import Record
from tsallis_jax.errors import InputError

Style = Literal["cold", "warm"]
STYLES = ("cold", "warm")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

WARM_INSTRUCTIONS = {
    "finqa": ("Answer the financial question using the report's text and table. Reason step by step "
              "first, then write only the final answer on one line: a number (write percentages with "
              "%, e.g. 12.5%) or yes/no, with no explanation."),
    "hotpotqa": ("Answer the question using the paragraphs below; it may need facts from several of them. Reason "
                 "step by step first, then write only the final answer on one line: a short "
                 "phrase from the paragraphs, or yes/no, with no explanation."),
    "musique": ("Answer the multi-hop question using the paragraphs below. Reason step by step "
                "first, then write only the final answer on one line: a short phrase from the "
                "paragraphs, with no explanation."),
    "file": ("Answer the question. Reason step by step first, then write only the final answer on one line, with "
             "no explanation."),
}


@functools.lru_cache(maxsize=16)
def _jinja(source: str):
  import jinja2
  return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)


def render_template(record: Record, context_text: str) -> str:
  """The user turn from `record.template` (module docstring); raises `InputError` naming a field the record lacks."""
  fields = {**dict(record.columns), "question": record.question, "context": context_text, "id": record.id,
            "dataset": record.dataset}
  try:
    if record.template.startswith("jinja:"):
      return _jinja(record.template[len("jinja:"):]).render(**fields)
    return record.template.format_map(fields)
  except (KeyError, IndexError) as e:
    raise InputError(f"{record.where()}: prompt_template uses {e}, which this record lacks; fields:"
                     f" {sorted(fields)}") from None
  except Exception as e:  # a user's template: a format or Jinja syntax error, Jinja's UndefinedError, ...
    raise InputError(f"{record.where()}: prompt_template {record.template!r:.80} does not render:"
                     f" {type(e).__name__}: {e} (fields: {sorted(fields)})") from None


def _dataset_key(record: Record) -> str:
  return record.dataset.split("/")[0].lower()


def _synthetic_instructions(record: Record) -> str:
  # Synthetic questions read `<task> start <v> <op> <x> ...`; the instruction uses vocabulary words only.
  num_values = len(record.answer.split())
  return f"chain : write each step , then answer with {num_values} values . question"


def user_message(record: Record, style: Style, context_text: str) -> str:
  """The user turn: (warm) instructions, then context, then question; (cold) context then question."""
  if style not in STYLES:
    raise ValueError(f"style={style!r}: use 'cold' or 'warm'.")
  if record.template and style == "warm":
    return render_template(record, context_text)
  key = _dataset_key(record)
  if key == "synthetic":
    parts = ([_synthetic_instructions(record)] if style == "warm" else []) + [record.question]
    return " ".join(parts)
  if style == "cold":
    return "\n\n".join(p for p in (context_text, record.question) if p)
  if key not in WARM_INSTRUCTIONS:
    raise ValueError(f"{record.where()}: no warm-start instructions for dataset {record.dataset!r}; known: "
                     f"{sorted(WARM_INSTRUCTIONS)} and synthetic/*.")
  body = [WARM_INSTRUCTIONS[key]]
  if context_text:
    body.append(("Report:\n" if key == "finqa" else "Paragraphs:\n") + context_text)
  body.append("Question: " + record.question)
  return "\n\n".join(body)


def has_chat_template(tokenizer: Any) -> bool:
  """Whether prompts go through `tokenizer.apply_chat_template` (else the plain format of the module docstring)."""
  return bool(getattr(tokenizer, "chat_template", None))


def close_tag_ids(tokenizer: Any) -> tuple[int, ...]:
  """The token ids of the closing tag `</think>`: its single token when the vocabulary has one (Qwen3, the synthetic
  tokenizer, SmolLM2 after `model.build.with_think_tokens`), else its tokens as encoded alone (several tokens).

  Raises `ValueError` (with the fix) when the tokenizer cannot write the tag (unknown tokens)."""
  tid = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
  if tid is not None and tid != tokenizer.unk_token_id:
    return (int(tid),)
  ids = tuple(int(t) for t in _encode(tokenizer, THINK_CLOSE))
  if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
    raise ValueError(f"the tokenizer cannot write {THINK_CLOSE!r} (it encodes to {list(ids)}); add it with "
                     f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{THINK_OPEN}', '{THINK_CLOSE}']}})"
                     " (and resize the model's embeddings).")
  return ids


def _last_tag_end(ids: list[int], tag: tuple[int, ...]) -> int | None:
  """The index just past the last occurrence of the token sequence `tag` in `ids` (None when absent)."""
  n = len(tag)
  for start in range(len(ids) - n, -1, -1):
    if tuple(ids[start:start + n]) == tag:
      return start + n
  return None


def eos_id(tokenizer: Any) -> int:
  """The EOS id that ends a completion; raises `ValueError` when the tokenizer has none."""
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to the token that ends a completion.")
  return tokenizer.eos_token_id


def render_prompt(record: Record, tokenizer: Any, *, style: Style, context_text: str) -> str:
  """The prompt text (everything before the model's first generated token)."""
  message = user_message(record, style, context_text)
  if has_chat_template(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
  return f"{message} {THINK_OPEN}"


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _conversation_ids(record: Record, tokenizer: Any, *, style: Style, context_text: str, rationale: str,
                      answer: str) -> tuple[list[int], int]:
  """Token ids of prompt + completion, and the number of prompt tokens."""
  prompt = render_prompt(record, tokenizer, style=style, context_text=context_text)
  if has_chat_template(tokenizer):
    message = user_message(record, style, context_text)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": message},
         {"role": "assistant", "content": f"{THINK_OPEN}\n{rationale}\n{THINK_CLOSE}\n\n{answer}"}],
        tokenize=False, enable_thinking=True)
    if not full.startswith(prompt):
      raise ValueError("the chat template renders the conversation so that it does not start with the rendered "
                       "prompt; prompt-plus-completion tokens would not match generation.")
  else:
    full = f"{prompt} {rationale} {THINK_CLOSE} {answer}"
  prompt_ids = _encode(tokenizer, prompt)
  full_ids = _encode(tokenizer, full)
  if full_ids[:len(prompt_ids)] != prompt_ids:
    raise ValueError(f"{record.where()}: tokenising the prompt alone and within the conversation disagree at the "
                     "boundary; end the prompt with a special token (the chat template's assistant header does).")
  return full_ids, len(prompt_ids)


def _after_think(ids: list[int], tokenizer: Any, where: str) -> tuple[int, list[int]]:
  """(index just past the last `</think>` in `ids`, the answer tokens after it up to and including the EOS)."""
  end_id, tag = eos_id(tokenizer), close_tag_ids(tokenizer)
  tag_end = _last_tag_end(ids, tag)
  if tag_end is None:
    raise ValueError(f"{where}: the rendered completion has no {THINK_CLOSE!r} (as the tokens {list(tag)}); the chat"
                     " template must keep the rationale (Qwen3 thinking format), and a tag of several tokens must"
                     " tokenise alike alone and in the text.")
  tail = ids[tag_end:]
  if end_id in tail:
    return tag_end, tail[:tail.index(end_id) + 1]
  return tag_end, tail + [end_id]


def gold_answer_ids(record: Record, tokenizer: Any, *, style: Style = "cold") -> list[int]:
  """The tokens the model emits after `</think>` for the gold answer, ending with EOS (see the module docstring).

  They do not depend on the rationale or the context (tokenisation restarts after `</think>`, a special token or a
  tag that tokenises alike alone and in the text), so a one-token placeholder rationale and no context are
  rendered.
  """
  full_ids, _ = _conversation_ids(record, tokenizer, style=style, context_text="", rationale="r",
                                  answer=record.answer)
  return _after_think(full_ids, tokenizer, record.where())[1]


def prompt_ids(record: Record, tokenizer: Any, *, style: Style, max_prompt_tokens: int) -> tuple[list[int], int]:
  """The prompt token ids with the context truncated to `max_prompt_tokens` (context.py's rule).

  Returns (ids, number of context units dropped).
  """
  def count(ctx: str) -> int:
    return len(_encode(tokenizer, render_prompt(record, tokenizer, style=style, context_text=ctx)))
  ctx, dropped = context_lib.fit_context(record, count, max_prompt_tokens)
  return _encode(tokenizer, render_prompt(record, tokenizer, style=style, context_text=ctx)), dropped


def sft_example(record: Record, tokenizer: Any, *, style: Style = "cold",
                max_prompt_tokens: int = 1 << 30) -> tuple[list[int], list[bool]]:
  """Prompt + gold rationale + gold answer + EOS, with a loss mask that is True on the completion tokens.

  For pretraining on records with a gold rationale (the synthetic tasks). Raises if the record has no rationale.
  """
  if record.rationale is None:
    raise ValueError(f"{record.where()}: no gold rationale, so no SFT example; use records with a rationale "
                     "(synthetic tasks) or supply one.")
  ctx, _ = context_lib.fit_context(
      record, lambda c: len(_encode(tokenizer, render_prompt(record, tokenizer, style=style, context_text=c))),
      max_prompt_tokens)
  full_ids, num_prompt = _conversation_ids(record, tokenizer, style=style, context_text=ctx,
                                           rationale=record.rationale, answer=record.answer)
  tag_end, answer = _after_think(full_ids, tokenizer, record.where())
  ids = full_ids[:tag_end] + answer
  return ids, [i >= num_prompt for i in range(len(ids))]


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, *, side: str = "left"
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token-id lists padded with `pad_id` to `length`: `(tokens, mask)`, int32 and bool numpy arrays of
  len(rows) x length, mask True on real tokens. Prompts are left-padded (every prompt ends at the same position),
  answers right-padded."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, ids in enumerate(rows):
    if len(ids) > length:
      raise ValueError(f"row {i} has {len(ids)} tokens, over the padded length {length}.")
    span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
    tokens[i, span] = ids
    mask[i, span] = True
  return tokens, mask
