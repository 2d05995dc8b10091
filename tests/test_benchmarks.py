"""Cheap checks of the benchmark harness (experiments/benchmarks): no timings are asserted, only plumbing.

- the harness runs a command, parses its BENCH_RESULT line and records load and peak memory; failures are reported,
  not raised;
- the report keeps quiet runs, drops loaded ones, and computes the issue's target ratios from the inputs;
- the FLOP count of a token equals twice the matmul parameters read from the checkpoint file;
- the rebuilt reference workload reproduces the published sanity logits through this project's loader;
- this project's benchmark step runs end to end on a shrunken reference workload.
"""
import dataclasses
import json
import os
import pathlib
import sys

import chex
import numpy as np
import pytest

from experiments.benchmarks import flops, harness, report, run, workloads
from experiments.benchmarks.peers import common


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return workloads.build_tiny(tmp_path_factory.mktemp("wl") / "tiny")


def _fake_run(system, mode, median, foreign, workload="w", phases=None, tokens=100):
  return {"ok": True, "system": system, "mode": mode, "workload": workload, "median_s": median, "first_s": 1.0,
          "peak_rss_mb": 10.0, "tokens_per_step": tokens, "foreign_cores": foreign,
          "phases_median_s": phases or {}, "sanity_logits": [0.0] * 5}


def test_harness_runs_command_and_parses_result(tmp_path):
  payload = {"system": "x", "median_s": 0.5}
  code = f"import json; print('noise'); print({common.RESULT_PREFIX!r} + json.dumps({payload!r}))"
  result = harness.run([sys.executable, "-c", code], str(tmp_path / "a.log"))
  assert result["ok"] and result["rc"] == 0
  assert result["median_s"] == 0.5 and result["system"] == "x"
  assert result["peak_rss_mb"] > 1.0 and result["foreign_cores"] >= 0.0 and result["wall_s"] > 0.0


def test_harness_reports_failure_without_raising(tmp_path):
  result = harness.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path / "b.log"))
  assert not result["ok"] and result["rc"] == 3 and "boom" in result["log_tail"]
  result = harness.run([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "c.log"), timeout_s=0.5)
  assert not result["ok"] and result["timed_out"]


def test_parse_result_rejects_malformed_line():
  with pytest.raises(ValueError, match="Malformed"):
    harness.parse_result(common.RESULT_PREFIX + "{not json")
  assert harness.parse_result("no result here") is None


def test_report_keeps_quiet_runs_and_computes_targets():
  runs = [_fake_run("ours", "grpo", 0.2, 0.0), _fake_run("ours", "grpo", 9.0, 1.5),  # loaded run: dropped
          _fake_run("ours", "garl", 0.21, 0.1), _fake_run("ours", "paft", 0.3, 0.1),
          _fake_run("tunix", "grpo", 0.6, 0.0), _fake_run("trl", "grpo", 0.7, 0.0),
          _fake_run("ours", "sample", 0.1, 0.0), _fake_run("tunix", "sample", 0.25, 0.0),
          _fake_run("trl", "sample", 0.3, 0.0), {"ok": False, "system": "trl", "mode": "grpo", "workload": "w"}]
  agg = report.aggregate(runs)
  assert agg[("w", "ours", "grpo")]["median_s"] == 0.2 and agg[("w", "ours", "grpo")]["quiet_runs"] == 1
  rows = {r["target"]: r for r in report.targets(agg, {}, None)}
  chex.assert_trees_all_close(rows["GRPO step / fastest peer's"]["value"], 0.2 / 0.6)
  assert rows["GRPO step / fastest peer's"]["met"]
  chex.assert_trees_all_close(rows["sampler tokens/s / fastest peer's (sample)"]["value"], 0.25 / 0.1)
  assert rows["GARL step / this project's GRPO step"]["met"]
  assert not rows["PAFT step / this project's GRPO step"]["met"]
  text = report.markdown(agg, {}, None)
  assert "| this project, GRPO | 0.2 |" in text and "**no**" in text


def test_first_step_and_rss_targets_compare_with_trl():
  """Issue 17's first-step goal (cold, and a re-run with the compile cache warm) and peak-RSS goal, against TRL."""
  runs = [dict(_fake_run("ours", "grpo", 0.2, 0.0), first_s=9.0, peak_rss_mb=50.0),
          dict(_fake_run("ours", "grpo_rerun", 0.2, 0.0), first_s=3.0),
          dict(_fake_run("trl", "grpo", 0.7, 0.0), first_s=6.0, peak_rss_mb=40.0)]
  rows = {r["target"]: r for r in report.targets(report.aggregate(runs), {}, None)}
  cold, warm = rows["first step (GRPO) / TRL's"], rows["first step (GRPO, re-run (compile cache warm)) / TRL's"]
  chex.assert_trees_all_close((cold["value"], warm["value"]), (9.0 / 6.0, 3.0 / 6.0))
  assert (cold["met"], warm["met"]) == (False, True)
  assert rows["peak RSS of the GRPO run / TRL's"]["value"] == 50.0 / 40.0
  assert not rows["peak RSS of the GRPO run / TRL's"]["met"]
  assert "| this project, GRPO, re-run (compile cache warm) | 0.2 |" in report.markdown(report.aggregate(runs), {}, None)


