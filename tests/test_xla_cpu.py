"""XLA:CPU compile options per program (`tsallis_jax.xla_cpu`, `TrainConfig.cpu_emitters`): which programs get the
older emitters, that the trainer's programs are jitted with them, and that they sample the same tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax import distributed, xla_cpu
from tsallis_jax.errors import ConfigError
from tsallis_jax.model import ModelConfig, abstract_model, create_model
from tsallis_jax.train import programs as programs_lib
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.step import TokenIds

OLDER = xla_cpu.OLDER_EMITTERS
PAD, EOS, TAG = 0, 1, 4
IDS = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))
CFG = TrainConfig(max_prompt_len=6, rationale_budget=4, max_answer_len=3, num_samples=4, batch_size=2,
                  eval_batch_size=2, eval_num_samples=4, estimator="grpo", q=0.0, progress_bar="off",
                  tensorboard=False)


@pytest.mark.parametrize("choice, program, scanned, platform, want", [
    ("auto", "rollout", True, "cpu", OLDER),
    ("auto", "train_step", True, "cpu", None),
    ("auto", "rollout", False, "cpu", None),  # unrolled programs keep XLA's default
    ("auto", "rollout", True, "gpu", None),  # XLA:CPU's option only
    ("auto", "rollout", True, "tpu", None),
    ("xla", "rollout", True, "cpu", None),
    ("xla", "train_step", True, "cpu", None),
    ("quick_compile", "rollout", True, "cpu", OLDER),
    ("quick_compile", "train_step", True, "cpu", OLDER),
    ("quick_compile", "train_step", False, "cpu", None),
    ("quick_compile", "train_step", True, "gpu", None),
])
def test_which_programs_get_the_older_emitters(choice, program, scanned, platform, want):
  got = xla_cpu.compiler_options(choice, program, layers_scanned=scanned, platform=platform)
  assert got == want
  if got is not None:
    got["changed"] = True  # a fresh dict each call: a caller's edit never reaches the module's constant
    assert "changed" not in xla_cpu.OLDER_EMITTERS


@pytest.mark.parametrize("choice, scan_layers, unroll_decode, want", [
    ("auto", True, False, {"rollout": OLDER, "train_step": None}),
    ("auto", True, True, {"rollout": None, "train_step": None}),  # the decode is an unrolled program
    ("quick_compile", True, True, {"rollout": None, "train_step": OLDER}),
    ("quick_compile", False, False, {"rollout": None, "train_step": None}),
])
def test_program_options_scan_the_rollout_only_when_it_decodes_under_the_scan(choice, scan_layers, unroll_decode,
                                                                               want):
  assert xla_cpu.program_options(choice, scan_layers=scan_layers, unroll_decode=unroll_decode, platform="cpu") == want


def test_bad_choices_are_named():
  with pytest.raises(ValueError, match=r"cpu_emitters='fast' is not one of \('auto', 'xla', 'quick_compile'\)"):
    xla_cpu.compiler_options("fast", "rollout", layers_scanned=True, platform="cpu")
  with pytest.raises(ValueError, match="program='sampler' is not one of"):
    xla_cpu.compiler_options("auto", "sampler", layers_scanned=True, platform="cpu")
  with pytest.raises(ConfigError, match="cpu_emitters='fast' is not one of"):
    TrainConfig(cpu_emitters="fast")


def _programs(cfg, scan_layers):
  mcfg = ModelConfig.tiny(vocab_size=32, num_layers=2, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2,
                          scan_layers=scan_layers)
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  graphdef, abstract_vars = nnx.split(abstract_model(mcfg))
  programs = programs_lib.build_programs(cfg, graphdef, abstract_vars, mesh, IDS, mcfg.sharding_rules)
  params = state_lib.pure(nnx.state(create_model(mcfg, seed=0)))
  return programs, params, mesh


def _options(jitted, *args):
  """The compile options a jitted program's lowering carries (`jax.jit(..., compiler_options=...)`). JAX 0.10's
  `jax.stages.Lowered` has no public accessor for them (`compile(compiler_options=...)` only adds more), so this reads
  the lowering's own field; the pinned JAX version (requirements.txt) keeps it stable."""
  return dict(jitted.lower(*args)._lowering._compiler_options_kvs)


