"""The demo's analysis and outputs: per-prompt escape steps, the escape-slope fit, the tables and the figures.

Pure functions of the demo's summary dict (`experiments/results/demo*.json`), so `python -m experiments.demo --replot
JSON` rewrites every file from a saved run. Shape letters: S probe steps, P probe prompts.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

ESCAPE_P = 0.5  # a probe prompt has escaped once its teacher-forced P-hat reaches this (the delta of spec 1.5)


def escape_steps(steps_S: Sequence[int], p_hat_SxP: np.ndarray, level: float = ESCAPE_P) -> np.ndarray:
  """First probe step at which each prompt's P-hat reaches `level`: float array over P, NaN where it never does."""
  p_hat_SxP = np.asarray(p_hat_SxP, float)
  reached_SxP = p_hat_SxP >= level
  first_P = np.argmax(reached_SxP, axis=0)
  out = np.asarray(steps_S, float)[first_P]
  out[~reached_SxP.any(axis=0)] = np.nan
  return out


def fit_escape_slope(p0_P: np.ndarray, escape_P: np.ndarray) -> dict[str, float]:
  """Least-squares slope of log T against log(1/p0) over the prompts that escaped (T > 0) after starting below
  ESCAPE_P; the theory (spec 1.5, Thm 5.2) predicts 1 - q for q < 1 under gradient flow. NaN slope when fewer than
  two distinct p0 decades escaped (no spread to fit)."""
  p0_P, escape_P = np.asarray(p0_P, float), np.asarray(escape_P, float)
  ok = np.isfinite(escape_P) & (escape_P > 0) & (p0_P > 0) & (p0_P < ESCAPE_P)
  n = int(ok.sum())
  x, y = np.log(1.0 / p0_P[ok]), np.log(escape_P[ok])
  if n < 3 or np.ptp(x) < math.log(10.0):
    return {"slope": float("nan"), "n": n}
  slope, intercept = np.polyfit(x, y, 1)
  return {"slope": float(slope), "intercept": float(intercept), "n": n}


def theory_slope(estimator: str, q: float | None) -> float | None:
  """1 - q for GARL / PAFT (the exponent of p0 in the escape time); None for GRPO (no fixed q, spec 2.6)."""
  return None if estimator == "grpo" else 1.0 - float(q)


def _stats(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
  """`mean ± sample std (ddof=1) [min-max]`, or the single value."""
  a = scale * np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
  if len(a) == 0:
    return "—"
  if len(a) == 1:
    return f"{a[0]:.{digits}f}"
  return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f} [{a.min():.{digits}f}–{a.max():.{digits}f}]"


def _short(values: Sequence[float]) -> str:
  a = 100 * np.asarray(values, float)
  return f"{a.mean():.1f}" if len(a) == 1 else f"{a.mean():.1f}±{a.std(ddof=1):.1f}"


def run_escapes(run: dict[str, Any]) -> np.ndarray:
  """Each probe prompt's escape step in one run (`escape_steps` of its probe curve)."""
  return escape_steps(run["probe"]["steps"], np.asarray(run["probe"]["p_hat"]))


