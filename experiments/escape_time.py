"""Escape times T_q(p0) of the softmax toy: exact, gradient-flow ODE and asymptotics (spec 1.5, 2.7; facts 6-7).

  python -m experiments.escape_time [--out_dir experiments/results] [--num_trajectories 10] [--no_simulate]

Prints the table of T_q(p0) for q in {0, .25, .5, .75, 1} and p0 = 1e-1 ... 1e-6 (exact closed form or series, the
diffrax flow through jq_loss's autograd, and the leading asymptotic order), the fitted log-log slopes (1 - q for
q < 1; the slope against ln(1/p0) at q = 1, which is (K-1)/K), and writes escape_time.png and escape_time.json into
the output folder. About 20 s on 2 CPU cores (mostly compilation of the ODE solve).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

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


def plot(study: dict, path: str) -> None:
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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="experiments/results")
  parser.add_argument("--num_trajectories", type=int, default=10)
  parser.add_argument("--num_correct", type=int, default=1)
  parser.add_argument("--delta", type=float, default=0.5)
  parser.add_argument("--no_simulate", action="store_true", help="skip the ODE column")
  args = parser.parse_args(argv)
  start = time.time()
  study = run_escape_study(num_trajectories=args.num_trajectories, num_correct=args.num_correct, delta=args.delta,
                           simulate=not args.no_simulate)
  print(format_table(study))
  os.makedirs(args.out_dir, exist_ok=True)
  plot(study, os.path.join(args.out_dir, "escape_time.png"))
  with open(os.path.join(args.out_dir, "escape_time.json"), "w") as f:
    json.dump(study, f, indent=1)
  print(f"wrote {args.out_dir}/escape_time.png and escape_time.json in {time.time() - start:.1f} s")
  return study


if __name__ == "__main__":
  main()