@pytest.mark.parametrize("choice, scan_layers, unroll_decode, rollout_older, step_older", [
    ("auto", True, False, True, False),
    ("auto", True, True, False, False),  # rollout_unroll_layers: the decode is an unrolled program
    ("xla", True, False, False, False),
    ("quick_compile", True, False, True, True),
    ("quick_compile", False, False, False, False),
])
def test_build_programs_jits_each_program_with_its_options(choice, scan_layers, unroll_decode, rollout_older,
                                                            step_older):
  cfg = CFG.replace(cpu_emitters=choice, rollout_unroll_layers=unroll_decode)
  programs, params, mesh = _programs(cfg, scan_layers)
  tokens = jnp.full((cfg.batch_size, cfg.max_prompt_len), 5, jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  with jax.set_mesh(mesh):
    for rollout in (programs.train_rollout, programs.eval_rollout):
      assert _options(rollout.jitted, params, tokens, mask, jax.random.key(0)) == (OLDER if rollout_older else {})
    state = state_lib.init_state(params, programs.tx, 0, programs.state_shardings, True)
    rollout = programs.train_rollout(params, tokens, mask, jax.random.key(0))
    batch = {"rollout": rollout, "answer_tokens_BxA": jnp.zeros((cfg.batch_size, cfg.max_answer_len), jnp.int32),
             "answer_mask_BxA": jnp.ones((cfg.batch_size, cfg.max_answer_len), bool),
             "rewards_BxG": jnp.zeros((cfg.batch_size, cfg.num_samples), jnp.float32)}
    step_options = _options(programs.train_step.jitted, state, batch, jax.random.key(1),
                            jnp.zeros((2,), jnp.float32))
  assert step_options == (OLDER if step_older else {})


def test_the_older_emitters_sample_the_same_tokens():
  """The scanned rollout compiled with the older emitters (`auto`) and with XLA's default (`xla`): the same tokens
  for the same key, log-probabilities equal to float32 rounding (another code generator, the same arithmetic)."""
  out, options = {}, {}
  for choice in ("auto", "xla"):
    programs, params, mesh = _programs(CFG.replace(cpu_emitters=choice, num_samples=8), scan_layers=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 32, (2, CFG.max_prompt_len)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    with jax.set_mesh(mesh):
      options[choice] = _options(programs.train_rollout.jitted, params, tokens, mask, jax.random.key(3))
    out[choice] = jax.device_get(programs.train_rollout(params, tokens, mask, jax.random.key(3)))
  assert options == {"auto": OLDER, "xla": {}}  # two different compiles, not one program twice
  np.testing.assert_array_equal(out["auto"].tokens_NxT, out["xla"].tokens_NxT)
  np.testing.assert_allclose(out["auto"].logp_NxT, out["xla"].logp_NxT, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice, rollout_older, step_older", [("auto", True, False), ("xla", False, False),
                                                               ("quick_compile", True, True)])
def test_the_benchmark_runner_compiles_as_the_trainer(tmp_path, choice, rollout_older, step_older):
  """`ours_grpo.build` (what the benchmarks time) gives its scanned rollout and train step the options
  `build_programs` would (`experiments/benchmarks/cpu_emitters.py` compares the choices through it)."""
  import dataclasses

  from experiments.benchmarks import ours_grpo, workloads
  from tsallis_jax.train import compile_ahead
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  built = ours_grpo.build(str(folder), "grpo", scan_layers=True, cpu_emitters=choice)
  key, q_range = jax.random.key(0), jnp.zeros((2,), jnp.float32)
  assert _options(built.rollout_fn, built.state.params, *built.prompts, key) == (OLDER if rollout_older else {})
  with jax.set_mesh(built.mesh):
    args = jax.tree.map(compile_ahead.abstract, (built.state, built.abstract_batch, key, q_range))
    assert _options(built.train_step.jitted, *args) == (OLDER if step_older else {})


def _sampler_model(scan_layers):
  mcfg = ModelConfig.tiny(vocab_size=32, num_layers=2, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2,
                          scan_layers=scan_layers)
  return create_model(mcfg, seed=0)


@pytest.mark.parametrize("choice, scan_layers, unroll_layers, want", [
    ("auto", True, False, OLDER),
    ("quick_compile", True, False, OLDER),
    ("xla", True, False, None),
    ("auto", True, True, None),  # SamplingConfig.unroll_layers: the decode is an unrolled program
    ("auto", False, False, None),
])
def test_the_sampler_takes_the_rollouts_options(choice, scan_layers, unroll_layers, want):
  from tsallis_jax import sampler as sampler_lib
  config = sampler_lib.SamplingConfig(max_new_tokens=3, unroll_layers=unroll_layers)
  sampler = sampler_lib.Sampler(_sampler_model(scan_layers), None, config, cpu_emitters=choice)
  assert sampler.compiler_options() == want
  with pytest.raises(ValueError, match=r"cpu_emitters='fast' is not one of \('auto', 'xla', 'quick_compile'\)"):
    sampler_lib.Sampler(_sampler_model(scan_layers), None, config, cpu_emitters="fast")


def test_the_sampler_compiles_with_its_options_and_samples_the_same_tokens():
  """A scanned model's `Sampler` under "auto" compiles through the older emitters' jitted `generate` (its compile cache
  grows, plain `generate`'s does not) and draws the tokens "xla" (the default) draws, with log-probs equal to float32
  rounding."""
  from tsallis_jax import sampler as sampler_lib
  model = _sampler_model(scan_layers=True)
  config = sampler_lib.SamplingConfig(num_samples=4, max_new_tokens=5, temperature=1.0, stop_ids=(EOS,), pad_id=PAD)
  prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
  older, plain = sampler_lib.generate_with_options(OLDER), sampler_lib.generate
  assert sampler_lib.generate_with_options(dict(OLDER)) is older and sampler_lib.generate_with_options(None) is plain
  sizes = (older._cache_size(), plain._cache_size())
  assert sampler_lib.Sampler(model, None, config).compiler_options() is None  # the Sampler's default is "xla"
  auto = sampler_lib.Sampler(model, None, config, cpu_emitters="auto").sample_ids(prompts, jax.random.key(4))
  assert (older._cache_size(), plain._cache_size()) == (sizes[0] + 1, sizes[1])
  xla = sampler_lib.Sampler(model, None, config, cpu_emitters="xla").sample_ids(prompts, jax.random.key(4))
  assert plain._cache_size() == sizes[1] + 1
  np.testing.assert_array_equal(auto.tokens_NxT, xla.tokens_NxT)
  np.testing.assert_allclose(auto.logp_NxT, xla.logp_NxT, rtol=1e-5, atol=1e-5)