def write_table(path: str, summary: dict[str, Any]) -> str:
  """The markdown tables: Table 1's shape overall and by bucket, and the per-prompt escape analysis."""
  buckets = summary["buckets"]
  k = summary["config"]["eval_num_samples"]
  p0 = summary["p0"]
  lines = [
      f"# CPU demo: cold start on the mixed-difficulty chain task ({summary['optimizer_label']}; measured)", "",
      f"Command: `{summary['command']}` (commit {summary['commit']}). Wall time {summary['wall_s'] / 60:.1f} min, "
      f"CPU time {summary['cpu_s'] / 60:.1f} min (pretraining {summary['pretrain']['status']}). Prediction and "
      "decision rules: [demo_prediction.md](demo_prediction.md), committed before these results.", "",
      f"Cold-start P of the pretrained model, per test prompt ({p0['p0_samples_per_prompt']} sampled rationales each,"
      " mean teacher-forced w = p(y*|x,z)): " + ", ".join(
          f"{b} {summary['p0_by_bucket'][b]['mean']:.2g} (5-95%: {summary['p0_by_bucket'][b]['q05']:.2g}–"
          f"{summary['p0_by_bucket'][b]['q95']:.2g})" for b in buckets)
      + f"; all prompts 5-95%: {summary['p0_quantiles']['q05']:.2g}–{summary['p0_quantiles']['q95']:.2g}.", "",
      f"Each run: {summary['steps']} steps x {summary['batch_size']} prompts x {summary['num_samples']} samples (the "
      f"same rollout budget for every method), seeds {summary['seeds']}. Test metrics x100 on {summary['test_prompts']}"
      f" held-out prompts, {k} samples each, from the best-by-validation-maj@{k} checkpoint (step 0, the pretrained "
      "model, is a candidate); mean ± sample std (ddof=1) [min–max] over seeds.", "",
      f"| method | p@1 | p@{k} | m@{k} | best step (per seed) |", "|---|---|---|---|---|",
      f"| pretrained, no RL | {_stats([summary['initial'][f'test/p@1']])} | "
      f"{_stats([summary['initial'][f'test/pass@{k}']])} | {_stats([summary['initial'][f'test/maj@{k}']])} | |"]
  for name, runs in summary["methods"].items():
    lines.append(f"| {name} | {_stats([r['test/p@1'] for r in runs])} | {_stats([r[f'test/pass@{k}'] for r in runs])}"
                 f" | {_stats([r[f'test/maj@{k}'] for r in runs])} | {', '.join(str(r['best']['step']) for r in runs)}"
                 " |")
  lines += ["", f"By difficulty bucket (test p@1 / p@{k} / m@{k}, x100, mean±std over seeds):", "",
            "| method | " + " | ".join(f"{b} (p0 ~ {summary['p0_by_bucket'][b]['mean']:.0e})" for b in buckets) + " |",
            "|---|" + "---|" * len(buckets)]
  init = summary["initial"]
  lines.append("| pretrained, no RL | " + " | ".join(
      f"{_short([init[f'test/{b}/p@1']])} / {_short([init[f'test/{b}/pass@{k}']])} / "
      f"{_short([init[f'test/{b}/maj@{k}']])}" for b in buckets) + " |")
  for name, runs in summary["methods"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{_short([r[f'test/{b}/p@1'] for r in runs])} / {_short([r[f'test/{b}/pass@{k}'] for r in runs])} / "
        f"{_short([r[f'test/{b}/maj@{k}'] for r in runs])}" for b in buckets) + " |")
  probe = summary["probe"]
  lines += ["", f"Per-prompt escape (probe: {probe['per_bucket']} training prompts per bucket, teacher-forced P-hat "
            f"from {probe['samples']} sampled rationales every {probe['every']} steps; escape = first probe step with "
            f"P-hat >= {ESCAPE_P}). Cells: probe prompts escaped / probed over all seeds, and their median escape "
            "step. Slope: least squares of log T on log(1/p0) over the escaped prompts of all seeds (theory: 1 - q "
            "under gradient flow; censored prompts are left out, which flattens the fit). Hard-bucket gain: mean over "
            f"the {' and '.join(HARD)} probe prompts of log10(P-hat at the last probe / p0), seed mean [min, max].", "",
            "| method | " + " | ".join(buckets) + " | fitted slope (n) | theory 1-q | hard-bucket gain |",
            "|---|" + "---|" * len(buckets) + "---|---|---|"]
  p0_P = np.asarray(probe["p0"])
  bucket_P = np.asarray(probe["bucket"])
  for name, runs in summary["methods"].items():
    esc = np.stack([run_escapes(r) for r in runs])  # seeds x P
    cells = []
    for b in buckets:
      sel = esc[:, bucket_P == b]
      done = np.isfinite(sel)
      med = f", {np.median(sel[done]):.0f}" if done.any() else ""
      cells.append(f"{int(done.sum())}/{sel.size}{med}")
    fit = fit_escape_slope(np.tile(p0_P, len(runs)), esc.reshape(-1))
    th = theory_slope(runs[0]["estimator"], runs[0]["q"])
    slope = "—" if not np.isfinite(fit["slope"]) else f"{fit['slope']:.2f}"
    th_text = "—" if th is None else f"{th:g}"
    gains = [hard_gain(summary, r) for r in runs] if set(HARD) <= set(buckets) else []
    gain = f"{np.mean(gains):+.2f} [{min(gains):+.2f}, {max(gains):+.2f}]" if gains else "—"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope} ({fit['n']}) | {th_text} | {gain} |")
  checks = prediction_checks(summary)
  if checks:
    lines += ["", "Against the pre-registered decision rules ([demo_prediction.md](demo_prediction.md); H6 is decided "
              "on the SGD variant):", "", "| prediction | measured | verdict |", "|---|---|---|"]
    lines += [f"| {p} | {m} | {v} |" for p, m, v in checks]
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