def test_first_step_targets_include_the_layers_under_scan_form():
  """The scanned model's first step (cold and re-run) is compared with TRL's, and its step appears in the note of
  the step target beside the default (unrolled) one."""
  runs = [dict(_fake_run("ours", "grpo", 0.2, 0.0), first_s=9.0), dict(_fake_run("ours", "grpo_scan", 0.25, 0.0),
                                                                         first_s=7.0),
          dict(_fake_run("ours", "grpo_scan_rerun", 0.25, 0.0), first_s=2.0),
          dict(_fake_run("trl", "grpo", 0.5, 0.0), first_s=6.0)]
  agg = report.aggregate(runs)
  rows = {r["target"]: r for r in report.targets(agg, {}, None)}
  cold = rows["first step (GRPO, layers under scan (scan_layers=True)) / TRL's"]
  warm = rows["first step (GRPO, layers under scan, re-run (compile cache warm)) / TRL's"]
  chex.assert_trees_all_close((cold["value"], warm["value"]), (7.0 / 6.0, 2.0 / 6.0))
  assert (cold["met"], warm["met"]) == (False, True)
  assert rows["GRPO step / fastest peer's"]["note"].startswith("layers under scan (scan_layers=True): 0.500")
  assert "| this project, GRPO, layers under scan (scan_layers=True) | 0.25 |" in report.markdown(agg, {}, None)


def test_our_grpo_variants_pass_their_flags_to_the_runner(tmp_path):
  for mode, flags in (("grpo_scan", ["--scan-layers"]), ("grpo_scan_rerun", ["--scan-layers", "--warm-compile-cache"]),
                      ("grpo_scan_quick", ["--scan-layers", "--cpu-emitters", "quick_compile"]),
                      ("grpo_full_prompt", ["--no-share-prompt"])):
    cmd = run.job_command("ours", mode, tmp_path, {}, 0, compile_cache=str(tmp_path / "c"))
    assert cmd[cmd.index("--mode") + 1] == "grpo" and all(f in cmd for f in flags), (mode, cmd)
  assert "--scan-layers" not in run.job_command("ours", "grpo", tmp_path, {}, 0)


def test_our_train_jobs_get_a_compile_cache_and_the_rerun_warms_it(tmp_path):
  cmd = run.job_command("ours", "grpo_rerun", tmp_path, {}, 3, compile_cache=str(tmp_path / "c"))
  assert cmd[cmd.index("--mode") + 1] == "grpo" and "--warm-compile-cache" in cmd
  assert cmd[cmd.index("--compile-cache") + 1] == str(tmp_path / "c")
  cold = run.job_command("ours", "garl", tmp_path, {}, 0, compile_cache=str(tmp_path / "d"))
  assert "--warm-compile-cache" not in cold and cold[cold.index("--compile-cache") + 1] == str(tmp_path / "d")


def test_each_train_run_gets_an_empty_cache_folder_removed_afterwards():
  with run.fresh_compile_cache() as folder:
    assert os.path.isdir(folder) and not os.listdir(folder)
    (pathlib.Path(folder) / "entry").write_text("x")
  assert not os.path.exists(folder)
  with pytest.raises(RuntimeError), run.fresh_compile_cache() as failed:
    raise RuntimeError("the run failed")
  assert not os.path.exists(failed)
  with run.fresh_compile_cache(enabled=False) as none:
    assert none == ""


def test_report_flags_workload_with_only_loaded_runs():
  agg = report.aggregate([_fake_run("tunix", "grpo", 2.0, 1.0), _fake_run("tunix", "grpo", 4.0, 0.9)])
  assert agg[("w", "tunix", "grpo")]["loaded"] and agg[("w", "tunix", "grpo")]["median_s"] == 3.0


def test_flop_rate_target_uses_update_phase_and_peak():
  runs = [_fake_run("ours", "grpo", 2.0, 0.0, workload="big", phases={"rollout": 1.0, "update (x)": 1.0})]
  runs.append({"ok": True, "system": "matmul", "foreign_cores": 0.0,
               "extra": {"peak_gflops": 100.0, "jax_peak_gflops": 90.0}})
  model_flops = {"big": {"total": 100e9, "update": 80e9}}
  rows = report.targets(report.aggregate(runs), model_flops, report.matmul_peak(runs))
  by_name = {r["target"].split(" ")[0]: r["value"] for r in rows}
  chex.assert_trees_all_close(by_name["GRPO"], 100e9 / 2.0 / 1e9 / 100.0)
  chex.assert_trees_all_close(by_name["train"], 80e9 / 1.0 / 1e9 / 100.0)


