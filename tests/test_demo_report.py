"""The demo's analysis (experiments/demo_report.py): per-prompt escape steps and the escape-slope fit, checked on
inputs whose answers are known by construction, and the tables and figures written from a small summary."""
import numpy as np
import pytest

from experiments import demo_report


def test_escape_steps_first_crossing_and_never():
  steps = [0, 10, 20, 30]
  p_hat = np.array([[0.1, 0.01, 0.6, 0.2],
                    [0.4, 0.02, 0.7, 0.5],
                    [0.6, 0.03, 0.2, 0.4],
                    [0.2, 0.04, 0.9, 0.6]])
  out = demo_report.escape_steps(steps, p_hat)
  np.testing.assert_array_equal(out[[0, 2, 3]], [20.0, 0.0, 10.0])  # later dips do not undo the first crossing
  assert np.isnan(out[1])


@pytest.mark.parametrize("slope", [1.0, 0.5, 0.25])
def test_fit_recovers_the_power_law_and_skips_censored_and_started_above(slope):
  rng = np.random.default_rng(0)
  p0 = 10.0 ** rng.uniform(-4, -1, 60)
  T = 3.0 * p0 ** -slope * np.exp(rng.normal(0, 0.05, 60))
  T[:5] = np.nan  # censored: never escaped
  p0_with_started_above = np.concatenate([p0, [0.7, 0.9]])
  T_with_started_above = np.concatenate([T, [1e6, 1e6]])  # would wreck the fit if used
  fit = demo_report.fit_escape_slope(p0_with_started_above, T_with_started_above)
  assert fit["n"] == 55
  assert fit["slope"] == pytest.approx(slope, abs=0.03)


def test_fit_needs_a_decade_of_spread():
  p0 = np.array([0.01, 0.012, 0.015, 0.02])
  assert np.isnan(demo_report.fit_escape_slope(p0, np.array([10.0, 20, 30, 40]))["slope"])
  assert demo_report.theory_slope("garl", 0.75) == 0.25 and demo_report.theory_slope("grpo", None) is None


def _summary():
  buckets = ["easy", "hard"]
  rng = np.random.default_rng(1)
  metrics = {}
  for prefix in ("test", *(f"test/{b}" for b in buckets)):
    metrics.update({f"{prefix}/p@1": 0.1, f"{prefix}/pass@16": 0.3, f"{prefix}/maj@16": 0.2})

  def run(seed, q, estimator="garl"):
    p_hat = np.clip(np.array([[0.1, 0.1, 1e-3, 1e-3]]) * np.array([[1], [5], [50]]) ** (1 + q), 0, 1)
    return {"seed": seed, "estimator": estimator, "q": q, "best": {"step": 10, "metric": 0.2},
            **{k: v + 0.01 * seed for k, v in metrics.items()},
            "probe": {"steps": [0, 10, 20], "p_hat": (p_hat * (1 + 0.1 * rng.random(p_hat.shape))).tolist()}}

  return {"command": "python -m experiments.demo", "commit": "abc", "wall_s": 60, "cpu_s": 90,
          "pretrain": {"status": "cached"}, "optimizer_label": "adamw, lr 0.0003", "buckets": buckets,
          "p0": {"p0_samples_per_prompt": 16, "p_hat_by_prompt": [0.1, 0.09, 1e-3, 2e-3]},
          "test_buckets": ["easy", "easy", "hard", "hard"],
          "p0_by_bucket": {b: {"mean": m, "q05": m / 2, "q95": m * 2} for b, m in (("easy", 0.1), ("hard", 1e-3))},
          "p0_quantiles": {"q05": 1e-3, "q95": 0.1}, "test_prompts": 4, "steps": 20, "batch_size": 8,
          "num_samples": 8, "seeds": [0, 1, 2], "initial": {k: v for k, v in metrics.items()},
          "config": {"eval_num_samples": 16},
          "probe": {"per_bucket": 2, "every": 10, "samples": 4, "bucket": ["easy", "easy", "hard", "hard"],
                    "p0": [0.1, 0.1, 1e-3, 1e-3]},
          "methods": {"GRPO": [run(s, 0.0, "grpo") for s in range(3)],
                      "GARL q=1": [run(s, 1.0) for s in range(3)]}}


def test_tables_and_figures_are_written(tmp_path):
  text = demo_report.write_all(str(tmp_path), "_t", _summary())
  assert "| GARL q=1 | 11.0 ± 1.0 [10.0–12.0] |" in text  # mean ± sample std (ddof=1) [min–max] over 3 seeds
  assert "easy (p0 ~ 1e-01)" in text and "| theory 1-q |" in text
  for stem in ("demo_table_t.md", "demo_p0_hist_t.png", "demo_escape_t.png", "demo_curves_t.png"):
    assert (tmp_path / stem).stat().st_size > 0


def test_prediction_checks_follow_the_decision_rules():
  summary = _summary()
  # Five GARL q whose hard-bucket P-hat grows with q by construction: H1 holds; GRPO's hard prompts do not move.
  summary["methods"] = {"GRPO": summary["methods"]["GRPO"]}
  for q in (0.0, 0.25, 0.5, 0.75, 1.0):
    runs = []
    for seed in range(3):
      p_hat = [[0.1, 0.1, 1e-3, 1e-3], [0.2, 0.2, 1e-3 * 10 ** q, 1e-3 * 10 ** q],
               [0.3, 0.3, 1e-3 * 10 ** (2 * q + 0.01 * seed), 1e-3 * 10 ** (2 * q)]]
      run = dict(summary["methods"]["GRPO"][seed], estimator="garl", q=q, probe={"steps": [0, 10, 20],
                                                                                 "p_hat": p_hat})
      run["test/hard/p@1"] = 0.01 * q + 0.001 * seed
      runs.append(run)
    summary["methods"][f"GARL q={q:g}"] = runs
  for r in summary["methods"]["GRPO"]:
    r["probe"] = {"steps": [0, 10, 20], "p_hat": [[0.1, 0.1, 1e-3, 1e-3]] * 3}
  checks = {row[0][:2]: row for row in demo_report.prediction_checks(summary)}
  assert checks["H1"][2] == "holds" and "Spearman 1.00" in checks["H1"][1]
  assert checks["H1"][1].startswith("q=0: +0.01 [+0.00, +0.01]")  # (0 + 0.01 seed) / 2 over the two hard prompts
  assert checks["H2"][2] == "holds"
  assert checks["H3"][2] == "holds"  # no GRPO hard prompt escapes; hard p@1 +1.0 point (10, 11, 12 vs 10)
  assert checks["H6"][2].startswith("no fit")
  # Reversed: q = 0 gains most -> H1 contradicts.
  for q in (0.0, 1.0):
    for r in summary["methods"][f"GARL q={q:g}"]:
      r["probe"]["p_hat"][-1][2:] = [0.5, 0.5] if q == 0.0 else [1e-3, 1e-3]
  assert {row[0][:2]: row for row in demo_report.prediction_checks(summary)}["H1"][2] == "contradicts"