HARD = ("hard", "hardest")  # the buckets of the pre-registered hard-bucket metrics (demo_prediction.md)


def hard_gain(summary: dict[str, Any], run: dict[str, Any]) -> float:
  """Mean over the hard-bucket probe prompts of log10(P-hat at the last probe / p0) (demo_prediction.md)."""
  sel = np.isin(np.asarray(summary["probe"]["bucket"]), HARD)
  last_P = np.maximum(np.asarray(run["probe"]["p_hat"][-1], float)[sel], 1e-12)
  return float(np.mean(np.log10(last_P / np.asarray(summary["probe"]["p0"], float)[sel])))


def _hard_p1(summary: dict[str, Any], metrics: dict[str, Any]) -> float:
  present = [b for b in HARD if f"test/{b}/p@1" in metrics]
  return float(np.mean([metrics[f"test/{b}/p@1"] for b in present]))


def prediction_checks(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(prediction, measured, verdict) rows for H1-H6 of demo_prediction.md, computed by its decision rules."""
  from scipy import stats
  methods = summary["methods"]
  garl = {runs[0]["q"]: runs for runs in methods.values() if runs[0]["estimator"] == "garl"}
  rows = []
  gains = {q: [hard_gain(summary, r) for r in runs] for q, runs in sorted(garl.items())}
  if len(gains) >= 3:
    qs = sorted(gains)
    rho = stats.spearmanr(qs, [np.mean(gains[q]) for q in qs]).statistic
    measured = ", ".join(f"q={q:g}: {np.mean(g):+.2f} [{min(g):+.2f}, {max(g):+.2f}]" for q, g in gains.items())
    ok = rho >= 0.8
    contra = (0.0 in gains and 1.0 in gains and np.mean(gains[0.0]) >= np.mean(gains[1.0])) or rho <= 0
    rows.append(("H1 hard-bucket gain (log10 P-hat_end/p0) increases with q", f"{measured}; Spearman {rho:.2f}",
                 "holds" if ok else ("contradicts" if contra else "not met")))
  p1 = {q: [_hard_p1(summary, r) for r in runs] for q, runs in sorted(garl.items())}
  if all(q in p1 for q in (0.0, 0.25, 0.75, 1.0)):
    hi, lo = (0.75, 1.0), (0.0, 0.25)
    above = all(np.mean(p1[h]) > np.mean(p1[l]) for h in hi for l in lo)
    separated = min(p1[1.0]) > max(p1[0.0]) or min(p1[0.75]) > max(p1[0.25])
    contra = any(np.mean(p1[l]) >= np.mean(p1[h]) for h in hi for l in lo)
    rows.append(("H2 q >= .75 beats q <= .25 on hard + hardest test p@1",
                 ", ".join(f"q={q:g}: {100 * np.mean(v):.2f}" for q, v in p1.items()),
                 "holds" if above and separated else ("contradicts" if contra else "not met")))
  if "GRPO" in methods:
    sel = np.isin(np.asarray(summary["probe"]["bucket"]), HARD)
    escaped = sum(int(np.isfinite(run_escapes(r)[sel]).sum()) for r in methods["GRPO"])
    delta = 100 * (np.mean([_hard_p1(summary, r) for r in methods["GRPO"]]) - _hard_p1(summary, summary["initial"]))
    rows.append(("H3 GRPO does not learn the hard buckets", f"{escaped} hard probe prompts escaped; hard p@1 "
                 f"{delta:+.2f} points vs pretrained", "holds" if escaped == 0 and abs(delta) <= 1 else "not met"))
  easy_init = summary["initial"].get("test/easy/p@1")
  if easy_init is not None:
    gains_easy = {name: 100 * (np.mean([r["test/easy/p@1"] for r in runs]) - easy_init)
                  for name, runs in methods.items() if not name.startswith("PAFT")}
    rows.append(("H4 every GARL q and GRPO improve easy test p@1", ", ".join(f"{n}: {g:+.1f}"
                                                                            for n, g in gains_easy.items()),
                 "holds" if all(g > 0 for g in gains_easy.values()) else "not met"))
  paft1 = [runs for runs in methods.values() if runs[0]["estimator"] == "paft" and runs[0]["q"] == 1.0]
  if paft1 and 1.0 in gains:
    g = [hard_gain(summary, r) for r in paft1[0]]
    rows.append(("H5 PAFT q=1 hard-bucket gain within or below GARL q=1's seed range",
                 f"PAFT {np.mean(g):+.2f} [{min(g):+.2f}, {max(g):+.2f}], GARL [{min(gains[1.0]):+.2f}, "
                 f"{max(gains[1.0]):+.2f}]", "holds" if np.mean(g) <= max(gains[1.0]) else "not met"))
  slopes = {}
  for runs in methods.values():
    if runs[0]["estimator"] == "garl" and runs[0]["q"] in (0.0, 1.0):
      esc = np.stack([run_escapes(r) for r in runs])
      slopes[runs[0]["q"]] = fit_escape_slope(np.tile(np.asarray(summary["probe"]["p0"]), len(runs)),
                                              esc.reshape(-1))["slope"]
  if slopes:
    both = len(slopes) == 2 and all(np.isfinite(v) for v in slopes.values())
    verdict = ("no fit (fewer than two decades of p0 escaped)" if not both
               else "holds" if slopes[0.0] > slopes[1.0] else "contradicts")
    rows.append(("H6 escape slope falls with q (slope q=0 > slope q=1)",
                 ", ".join(f"q={q:g}: {v:.2f}" for q, v in slopes.items()), verdict))
  return rows


def _colors(n: int):
  import matplotlib.pyplot as plt
  return plt.cm.viridis(np.linspace(0, 0.9, n))


def plot_p0_histogram(summary: dict[str, Any]):
  """Histogram (log x) of the pretrained model's per-prompt P on the test prompts, stacked by bucket."""
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
  p_P = np.asarray(summary["p0"]["p_hat_by_prompt"])
  bucket_P = np.asarray(summary["test_buckets"])
  bins = np.logspace(np.log10(max(p_P.min(), 1e-8)) - 0.1, np.log10(p_P.max()) + 0.1, 40)
  ax.hist([p_P[bucket_P == b] for b in summary["buckets"]], bins=bins, stacked=True,
          color=_colors(len(summary["buckets"])), label=list(summary["buckets"]))
  ax.set_xscale("log")
  ax.set_xlabel("cold-start P(y*|x) per test prompt (mean w over sampled rationales)")
  ax.set_ylabel("prompts")
  ax.set_title(f"Pretrained model: per-prompt P, {len(p_P)} test prompts")
  ax.legend(fontsize=8)
  return fig


def plot_escape(summary: dict[str, Any]):
  """Per method: each probe prompt's escape step against its p0 (log-log), seeds pooled; censored at the top."""
  import matplotlib.pyplot as plt
  names = list(summary["methods"])
  cols = 4
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), dpi=110, sharex=True, sharey=True)
  probe = summary["probe"]
  p0_P = np.asarray(probe["p0"])
  bucket_P = np.asarray(probe["bucket"])
  colors = dict(zip(summary["buckets"], _colors(len(summary["buckets"]))))
  top = summary["steps"] * 1.6
  for ax, name in zip(np.ravel(axes), names):
    runs = summary["methods"][name]
    esc = np.stack([run_escapes(r) for r in runs])
    for b in summary["buckets"]:
      sel = bucket_P == b
      x = np.tile(p0_P[sel], len(runs))
      y = esc[:, sel].reshape(-1)
      ax.scatter(x[np.isfinite(y)], y[np.isfinite(y)], s=9, color=colors[b], alpha=0.6, label=b)
      ax.scatter(x[~np.isfinite(y)], np.full((~np.isfinite(y)).sum(), top), s=9, marker="^", color=colors[b],
                 alpha=0.3)
    fit = fit_escape_slope(np.tile(p0_P, len(runs)), esc.reshape(-1))
    th = theory_slope(runs[0]["estimator"], runs[0]["q"])
    title = f"{name}: slope {fit['slope']:.2f}" if np.isfinite(fit["slope"]) else f"{name}: slope —"
    if np.isfinite(fit["slope"]):
      xs = np.logspace(np.log10(p0_P.min()), np.log10(min(p0_P.max(), ESCAPE_P)), 10)
      ax.plot(xs, np.exp(fit["intercept"]) * xs ** -fit["slope"], color="black", lw=1)
      if th is not None:
        ok = np.isfinite(esc.reshape(-1))
        anchor_x = np.exp(np.mean(np.log(np.tile(p0_P, len(runs))[ok])))
        anchor_y = np.exp(np.mean(np.log(esc.reshape(-1)[ok])))
        ax.plot(xs, anchor_y * (xs / anchor_x) ** -th, color="red", lw=1, ls="--")
    ax.set_title(title + ("" if th is None else f" (theory {th:g})"), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
  for ax in np.ravel(axes)[len(names):]:
    ax.axis("off")
  for ax in np.ravel(axes)[-cols:]:
    ax.set_xlabel("p0 of the probe prompt")
  for ax in np.ravel(axes)[::cols]:
    ax.set_ylabel(f"step P-hat >= {ESCAPE_P}")
  np.ravel(axes)[0].legend(fontsize=7, loc="lower left")
  fig.suptitle(f"Per-prompt escape ({summary['optimizer_label']}); triangles: not escaped in {summary['steps']} "
               "steps; black: fit, red dashed: theory slope 1-q", fontsize=10)
  return fig


def plot_curves(summary: dict[str, Any]):
  """Bucket-mean teacher-forced P-hat of the probe prompts against the step, one panel per bucket (seed means)."""
  import matplotlib.pyplot as plt
  buckets = summary["buckets"]
  fig, axes = plt.subplots(1, len(buckets), figsize=(3.4 * len(buckets), 3.4), dpi=110, sharey=True)
  bucket_P = np.asarray(summary["probe"]["bucket"])
  colors = _colors(len(summary["methods"]))
  for ax, b in zip(np.ravel(axes), buckets):
    for color, (name, runs) in zip(colors, summary["methods"].items()):
      style = "--" if name.startswith("PAFT") else (":" if name == "GRPO" else "-")
      steps = runs[0]["probe"]["steps"]
      mean_S = np.mean([np.asarray(r["probe"]["p_hat"])[:, bucket_P == b].mean(axis=1) for r in runs], axis=0)
      ax.plot(steps, mean_S, color=color, ls=style, lw=1.6, label=name)
    ax.axhline(ESCAPE_P, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_title(f"{b} (p0 ~ {summary['p0_by_bucket'][b]['mean']:.0e})", fontsize=9)
    ax.set_xlabel("training step")
  np.ravel(axes)[0].set_ylabel("mean P-hat of the bucket's probe prompts")
  np.ravel(axes)[-1].legend(fontsize=7, loc="lower right")
  fig.suptitle(f"Which prompts does each method learn? ({summary['optimizer_label']}, mean over seeds)", fontsize=10)
  return fig


def write_all(out_dir: str, suffix: str, summary: dict[str, Any]) -> str:
  """demo_table{suffix}.md and the three PNGs; returns the table text."""
  import os

  import matplotlib.pyplot as plt
  text = write_table(os.path.join(out_dir, f"demo_table{suffix}.md"), summary)
  for stem, fn in (("demo_p0_hist", plot_p0_histogram), ("demo_escape", plot_escape), ("demo_curves", plot_curves)):
    fig = fn(summary)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{stem}{suffix}.png"))
    plt.close(fig)
  return text