def test_update_flop_rate_counts_the_flops_the_shared_prompt_update_executes():
  """With prompt sharing the update's rate divides the FLOPs it runs (update_shared), never the workload's larger
  count; the ablation (grpo_full_prompt) is quoted on the full count, and its step beside the default's."""
  runs = [_fake_run("ours", "grpo", 2.0, 0.0, workload="big", phases={"rollout": 1.0, "update (x)": 1.0}),
          _fake_run("ours", "grpo_full_prompt", 3.0, 0.0, workload="big", phases={"rollout": 1.0, "update (x)": 2.0}),
          _fake_run("tunix", "grpo", 4.0, 0.0, workload="big"),
          {"ok": True, "system": "matmul", "foreign_cores": 0.0, "extra": {"peak_gflops": 100.0,
                                                                          "jax_peak_gflops": 90.0}}]
  model_flops = {"big": {"total": 100e9, "rollout": 20e9, "reference": 20e9, "policy": 60e9, "update": 80e9,
                         "update_shared": 40e9, "total_shared": 60e9}}
  agg = report.aggregate(runs)
  rows = {r["target"]: r for r in report.targets(agg, model_flops, report.matmul_peak(runs))}
  update = rows["train update (ref fwd + fwd/bwd + AdamW) FLOP/s / matmul peak"]
  chex.assert_trees_all_close(update["value"], 40e9 / 1.0 / 1e9 / 100.0)
  assert "ablation share_prompt_forward=False: 0.400" in update["note"]  # 80 G in 2 s at 100 GFLOP/s
  step = rows["GRPO step / fastest peer's"]
  assert step["value"] == 0.5 and "share_prompt_forward=False): 0.750" in step["note"]
  assert "FLOP floor 0.6 s" in step["note"]  # the least work, 60 G
  whole = rows["GRPO step FLOP/s (executed) / matmul peak"]
  chex.assert_trees_all_close(whole["value"], 60e9 / 2.0 / 1e9 / 100.0)  # total_shared, not the workload's 100 G
  assert "0.500 (a throughput" in whole["note"]
  text = report.markdown(agg, model_flops, report.matmul_peak(runs))
  assert "| 30.0 (30%) |" in text  # our GRPO row: 60 G executed in 2 s
  assert "| 33.3 (33%) |" in text  # the ablation: 60 - 40 + 80 = 100 G (prefill shared, update full) in 3 s
  assert "| 25.0 (25%) |" in text  # tunix: the workload's 100 G in 4 s
  assert "update at 40.0 GFLOP/s = 40% of peak, on the 40.0 GFLOP it executes" in text
  assert "update at 40.0 GFLOP/s = 40% of peak, on the 80.0 GFLOP it executes" in text  # the ablation: 80 G / 2 s


TRAIN_JOBS_OURS_TUNIX = ("ours grpo", "ours grpo_rerun", "ours grpo_full_prompt", "ours grpo_scan",
                         "ours grpo_scan_rerun", "ours grpo_scan_quick", "ours garl", "ours paft", "tunix grpo")


def test_plan_alternates_systems_between_rounds():
  rounds = run.plan(2, ["tiny"], ["ours", "tunix", "trl"], ["tiny"])
  first = [j for j in rounds[0] if j[2] in ("grpo", "garl", "paft")]
  second = [j for j in rounds[1] if j[2] in ("grpo", "garl", "paft")]
  assert sorted(first) == sorted(second) and first != second
  assert all(r[0] == ("matmul", "machine", "peak") for r in rounds)
  capped = run.plan(2, ["tiny", "smollm2"], ["ours", "tunix"], [], {"smollm2": 1})
  assert [sum(j[1] == "smollm2" for j in r) for r in capped] == [len(TRAIN_JOBS_OURS_TUNIX), 0]
  only = run.plan(2, ["smollm2"], ["ours", "trl"], ["smollm2"], modes=("grpo", "grpo_scan_quick"))
  assert [sorted(f"{s} {m}" for s, w, m in r[1:] if m != "sample") for r in only] == [
      ["ours grpo", "ours grpo_scan_quick", "trl grpo"]] * 2
  assert sum(m == "sample" for r in only for s, w, m in r) == 4  # --modes leaves the sampler jobs as they are


def test_token_flops_is_twice_the_matmul_parameters(tiny_folder):
  from safetensors.numpy import load_file
  tensors = load_file(str(tiny_folder / "model.safetensors"))
  matmul_params = sum(v.size for k, v in tensors.items() if v.ndim == 2)  # tied: the embedding is the LM head
  hf = json.loads((tiny_folder / "config.json").read_text())
  assert flops.token_flops(hf, context=0, lm_head=True) == 2 * matmul_params
  step = flops.step_flops(hf, num_sequences=4, prompt_len=3, max_new=2, beta=0.0)
  assert step["reference"] == 0.0 and step["total"] == step["rollout"] + step["policy"]
  with pytest.raises(ValueError, match="positive sizes"):
    flops.step_flops(hf, num_sequences=0, prompt_len=3, max_new=2, beta=0.0)


def test_shared_prompt_update_flops_count_each_prompt_once(tiny_folder):
  """update_shared: B*P + N*T positions per forward (x4 with the reference); one sample per prompt is the full
  count; total_shared also prefills each prompt once."""
  hf = json.loads((tiny_folder / "config.json").read_text())
  shapes = dict(num_sequences=6, prompt_len=5, max_new=4, beta=0.04)
  full = flops.step_flops(hf, **shapes, num_prompts=6)
  chex.assert_trees_all_close(full["update_shared"], full["update"])
  chex.assert_trees_all_close(full["total_shared"], full["total"])
  shared = flops.step_flops(hf, **shapes, num_prompts=2)
  prompt_one = sum(flops.token_flops(hf, i + 1, lm_head=False) for i in range(5))
  chex.assert_trees_all_close(shared["update"] - shared["update_shared"], 4 * 4 * prompt_one)  # 4 prompt passes saved
  prefill_one = sum(flops.token_flops(hf, i + 1, lm_head=False) for i in range(4))
  chex.assert_trees_all_close(shared["total"] - shared["total_shared"], 4 * 4 * prompt_one + 4 * prefill_one)
  with pytest.raises(ValueError, match="must divide num_sequences"):
    flops.step_flops(hf, **shapes, num_prompts=4)


def test_tiny_workload_matches_the_reference_logits(tiny_folder):
  from experiments.benchmarks import ours_grpo
  spec, model, _, prompt_tokens_BxP, _ = ours_grpo.load_workload(str(tiny_folder))
  assert spec == workloads.TINY and prompt_tokens_BxP.shape == (8, 16)
  np.testing.assert_allclose(ours_grpo.sanity_logits(model), workloads.TINY_SANITY_LOGITS, atol=1e-6)


def test_read_spec_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="build the workloads"):
    workloads.read_spec(tmp_path)


