"""The label-noise toy (Prop C.2, spec 2.8; fact 16): equilibrium contamination vs q, and the time to reach eta.

  python -m experiments.noise [--out_dir experiments/results]

Prints, for eps in {0.05, 0.1, 0.2} and q in {0, .25, .5, .75, 1}, the escort value p~* = r/(1+r), r =
(eps/(1-eps))^(1/q), next to the zero of the autograd drift of jq_loss and the end of a long simulated flow; then
the time to reach contamination eta from 0+ (quadrature of eq. 16, the diffrax flow, and eta^(q+1)/((q+1) eps c^2)).
Writes noise.png and noise.json. About 30 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from experiments._results import write_study

from tsallis_jax import theory

Q_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
EPSILONS = (0.05, 0.1, 0.2)
ETAS = (1e-5, 1e-4, 1e-3, 1e-2)


def run_noise_study(*, q_grid=Q_GRID, epsilons=EPSILONS, etas=ETAS, time_epsilon: float = 0.1) -> dict:
  """Equilibria (exact, autograd root, simulated) and times to eta; returns a JSON-ready dict."""
  equilibria = []
  for epsilon in epsilons:
    for q in q_grid:
      row = dict(epsilon=epsilon, q=q, escort=theory.noise_equilibrium(q, epsilon))
      if q > 0:
        row["autograd_root"] = theory.noise_equilibrium_numerical(q, epsilon)
        row["simulated"] = float(theory.simulate_noise_flow(q, epsilon=epsilon)[1][-1])
      else:
        _, path = theory.simulate_noise_flow(0.0, epsilon=epsilon, t_end=5e-7, contamination0=1e-6)
        row["simulated"] = 0.0
        row["q0_monotone_decrease"] = bool(np.all(np.diff(path) < 0))
      equilibria.append(row)
  times = []
  for q in q_grid:
    for eta in etas:
      row = dict(q=q, eta=eta, epsilon=time_epsilon,
                 quadrature=theory.noise_time_to_contamination(q, eta, epsilon=time_epsilon),
                 asymptotic=theory.noise_time_asymptotic(q, eta, epsilon=time_epsilon))
      row["ode"] = theory.simulate_noise_time(q, eta, epsilon=time_epsilon)
      times.append(row)
  return dict(equilibria=equilibria, times=times)


def _fmt(x) -> str:
  return "inf" if x == math.inf else f"{x:.6g}"


def format_tables(study: dict) -> str:
  lines = ["Equilibrium contamination p~*(q): escort r/(1+r) | zero of the jq_loss autograd drift | end of the flow",
           f"{'eps':>5} {'q':>5} {'escort':>13} {'autograd':>13} {'flow':>13}"]
  for r in study["equilibria"]:
    lines.append(f"{r['epsilon']:>5} {r['q']:>5} {_fmt(r['escort']):>13} {_fmt(r.get('autograd_root', 0.0)):>13} "
                 f"{_fmt(r['simulated']):>13}" + ("   (q=0: p~ decreases monotonically: "
                                                 f"{r['q0_monotone_decrease']})" if r["q"] == 0 else ""))
  eps = study["times"][0]["epsilon"]
  lines += [f"Time to reach contamination eta from 0+ (eps={eps}, c=1): quadrature | ODE (from 1e-3 eta) | "
            "eta^(q+1)/((q+1) eps)  [inf: never, eta >= p~* or q = 0]",
            f"{'q':>5} {'eta':>7} {'quadrature':>13} {'ODE':>13} {'asymptotic':>13} {'ratio':>7}"]
  for r in study["times"]:
    ratio = r["quadrature"] / r["asymptotic"] if r["quadrature"] < math.inf else math.inf
    lines.append(f"{r['q']:>5} {r['eta']:>7.0e} {_fmt(r['quadrature']):>13} {_fmt(r['ode']):>13} "
                 f"{_fmt(r['asymptotic']):>13} {_fmt(ratio):>7}")
  return "\n".join(lines)


def plot(study: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_eq, ax_path) = plt.subplots(1, 2, figsize=(11, 4.2))
  dense_q = np.linspace(0.1, 1.0, 60)
  for epsilon, color in zip(sorted({r["epsilon"] for r in study["equilibria"]}), ("C0", "C1", "C2")):
    ax_eq.semilogy(dense_q, [theory.noise_equilibrium(q, epsilon) for q in dense_q], color=color,
                   label=f"escort, eps={epsilon}")
    rows = [r for r in study["equilibria"] if r["epsilon"] == epsilon and r["q"] > 0]
    ax_eq.semilogy([r["q"] for r in rows], [r["simulated"] for r in rows], "o", color=color, mfc="none")
  ax_eq.set_xlabel("q")
  ax_eq.set_ylabel("equilibrium contamination p~*")
  ax_eq.set_title("escort (lines) vs end of the jq_loss gradient flow (circles)", fontsize=9)
  ax_eq.legend(fontsize=8)
  for q, color in zip((0.25, 0.5, 0.75, 1.0), plt.cm.viridis(np.linspace(0, 0.9, 4))):
    times_T, contamination_T = theory.simulate_noise_flow(q, epsilon=0.1, t_end=3.0, num_points=200,
                                                          contamination0=1e-9, log_spaced=True)
    ax_path.loglog(times_T[1:], contamination_T[1:], color=color, label=f"q={q:g}")
    ax_path.axhline(theory.noise_equilibrium(q, 0.1), color=color, ls=":", lw=1)
  ax_path.set_xlabel("time t (flow from p~(0) = 1e-9)")
  ax_path.set_ylabel("contamination p~(t), eps = 0.1")
  ax_path.set_title("high q fits the noise sooner and to a higher level (dotted: escort)", fontsize=9)
  ax_path.legend(fontsize=8)
  return fig


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="experiments/results")
  args = parser.parse_args(argv)
  start = time.time()
  study = run_noise_study()
  print(format_tables(study))
  write_study(study, plot, args.out_dir, "noise", start)
  return study


if __name__ == "__main__":
  main()
