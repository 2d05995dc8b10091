"""Escape times T_q(p0) of the softmax toy: exact, gradient-flow ODE and asymptotics (spec 1.5, 2.7; facts 6-7).

  python -m experiments.escape_time [--out_dir experiments/results] [--num_trajectories 10] [--no_simulate]
  python -m experiments.escape_time --sgd [--sgd_p0 1e-3 1e-4] [--sgd_num_samples 32] [--sgd_seeds 8]

Prints the table of T_q(p0) for q in {0, .25, .5, .75, 1} and p0 = 1e-1 ... 1e-6 (exact closed form or series, the
diffrax flow through jq_loss's autograd, and the leading asymptotic order), the fitted log-log slopes (1 - q for
q < 1; the slope against ln(1/p0) at q = 1, which is (K-1)/K), and writes escape_time.png and escape_time.json into
the output folder. About 20 s on 2 CPU cores (mostly compilation of the ODE solve).

With --sgd it runs instead the discrete-time, finite-sample bridge (`tsallis_jax.theory.sgd`): plain SGD on the same
toy with garl_grad / paft_grad / grpo_grad, M rollouts per step and one learning rate for every method, counting the
steps until P >= 1/2 (capped) over seeds, for binary rewards and likelihood weights, with and without the 1/M^q
factor of Algorithms 1-2. Writes escape_sgd.png and escape_sgd.json. About 3-4 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from experiments._results import write_study

from tsallis_jax import theory

Q_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
P0_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
SLOPE_P0 = (1e-3, 1e-4, 1e-5, 1e-6)


def run_escape_study(*, num_trajectories: int = 10, num_correct: int = 1, delta: float = 0.5,
                     q_grid=Q_GRID, p0_grid=P0_GRID, simulate: bool = True) -> dict:
  """Computes the escape-time table, the fitted slopes and the ordering ratios; returns a JSON-ready dict."""
  shape = dict(num_trajectories=num_trajectories, num_correct=num_correct)
  rows = []
  for q in q_grid:
    for p0 in p0_grid:
      if p0 >= delta:
        continue
      exact = theory.escape_time(q, p0, delta=delta, **shape)
      row = dict(q=q, p0=p0, exact=exact, asymptotic=theory.escape_time_asymptotic(q, p0, **shape))
      if simulate:
        row["ode"] = theory.simulate_escape_time(q, p0, delta=delta, **shape)
        row["ode_rel_err"] = abs(row["ode"] / exact - 1.0)
      rows.append(row)
  slopes = {}
  slope_p0 = np.array([p for p in SLOPE_P0 if p < delta])
  for q in q_grid:
    times = np.array([theory.escape_time(q, p0, delta=delta, **shape) for p0 in slope_p0])
    if q == 1.0:
      slopes[str(q)] = dict(kind="T vs ln(1/p0)", fitted=float(np.polyfit(np.log(1.0 / slope_p0), times, 1)[0]),
                            predicted=1.0 / theory.softmax_toy_score_scale(**shape))
    else:
      slopes[str(q)] = dict(kind="log T vs log(1/p0)", fitted=theory.log_log_slope(1.0 / slope_p0, times),
                            predicted=1.0 - q)
  return dict(num_trajectories=num_trajectories, num_correct=num_correct, delta=delta, rows=rows, slopes=slopes,
              slope_p0=slope_p0.tolist())


def format_table(study: dict) -> str:
  q_grid = sorted({r["q"] for r in study["rows"]})
  p0_grid = sorted({r["p0"] for r in study["rows"]}, reverse=True)
  by_key = {(r["q"], r["p0"]): r for r in study["rows"]}
  lines = [f"Escape times T_q(p0) to delta={study['delta']}, softmax toy K={study['num_trajectories']}, "
           f"C={study['num_correct']}: exact / ODE (diffrax through jq_loss) / leading asymptotic order",
           "p0      " + "".join(f"{'q=' + str(q):>36}" for q in q_grid)]
  for p0 in p0_grid:
    cells = []
    for q in q_grid:
      r = by_key[(q, p0)]
      ode = f"{r['ode']:.6g}" if "ode" in r else "-"
      cells.append(f"{r['exact']:>12.6g} /{ode:>11} /{r['asymptotic']:>9.4g}")
    lines.append(f"{p0:<8.0e}" + "".join(cells))
  if any("ode" in r for r in study["rows"]):
    lines.append(f"max relative |ODE - exact| / exact: {max(r['ode_rel_err'] for r in study['rows']):.2e}")
  lines.append(f"Fitted slopes over p0 in {study['slope_p0']}:")
  for q, s in study["slopes"].items():
    lines.append(f"  q={q:<5} {s['kind']:<20} fitted {s['fitted']:.4f}   predicted {s['predicted']:.4f}")
  smallest = min(p0_grid)
  times = [by_key[(q, smallest)]["exact"] for q in q_grid]
  lines.append(f"Ordering at p0={smallest:g}: " + " > ".join(f"T_{q:g}={t:.4g}" for q, t in zip(q_grid, times))
               + f"  (strict: {all(a > b for a, b in zip(times[:-1], times[1:]))})")
  return "\n".join(lines)


def plot(study: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
  dense_p0 = np.geomspace(min(r["p0"] for r in study["rows"]), 0.2, 80)
  shape = dict(num_trajectories=study["num_trajectories"], num_correct=study["num_correct"])
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(study["slopes"])))
  t1 = np.array([theory.escape_time(1.0, p, delta=study["delta"], **shape) for p in dense_p0])
  for color, q in zip(colors, sorted(float(k) for k in study["slopes"])):
    exact = np.array([theory.escape_time(q, p, delta=study["delta"], **shape) for p in dense_p0])
    asym = np.array([theory.escape_time_asymptotic(q, p, **shape) for p in dense_p0])
    ax.loglog(1.0 / dense_p0, exact, color=color, label=f"q={q:g} exact")
    ax.loglog(1.0 / dense_p0, asym, color=color, ls=":", lw=1)
    rows = [r for r in study["rows"] if r["q"] == q and "ode" in r]
    if rows:
      ax.loglog([1.0 / r["p0"] for r in rows], [r["ode"] for r in rows], "o", color=color, ms=5, mfc="none")
    ax_ratio.loglog(1.0 / dense_p0, exact / t1, color=color, label=f"T_{q:g} / T_1")
  ax.set_xlabel("1 / p0")
  ax.set_ylabel("escape time T_q(p0) to P = 1/2")
  ax.set_title(f"softmax toy K={study['num_trajectories']}: exact (lines), ODE (circles), asymptote (dotted)",
               fontsize=9)
  ax.legend(fontsize=8)
  ax_ratio.set_xlabel("1 / p0")
  ax_ratio.set_ylabel("T_q / T_1")
  ax_ratio.set_title("high q escapes faster; the gap grows as p0 -> 0", fontsize=9)
  ax_ratio.legend(fontsize=8)
  return fig


SGD_METHODS = (("garl", Q_GRID), ("paft", Q_GRID), ("grpo", (0.0,)))


def run_sgd_study(*, p0_grid=(1e-3, 1e-4), sizes_M=(32,), rewards=("binary", "likelihood"),
                  normalisations=(True, False), num_trajectories: int = 10, num_seeds: int = 8,
                  max_steps: int = 3000, learning_rate: float = 1.0) -> dict:
  """Steps to escape of SGD with each estimator; one row per (method, q, reward, 1/M^q, p0, M)."""
  rows = []
  for reward in rewards:
    for normalize in normalisations:
      for method, q_grid in SGD_METHODS:
        if method == "grpo" and normalize != normalisations[0]:
          continue  # GRPO has no 1/M^q factor: one run serves both columns
        for m in sizes_M:
          for p0 in p0_grid:
            for q in q_grid:
              steps_S = theory.sgd_escape_steps(method, q, p0, num_samples=m, num_trajectories=num_trajectories,
                                                reward=reward, learning_rate=learning_rate, max_steps=max_steps,
                                                num_seeds=num_seeds, normalize_by_Mq=normalize)
              rows.append(dict(method=method, q=q, reward=reward, normalize_by_Mq=normalize, p0=p0, M=m,
                               steps=steps_S.tolist(), median=float(np.median(steps_S)),
                               escaped_frac=float(np.mean(steps_S < max_steps))))
  return dict(rows=rows, max_steps=max_steps, learning_rate=learning_rate, num_seeds=num_seeds,
              num_trajectories=num_trajectories)


def format_sgd_table(study: dict) -> str:
  rows = study["rows"]
  settings = sorted({(r["reward"], r["normalize_by_Mq"], r["p0"], r["M"]) for r in rows},
                    key=lambda k: (k[0], not k[1], -k[2], k[3]))
  def label(reward, normalize, p0, m):
    return f"{reward[:3]} {'1/M^q' if normalize else 'eq12'} p0={p0:g} M={m}"
  header = "".join(f"{label(*setting):>26}" for setting in settings)
  lines = [f"SGD steps to escape (P >= 1/2), softmax toy K={study['num_trajectories']}, lr={study['learning_rate']}, "
           f"cap {study['max_steps']}: median over {study['num_seeds']} seeds [fraction escaped]",
           f"{'method':<10}" + header]
  for method, q_grid in SGD_METHODS:
    for q in q_grid:
      cells = []
      for rw, nz, p0, m in settings:
        match = [r for r in rows if r["method"] == method and r["q"] == q and r["reward"] == rw and r["p0"] == p0
                 and r["M"] == m and (r["normalize_by_Mq"] == nz or method == "grpo")]
        cells.append(f"{match[0]['median']:>19.0f} [{match[0]['escaped_frac']:.2f}]" if match else f"{'-':>26}")
      lines.append(f"{method + ('' if method == 'grpo' else f' q={q:g}'):<10}" + "".join(cells))
  return "\n".join(lines)


def plot_sgd(study: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = study["rows"]
  panels = sorted({(r["reward"], r["normalize_by_Mq"]) for r in rows}, key=lambda k: (k[0], not k[1]))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
  for ax, (reward, normalize) in zip(axes[0], panels):
    for p0, color in zip(sorted({r["p0"] for r in rows}, reverse=True), ("C0", "C1", "C2", "C3")):
      for method, marker, ls in (("garl", "o", "-"), ("paft", "s", "--")):
        sel = [r for r in rows if r["method"] == method and r["reward"] == reward
               and r["normalize_by_Mq"] == normalize and r["p0"] == p0]
        sel.sort(key=lambda r: r["q"])
        ax.semilogy([r["q"] for r in sel], [r["median"] for r in sel], marker=marker, ls=ls, color=color,
                    mfc="none", label=f"{method.upper()} p0={p0:g}")
      grpo = [r for r in rows if r["method"] == "grpo" and r["reward"] == reward and r["p0"] == p0]
      if grpo:
        ax.axhline(grpo[0]["median"], color=color, ls=":", lw=1.2, label=f"GRPO p0={p0:g}")
    ax.axhline(study["max_steps"], color="k", lw=0.8)
    ax.set_xlabel("q")
    ax.set_title(f"{reward} weights, {'with 1/M^q (Alg. 1-2)' if normalize else 'eq. 12/14 (no 1/M^q)'}",
                 fontsize=9)
  axes[0][0].set_ylabel(f"median SGD steps to P >= 1/2 (cap {study['max_steps']})")
  axes[0][-1].legend(fontsize=7)
  return fig


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="experiments/results")
  parser.add_argument("--num_trajectories", type=int, default=10)
  parser.add_argument("--num_correct", type=int, default=1)
  parser.add_argument("--delta", type=float, default=0.5)
  parser.add_argument("--no_simulate", action="store_true", help="skip the ODE column")
  parser.add_argument("--sgd", action="store_true", help="run the SGD bridge with the estimators instead")
  parser.add_argument("--sgd_p0", type=float, nargs="+", default=[1e-3, 1e-4])
  parser.add_argument("--sgd_num_samples", type=int, nargs="+", default=[32], help="M rollouts per step")
  parser.add_argument("--sgd_seeds", type=int, default=8)
  parser.add_argument("--sgd_max_steps", type=int, default=3000)
  parser.add_argument("--sgd_learning_rate", type=float, default=1.0)
  args = parser.parse_args(argv)
  start = time.time()
  if args.sgd:
    study = run_sgd_study(p0_grid=tuple(args.sgd_p0), sizes_M=tuple(args.sgd_num_samples),
                          num_trajectories=args.num_trajectories, num_seeds=args.sgd_seeds,
                          max_steps=args.sgd_max_steps, learning_rate=args.sgd_learning_rate)
    print(format_sgd_table(study))
    write_study(study, plot_sgd, args.out_dir, "escape_sgd", start)
    return study
  study = run_escape_study(num_trajectories=args.num_trajectories, num_correct=args.num_correct, delta=args.delta,
                           simulate=not args.no_simulate)
  print(format_table(study))
  write_study(study, plot, args.out_dir, "escape_time", start)
  return study


if __name__ == "__main__":
  main()