def test_ours_step_runs_on_a_shrunken_workload(tmp_path, capsys):
  from experiments.benchmarks import ours_grpo
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  result = ours_grpo.run_train(str(folder), "garl", steps=2)
  assert len(result["times_s"]) == 2 and np.all(np.isfinite(result["times_s"]))
  assert result["tokens_per_step"] == 2 * 2 * 3 and result["extra"]["q"] == 0.75
  assert all(r in (0.0, 1.0, 2.0, 3.0, 4.0) for r in result["extra"]["rewards_per_step"])
  assert harness.parse_result(capsys.readouterr().out)["mode"] == "garl"
  assert set(result["phases_median_s"]) == {"rollout", ours_grpo.REWARD_PHASE, ours_grpo.UPDATE_PHASE}


def test_ours_step_runs_with_layers_under_scan_on_the_same_weights(tmp_path):
  """run.py's grpo_scan mode: the same checkpoint loaded stacked under one scan; its sanity logits equal the unrolled
  load's (the benchmark's same-weights check), and the step runs."""
  from experiments.benchmarks import ours_grpo
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  result = ours_grpo.run_train(str(folder), "grpo", steps=2, scan_layers=True)
  assert result["extra"]["scan_layers"] and np.all(np.isfinite(result["times_s"]))
  model = ours_grpo.load_workload(str(folder))[1]
  np.testing.assert_allclose(result["sanity_logits"], ours_grpo.sanity_logits(model), rtol=1e-5, atol=1e-5)
  stacked = ours_grpo.build(str(folder), "grpo", scan_layers=True).state.params["layers"]["attn"]["k_proj"]
  assert stacked.shape[0] == model.config.num_layers  # one array for all layers: the scanned form


def test_first_step_timeline_orders_its_events_and_writes_medians(tmp_path):
  """first_step.py: each run is a fresh process; step 0's events happen in causal order (the update is lowered before
  it compiles, the rewards follow the rollout, the first update runs after both), and the page gives their medians."""
  from experiments.benchmarks import first_step
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  out = tmp_path / "first_step"
  assert first_step.main(["--workload", str(folder), "--forms", "unrolled", "scan", "--runs", "1",
                          "--quiet-wait", "0", "--out", str(out)]) == 0
  runs = json.loads(out.with_suffix(".json").read_text())["runs"]
  assert [(r["form"], r["scan_layers"]) for r in runs] == [("unrolled", False), ("scan", True)]
  for r in runs:
    assert 0 < r["update_lowered"] < r["update_compiled"] < r["update_done"]
    assert 0 < r["rollout_done"] <= r["reward_done"] < r["update_done"]
    assert r["rollout_step1_s"] > 0 and r["update_step1_s"] > 0 and r["built_s"] > 0
    assert 0 < r["first_update_s"] <= r["update_done"] - r["update_compiled"]
  page = out.with_suffix(".md").read_text()
  assert "| unrolled | 1 |" in page and "| scan | 1 |" in page
  assert f"**{runs[0]['update_done']:.2f}**" in page


def test_first_step_summary_takes_medians_of_each_runs_own_times():
  """The page's per-form numbers are medians over runs of each run's own values; the first update's run alone is
  the median of the per-run differences, which a difference of the two medians would not give."""
  from experiments.benchmarks import first_step
  base = {"form": "unrolled", "built_s": 1.0, "update_lowered": 1.0, "rollout_done": 2.0, "reward_done": 2.1,
          "rollout_step1_s": 0.5, "update_step1_s": 0.7}
  runs = [{**base, "update_compiled": c, "update_done": d, "first_update_s": d - c}
          for c, d in ((10.0, 12.8), (11.0, 14.0), (12.0, 14.7))]  # differences 2.8, 3.0, 2.7
  agg = first_step.summary(runs)["unrolled"]
  assert agg["runs"] == 3 and agg["update_compiled"] == 11.0 and agg["update_done"] == 14.0
  assert agg["first_update_s"] == pytest.approx(2.8)  # not 14.0 - 11.0


def test_our_sampler_runner_times_shared_unshared_and_grouped_calls(tmp_path, capsys):
  from experiments.benchmarks import sampler_ours
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  result = sampler_ours.run(str(folder), steps=2)
  assert result["tokens_per_step"] == 4 * 3 and len(result["times_s"]) == 2
  for key in ("unshared", "grouped"):
    assert len(result["extra"][key]["times_s"]) == 2 and result["extra"][key]["tokens_per_s"] > 0
  assert result["extra"]["grouped"]["group_size"] == 2 and result["extra"]["unshared"]["share_prefill"] is False
  rows = run.split_sampler_result(harness.parse_result(capsys.readouterr().out) | {"ok": True})
  assert [r["mode"] for r in rows] == ["sample", "sample_g1", "sample_g1_unshared"]


def test_sampler_result_is_split_into_shared_flat_and_unshared_rows():
  result = {"ok": True, "system": "tsallis_jax", "mode": "sample", "median_s": 0.4, "first_s": 5.0,
            "tokens_per_s": 5120.0, "times_s": [5.0, 0.4, 0.4],
            "extra": {"grouped": {"times_s": [3.0, 0.1, 0.1], "median_s": 0.1, "tokens_per_s": 20480.0},
                      "unshared": {"times_s": [4.0, 0.6, 0.6], "median_s": 0.6, "tokens_per_s": 3413.3}}}
  shared, flat, unshared = run.split_sampler_result(result)
  assert (shared["system"], shared["mode"], shared["median_s"], shared["first_s"]) == ("ours", "sample", 0.1, 3.0)
  assert (flat["system"], flat["mode"], flat["median_s"]) == ("ours", "sample_g1", 0.4)
  assert (unshared["mode"], unshared["median_s"], unshared["first_s"]) == ("sample_g1_unshared", 0.6, 4.0)
  assert run.split_sampler_result({"ok": False, "system": "tsallis_jax"})[0]["mode"] == "sample_g1"


