"""Datasets (FinQA, HotPotQA, MuSiQue, synthetic chains), prompts and the grain prompt pipeline (issue 6).

Modules: `records` (the common `Record`), readers `finqa` / `hotpotqa` / `musique` of the official files,
`builders` (TFDS builders over a manual-download folder), `splits` (the paper's subsets), `synthetic` (CPU-scale
tasks with a p0 knob), `context` (linearisation and truncation), `prompts` (cold / warm prompts, gold answer tokens),
`pipeline` (`make_prompt_loader`), `finqa_program` (the FinQA program executor).
"""
from tsallis_jax.data.records import Passage, Record, RecordError

__all__ = ["Passage", "Record", "RecordError"]
