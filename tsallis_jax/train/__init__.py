"""End-to-end training: config, state, the jitted step, rollouts, evaluation, checkpoints, writers and the loop.

    from tsallis_jax.train import TrainConfig, load_config, train_and_evaluate
    results = train_and_evaluate(load_config("demo", ["estimator=garl", "q=0.75"]), "/tmp/run")

The CLI is `python -m experiments.train --config NAME --workdir DIR [--set key=value ...]`.
"""
from tsallis_jax.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from tsallis_jax.train.loop import NonFiniteLossError, train_and_evaluate

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "apply_overrides", "load_config",
           "train_and_evaluate"]