def test_results_json_rerenders_to_the_same_markdown(tmp_path):
  runs = [_fake_run("ours", "grpo", 0.2, 0.0), _fake_run("tunix", "grpo", 0.6, 0.0),
          {"ok": True, "system": "matmul", "foreign_cores": 0.0, "extra": {"peak_gflops": 100.0,
                                                                          "jax_peak_gflops": 90.0}}]
  model_flops = {"w": {"total": 30e9, "update": 20e9, "rollout": 10e9, "reference": 5e9, "policy": 15e9}}
  agg, peak = report.aggregate(runs), report.matmul_peak(runs)
  (tmp_path / "results.json").write_text(json.dumps(report.to_json(runs, agg, model_flops, peak, {})))
  text = report.rewrite(str(tmp_path / "results.json"), str(tmp_path / "results.md"))
  assert text == report.markdown(agg, model_flops, peak) == (tmp_path / "results.md").read_text()
  assert "FLOP floor 0.3 s = 0.50 x the fastest peer's step" in text


def test_decode_gemm_profile_times_both_layouts_of_the_same_product():
  from experiments.benchmarks import decode_gemm
  result = decode_gemm.run(rows=2, reps=1)  # asserts the two layouts compute the same product first
  for chain in ("mlp", "head"):
    assert set(result[chain]["weight_gb_per_s"]) == {"x @ W", "linear"} and result[chain]["speedup_linear"] > 0


def test_attention_impl_profile_times_both_implementations_of_the_same_attention():
  from experiments.benchmarks import attention_impl
  result = attention_impl.run(reps=1, layers=1, rows_train=2, len_train=8, rows_decode=2, slots=8)  # checks parity
  for name in ("train", "decode", "attn_train", "attn_decode"):
    assert set(result[name]["median_s"]) == {"einsum", "xla"} and result[name]["ratio_xla_over_einsum"] > 0


