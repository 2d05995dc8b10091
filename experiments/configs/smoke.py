"""A seconds-long run for tests and for checking an install (tiny model, synthetic task, 4 steps).

Command:  python -m experiments.train --config smoke --workdir /tmp/smoke
Runtime:  about 20 s on 2 CPU cores (mostly compilation).
Expected: finishes, writes metrics.jsonl with 4 step rows, checkpoints at steps 2 and 4, results.json with test
          p@1 / pass@4 / maj@4 near 0 (random init model).
"""
from tsallis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      name="smoke", model="tiny", model_overrides="num_layers=1,embed_dim=32,mlp_dim=64,num_heads=2,num_kv_heads=1",
      task="synthetic", task_options="p0=0.1,train=64,val=8,test=8", max_prompt_len=16, rationale_budget=8,
      max_answer_len=3, estimator="garl", q=0.75, num_samples=4, batch_size=8, num_steps=4, learning_rate=1e-3,
      eval_num_samples=4, eval_every=2, eval_batch_size=8, checkpoint_every=2, max_to_keep=2, progress_bar="off")