@pytest.mark.slow
def test_device_check_runs_the_trainer_step_and_writes_its_json(tmp_path):
  """The prepared accelerator check (device_check.py) end to end on CPU with the tiny preset (8 fake devices)."""
  import json

  from experiments.benchmarks import device_check
  out = tmp_path / "dc.json"
  assert device_check.main(["--model", "tiny", "--dtype", "float32", "--steps", "4", "--batch", "8", "--samples", "2",
                            "--prompt-len", "16", "--rationale", "6", "--answer", "4", "--sampler-reps", "1",
                            "--peak-tflops", "1.0", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  for part in ("grpo", "garl", "grpo_unrolled"):
    r = result[part]
    assert r["steps_timed"] == 2 and r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["update_s"] > 0
    assert 0 < r["generated_tokens_per_step"] <= 8 * 2 * (6 + 1 + 4)  # a tiny vocabulary's random model hits EOS
  assert result["sampler"]["rows"] == 16 and result["sampler"]["tokens_per_s"] > 0
  for impl in ("einsum", "xla"):  # no GPU: no cudnn entry
    assert result["attention"][impl]["finite"] and result["attention"][impl]["grad_max_rel_err"] < 1e-5
  assert "cudnn" not in result["attention"]
  assert set(result["part_s"]) == set(device_check.PARTS) and min(result["part_s"].values()) > 0
  assert result["grpo"]["model_overrides"] == "remat=full,scan_layers=true"
  assert result["grpo_unrolled"]["model_overrides"] == "remat=full,scan_layers=false"


def test_device_check_splits_the_trainers_step_intervals(monkeypatch):
  """The trainer fetches a step's metrics after the next rollout: the middle intervals are whole steps, the last is
  the final update alone, the first holds the compiles and one extra rollout."""
  import tsallis_jax.train
  from experiments.benchmarks import device_check

  def fake_run(cfg, workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step, seconds in enumerate([10.0, 3.0, 3.4, 3.2, 1.0], 1):
        f.write(json.dumps({"step": step, "perf/step_s": seconds, "gen/tokens": 100}) + "\n")
  monkeypatch.setattr(tsallis_jax.train, "train_and_evaluate", fake_run)
  monkeypatch.setattr(device_check, "peak_memory_bytes", lambda: None)
  got = device_check.time_step(None, flops_per_step=3.2e12, peak_tflops=2.0)
  chex.assert_trees_all_close({k: got[k] for k in ("step_s", "update_s", "rollout_s", "first_step_s", "mfu")},
                              {"step_s": 3.2, "update_s": 1.0, "rollout_s": 2.2, "first_step_s": 7.8, "mfu": 0.5})
  assert got["steps_timed"] == 3 and got["first_interval_s"] == 10.0 and got["tokens_per_s"] == 100 / 3.2


def test_device_check_records_a_failing_part_and_runs_the_next(tmp_path, monkeypatch):
  """A part that raises (the H200's out-of-memory) is an error entry in the JSON and exit status 1; the parts after
  it still run and are written."""
  import json

  from experiments.benchmarks import device_check

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: planted")
  monkeypatch.setattr(device_check, "time_step", out_of_memory)
  out = tmp_path / "dc.json"
  assert device_check.main(["--model", "tiny", "--dtype", "float32", "--batch", "8", "--samples", "2",
                            "--prompt-len", "16", "--rationale", "4", "--answer", "4", "--sampler-reps", "1",
                            "--peak-tflops", "1.0", "--parts", "grpo,sampler", "--out", str(out)]) == 1
  result = json.loads(out.read_text())
  assert result["grpo"] == {"error": "RuntimeError: RESOURCE_EXHAUSTED: planted"} and "garl" not in result
  assert result["sampler"]["rows"] == 16 and set(result["part_s"]) == {"grpo", "sampler"}


def test_device_check_default_step_fits_one_h200_by_xla_memory_analysis():
  """The device check's Qwen3-0.6B GRPO step (B 8 x G 8 x 657 tokens, the 151936 vocabulary) with its default memory
  knobs fits an H200 (131 GiB) by XLA's memory_analysis() (CPU XLA; GPU XLA gave 0.8x of CPU's on paper_finqa_1gpu),
  and the same step without remat does not: on the H200 it asked for the allocator's whole default pool, 103.65 GiB
  (2026-11-30)."""
  from experiments.benchmarks import device_check
  from tsallis_jax.train import memory

  def gib(model_overrides):  # per program, GiB (memory.summary)
    return memory.summary(device_check.check_config(
        "qwen3_0_6b", "grpo", 4, "bfloat16", batch=8, samples=8, prompt_len=128, rationale=512, answer=16,
        model_overrides=model_overrides))

  fits = gib(device_check.DEFAULT_MODEL_OVERRIDES)
  assert fits["train_step"]["peak"] < 80 and fits["rollout"]["peak"] < 20, fits
  assert gib("remat=none,scan_layers=true")["train_step"]["peak"] > 131


def test_warm_compile_cache_runs_one_step_first_into_the_folder(tmp_path, capsys, monkeypatch):
  """--warm-compile-cache: a child process runs two untimed steps with the same cache folder, which then holds the
  compiled programs before the timed run starts (its result records how many)."""
  from experiments.benchmarks import ours_grpo
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the child caches even these small programs
  monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # the suite's folder (conftest) would win in the child
  cache = tmp_path / "xla"
  ours_grpo.main(["--workload", str(folder), "--steps", "2", "--compile-cache", str(cache), "--warm-compile-cache"])
  result = harness.parse_result(capsys.readouterr().out)
  assert result["extra"]["compile_cache"]["entries_before"] >= 2  # at least the rollout and the train step
  with pytest.raises(SystemExit):
    ours_grpo.main(["--workload", str(folder), "--warm-compile-cache"])


def test_scan_layers_reaches_the_warming_child_and_the_timed_run(tmp_path, monkeypatch):
  """grpo_scan_rerun: the child that fills the cache must compile the same (scanned) programs as the timed run, or the
  timed run's first step would compile cold."""
  import subprocess
  from experiments.benchmarks import ours_grpo
  children, timed = [], []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: children.append(cmd))
  monkeypatch.setattr(ours_grpo, "run_train", lambda *a, **kw: timed.append(kw))
  ours_grpo.main(["--workload", str(tmp_path), "--compile-cache", str(tmp_path / "xla"), "--warm-compile-cache",
                  "--scan-layers"])
  assert len(children) == 1 and "--scan-layers" in children[0] and timed[0]["scan_layers"] is True
  assert "--warm-compile-cache" not in children[0] and children[0][-2:] == ["--steps", "2"]  # the child, two steps
  ours_grpo.main(["--workload", str(tmp_path), "--compile-cache", str(tmp_path / "xla"), "--warm-compile-cache"])
  assert "--scan-layers" not in children[1] and timed[1]["scan_layers"] is False


def test_roofline_is_flops_at_the_peak_or_weight_reads_at_the_bandwidth(tiny_folder):
  """flops.step_floor_s / sample_floor_s in their two limits: unbounded bandwidth leaves the FLOPs at the peak (the
  rollout prefilling each prompt once), an unbounded peak leaves one read of the float32 weights per decode step
  plus AdamW's 7 passes; the report quotes both floors once the peak run measured a bandwidth."""
  hf = json.loads((tiny_folder / "config.json").read_text())
  shapes = dict(num_prompts=2, num_sequences=6, prompt_len=5, max_new=4, beta=0.04)
  f = flops.step_flops(hf, num_sequences=6, prompt_len=5, max_new=4, beta=0.04, num_prompts=2)
  prefill_one = sum(flops.token_flops(hf, i + 1, lm_head=False) for i in range(4))
  compute = flops.step_floor_s(hf, **shapes, peak_gflops=1.0, bandwidth_gbs=1e30)
  chex.assert_trees_all_close(compute["update"], f["update_shared"] / 1e9)  # the least work: prompts shared
  chex.assert_trees_all_close(compute["rollout"], (f["rollout"] - 4 * prefill_one) / 1e9)  # 6 rows -> 2 prompts
  weights_gb = 4.0 * flops.parameter_count(hf) / 1e9
  memory = flops.step_floor_s(hf, **shapes, peak_gflops=1e30, bandwidth_gbs=1.0)
  chex.assert_trees_all_close((memory["rollout"], memory["update"]), (4 * weights_gb, 7 * weights_gb))
  chex.assert_trees_all_close(flops.sample_floor_s(hf, batch=3, prompt_len=5, max_new=4, peak_gflops=1e30,
                                                   bandwidth_gbs=1.0), 4 * weights_gb)
  model_flops = {"w": {**f, "shapes": {"hf": hf, **shapes, "sample_batch": 3}}}
  runs = [_fake_run("ours", "grpo", 2.0, 0.0), _fake_run("tunix", "grpo", 4.0, 0.0),
          _fake_run("ours", "sample_g1_unshared", 1.0, 0.0), _fake_run("tunix", "sample", 2.0, 0.0),
          {"ok": True, "system": "matmul", "foreign_cores": 0.0,
           "extra": {"peak_gflops": 1.0, "jax_peak_gflops": 1.0, "read_gbs": 1.0}}]
  rows = {r["target"]: r for r in report.targets(report.aggregate(runs), model_flops, report.matmul_peak(runs))}
  assert "roofline" in rows["GRPO step / fastest peer's"]["note"]
  assert "roofline" in rows["sampler tokens/s / fastest peer's (sample_g1_unshared)"]["note"]


def test_cpu_paths_summary_gives_each_ablations_ratio(tmp_path):
  from experiments.benchmarks import cpu_paths
  runs = [dict(_fake_run("ours", "grpo", m, 0.0, phases={"update (x)": m / 2}), variant=v, workload="tiny", round=r)
          for r, (v, m) in enumerate([("default", 0.15), ("host off", 0.19), ("linear off", 0.3), ("default", 0.17)])]
  agg = cpu_paths.summary(runs)
  chex.assert_trees_all_close(agg[("tiny", "default")]["median_s"], 0.16)
  chex.assert_trees_all_close(agg[("tiny", "host off")]["update_s"], 0.095)
  cpu_paths.write(tmp_path, runs, "--rounds 2")
  text = (tmp_path / "cpu_paths.md").read_text()
  assert "| tiny | host off | 0.190 |  | 0.095 |" in text and f"| {0.16 / 0.19:.3f} |" in text
  assert json.loads((tmp_path / "cpu_paths.json").read_text())["summary"][0]["variant"] == "default"


def test_gemm_ceiling_counts_every_matmul_of_the_step_backward_and_scans_included():
  import jax
  import jax.numpy as jnp
  from experiments.benchmarks import gemm_ceiling

  def loss(w_DxF, x_MxD):
    def body(h_MxD, _):
      return jnp.tanh(h_MxD @ w_DxF @ w_DxF.T), None
    return jnp.sum(jax.lax.scan(body, x_MxD, None, length=3)[0])

  jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((4, 6)), jnp.ones((5, 4)))
  found = list(gemm_ceiling.matmuls(jaxpr.jaxpr))
  # forward: 2 products per iteration; backward: 2 per product (input and weight gradients), all under scans of 3
  assert sum(n for _, n in found) == 3 * 2 + 3 * 2 * 2
  assert sum(n * gemm_ceiling.flops(k) for k, n in found) == 3 * 3 * (2 * 5 * 4 * 6 + 2 * 5 * 6 * 4)
  batched = ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), "float32", "float32", None)
  assert gemm_ceiling.flops(batched) == 2 * 2 * 3 * 5 * 4
  looped = jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] @ c[0], c[1] + 1),
                                                       (x, 0))[0])(jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="while"):
    list(gemm_ceiling.matmuls(looped.jaxpr))


def test_gemm_ceiling_times_a_small_step_and_renders_its_table(tmp_path):
  from experiments.benchmarks import gemm_ceiling
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  result = gemm_ceiling.run(str(folder), "grpo", reps=1, steps=1)
  assert result["matmul_gflop"] > 0 and result["gemm_ceiling_s"] > 0 and result["update_s"] > 0
  assert result["update_over_ceiling"] == pytest.approx(result["update_s"] / result["gemm_ceiling_s"], rel=1e-2)
  # The optimizer's time tightens the bound: matmul FLOPs over (ceiling + optimizer), below the GEMM-only ceiling.
  assert result["optimizer_s"] > 0
  assert result["bound_fraction_of_peak"] == pytest.approx(
    result["matmul_gflop"] / (result["gemm_ceiling_s"] + result["optimizer_s"]) / result["peak_gflops"], rel=2e-2)
  assert result["bound_fraction_of_peak"] < result["ceiling_fraction_of_peak"]
  layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
  # 7 projections per layer: policy forward, reference forward (beta > 0), and two backward products each
  assert sum(m["count"] for m in result["matmuls"]) >= 4 * 7 * layers
  text = gemm_ceiling.render(result)
  assert "GEMM ceiling" in text and "ceiling + optimizer" in text and text.count("\n|") >= 3


def test_program_emitters_times_each_program_under_each_emitter(tmp_path):
  """program_emitters.py: one fresh process per (form, emitters), the rollout and the train step compiled and run
  under XLA's default and the older emitters; the page gives each pair's medians."""
  from experiments.benchmarks import program_emitters
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  out = tmp_path / "program_emitters"
  assert program_emitters.main(["--workload", str(folder), "--forms", "scan", "--rounds", "1", "--quiet-wait", "0",
                                "--out", str(out)]) == 0
  runs = json.loads(out.with_suffix(".json").read_text())["runs"]
  assert [(r["form"], r["emitters"]) for r in runs] == [("scan", "default"), ("scan", "older")]
  for r in runs:
    assert all(r[k] > 0 for k in program_emitters.KEYS) and r["step_first_s"] > 0 and r["rollout_first_s"] > 0
  page = out.with_suffix(".md").read_text()
  assert "| scan | default | 1 |" in page and "| scan | older | 1 |" in page
  assert f"{runs[1]['step_compile_s']:.3f} ({runs[1]['step_compile_s']:.3f}-" in page


def test_compile_depth_records_the_emitter_choice_in_its_own_files(tmp_path):
  """compile_depth.py --cpu-emitters: the scanned form compiled as that choice; results under their own name, with
  the choice recorded (the default run's files untouched)."""
  from experiments.benchmarks import compile_depth
  compile_depth.main(["--depths", "1", "--reps", "1", "--no-sampler", "--no-warmup", "--cpu-emitters",
                      "quick_compile", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "compile_depth_quick_compile.json").read_text())
  assert result["cpu_emitters"] == "quick_compile" and not (tmp_path / "compile_depth.json").exists()
  assert {r["form"] for r in result["rows"]} == {"scan", "unrolled"}
  assert "`cpu_emitters=quick_compile`" in (tmp_path / "compile_depth_quick_compile.md").read_text()


def test_child_json_reads_the_marked_line_and_reports_failures():
  """run.child_json: the JSON after the marker on a child's stdout; None (with the process, for its stderr) when the
  child fails, prints no marked line or runs past its timeout."""
  import sys
  ok, _ = run.child_json([sys.executable, "-c", "print('noise'); print('MARK {\"a\": 1}')"], "MARK", 60)
  assert ok == {"a": 1}
  for code, timeout in (("print('MARK {}'); raise SystemExit(3)", 60), ("print('nothing')", 60),
                        ("import time; time.sleep(30)", 1)):
    result, proc = run.child_json([sys.executable, "-c", code], "MARK", timeout)
    assert result is None and (proc.returncode or "MARK" not in proc.stdout)
  assert "no result after 1 s" in proc.stderr


def test_quiet_child_json_saves_the_runs_so_far_and_names_the_failed_child():
  """run.quiet_child_json: the child's JSON and no load when not asked to wait; a failed child first calls
  `save_partial`, then raises with the caller's description, the exit code and the child's stderr."""
  import sys
  result, load = run.quiet_child_json([sys.executable, "-c", "print('MARK {\"a\": 2}')"], "MARK", 60, 0,
                                      failed="never")
  assert (result, load) == ({"a": 2}, None)
  saved = []
  with pytest.raises(RuntimeError, match=r"^demo child failed \(x, round 0\) \(exit 3\): .*broke"):
    run.quiet_child_json([sys.executable, "-c", "import sys; sys.stderr.write('broke'); raise SystemExit(3)"],
                         "MARK", 60, 0, failed="demo child failed (x, round 0)", save_partial=lambda: saved.append(1))
  assert saved == [1]


def test_sampler_emitters_ab_runs_each_choice_in_a_fresh_process(tmp_path):
  """sampler_ours.py --emitters-ab: the scanned model's Sampler under "auto" and "xla", one fresh process each; each
  run records the options its Sampler compiled with, and the page gives every sampler call's medians."""
  from experiments.benchmarks import sampler_ours
  spec = dataclasses.replace(workloads.TINY, num_prompts=2, group_size=2, prompt_len=4, max_new=3, sample_batch=4)
  folder = workloads.build_tiny(tmp_path / "mini", spec)
  out = tmp_path / "sampler_emitters"
  sampler_ours.main(["--emitters-ab", "--workload", str(folder), "--rounds", "1", "--quiet-wait", "0",
                     "--out", str(out)])
  saved = json.loads(out.with_suffix(".json").read_text())
  assert [(r["choice"], r["compiler_options"]) for r in saved["runs"]] == [
    ("auto", {"xla_cpu_use_fusion_emitters": False}), ("xla", None)]
  page = out.with_suffix(".md").read_text()
  for name in sampler_ours.AB_VARIANTS:
    auto, xla = (next(r for r in saved["runs"] if r["choice"] == c)[name] for c in ("auto", "xla"))
    assert auto["call0_s"] > auto["warm_s"] > 0 and xla["call0_s"] > xla["warm_s"] > 0
    assert saved["summary"][name]["call0_ratio"] == pytest.approx(auto["call0_s"] / xla["call0_s"])
    assert f"| {name} | {auto['call0_s']:.3f} ({auto['call0_s']:.3f}-" in page


def test_sampler_emitters_ab_keeps_the_runs_before_a_failed_child(tmp_path, monkeypatch):
  """sampler_ours.py --emitters-ab: when a child fails, the runs before it are written (no ratio: not every choice
  ran) and the error names the child and where those runs are."""
  from experiments.benchmarks import run as run_lib
  from experiments.benchmarks import sampler_ours
  times = {"times_s": [2.0, 1.0, 1.0, 1.0]}
  calls = []

  def fake_child(cmd, marker, timeout_s, quiet_wait_s, *, failed, save_partial=None):
    calls.append(cmd[cmd.index("--cpu-emitters") + 1])
    if len(calls) == 2:
      save_partial()
      raise RuntimeError(failed)
    return {**times, "extra": {"compiler_options": {"xla_cpu_use_fusion_emitters": False},
                               "unshared": times, "grouped": times}}, None

  monkeypatch.setattr(run_lib, "quiet_child_json", fake_child)
  out = tmp_path / "sampler_emitters"
  with pytest.raises(RuntimeError, match=r"failed \(xla, round 0; the runs before it are in .*sampler_emitters"):
    sampler_ours.main(["--emitters-ab", "--workload", "unused", "--rounds", "2", "--quiet-wait", "0",
                       "--out", str(out)])
  saved = json.loads(out.with_suffix(".json").read_text())
  assert calls == ["auto", "xla"] and [r["choice"] for r in saved["runs"]] == ["auto"]
  assert "stopped early" in saved["command"] and saved["summary"] == {}
  assert "no ratio: not every choice ran" in out.with_suffix(".md").read_text()
