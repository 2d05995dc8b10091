"""Measured bias of GARL / PAFT on the toys against rho(q, M, P) and the delta method (spec 1.6, 2.4; facts 8-9).

  python -m experiments.estimator_bias [--out_dir experiments/results] [--replicates 40000]

Binary rewards (softmax toy, K=6, C=2, P=0.2 unless --p): the Monte Carlo shrinkage rho-hat (the bias's component
along grad l_q, plus 1) of the core's garl_grad (plug-in and RLOO) and paft_grad, next to the exact
rho = E[(S/M)^(1-q)]/P^(1-q) and the delta method 1 - q(1-q)(1-P)/(2MP), for M in {8, 16, 32, 64, 128}, with the
log-log slope of 1 - rho in M.
Likelihood weights (w = sigmoid(phi_z)): M |bias| against the Thm 6.1 coefficient, and their cosine. Writes
estimator_bias.png and estimator_bias.json. About 1.5 CPU-minutes (4 minutes of wall time on a busy 2-core machine;
each (estimator, M) compiles once).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from experiments._results import write_study

from tsallis_jax import theory

SIZES_M = (8, 16, 32, 64, 128)
P_VALUES = (0.2,)
Q_VALUES = (0.5, 0.75, 1.0)
PAFT_SIZES_M = (8, 32)


def run_bias_study(*, sizes_M=SIZES_M, p_values=P_VALUES, q_values=Q_VALUES, paft_sizes_M=PAFT_SIZES_M,
                   num_replicates: int = 40_000, seed: int = 0) -> dict:
  """Measured vs predicted shrinkage (binary) and M-scaled bias vs the Thm 6.1 coefficient (likelihood)."""
  key = jax.random.key(seed)
  binary_rows = []
  for p in p_values:
    params = theory.binary_toy_params(theory.softmax_toy_init(p, num_trajectories=6, num_correct=2))
    correct_K = np.arange(6) < 2
    for q in q_values:
      for estimator, sizes in (("garl_plugin", sizes_M), ("garl_rloo", sizes_M), ("paft", paft_sizes_M)):
        for m in sizes:
          key, sub = jax.random.split(key)
          r = theory.measure_bias(estimator, q, m, params=params, correct_K=correct_K, key=sub,
                                  num_replicates=num_replicates, num_chunks=20)
          exact = theory.binary_shrinkage(q, m, r["P"])
          if estimator == "garl_rloo" and q == 1.0:
            exact = 1.0 - (1.0 - r["P"]) ** (m - 1)  # zero-success convention with the q = 1 baseline (spec 2.2)
          binary_rows.append(dict(estimator=estimator, q=q, P=r["P"], M=m, rho_measured=r["rho"],
                                  rho_se=r["rho_se"], rho_exact=exact,
                                  rho_delta=theory.delta_method_shrinkage(q, m, r["P"]), perp_rel=r["perp_rel"]))
  slopes = []
  for p in p_values:
    for q in q_values:
      for estimator in ("garl_plugin", "garl_rloo"):
        rows = [r for r in binary_rows if r["estimator"] == estimator and r["q"] == q and abs(r["P"] - p) < 1e-6
                and r["M"] * p >= 4]
        if len(rows) >= 2 and q < 1.0:
          slopes.append(dict(estimator=estimator, q=q, P=p, M=[r["M"] for r in rows],
                             measured=theory.log_log_slope([r["M"] for r in rows],
                                                           [1 - r["rho_measured"] for r in rows]),
                             exact=theory.log_log_slope([r["M"] for r in rows], [1 - r["rho_exact"] for r in rows])))
  likelihood_rows = []
  params = theory.likelihood_toy_init(0.2, num_trajectories=6, num_correct=2, correct_weight=0.6,
                                      wrong_weight_ratio=0.3)
  for q in (0.5, 1.0):
    coefficient_D = theory.likelihood_bias_coefficient(params, q)
    for estimator in ("garl_plugin", "garl_rloo", "paft"):
      for m in (16, 64):
        key, sub = jax.random.split(key)
        r = theory.measure_bias(estimator, q, m, params=params, toy="likelihood", key=sub,
                                num_replicates=num_replicates, num_chunks=20)
        scaled_D = m * r["bias_D"]
        likelihood_rows.append(dict(
          estimator=estimator, q=q, P=r["P"], M=m,
          scaled_bias_over_coefficient=float(np.linalg.norm(scaled_D) / np.linalg.norm(coefficient_D)),
          cosine=float(scaled_D @ coefficient_D / np.linalg.norm(scaled_D) / np.linalg.norm(coefficient_D)),
          relative_se=float(np.linalg.norm(r["se_D"]) / np.linalg.norm(r["bias_D"]))))
  return dict(binary=binary_rows, slopes=slopes, likelihood=likelihood_rows, num_replicates=num_replicates)


def format_tables(study: dict) -> str:
  lines = [f"Binary rewards, softmax toy K=6 C=2, {study['num_replicates']} groups per cell: shrinkage rho "
           "(E[estimate] = rho grad l_q)",
           f"{'estimator':<12} {'q':>5} {'P':>5} {'M':>4} {'measured':>10} {'+-se':>8} {'exact':>9} {'delta':>9}"
           f" {'perp':>7}"]
  for r in study["binary"]:
    lines.append(f"{r['estimator']:<12} {r['q']:>5} {r['P']:>5.2f} {r['M']:>4} {r['rho_measured']:>10.5f} "
                 f"{r['rho_se']:>8.5f} {r['rho_exact']:>9.5f} {r['rho_delta']:>9.5f} {r['perp_rel']:>7.1e}")
  lines.append("Log-log slope of 1 - rho against M (cells with M P >= 4): measured / exact (theory: -1 as M grows)")
  for s in study["slopes"]:
    lines.append(f"  {s['estimator']:<12} q={s['q']:<5} P={s['P']:<5.2f} M={s['M']}: {s['measured']:.3f} / "
                 f"{s['exact']:.3f}")
  lines.append("Likelihood weights (w = sigmoid(phi_z), P=0.2): M |bias| / |Thm 6.1 coefficient| and cosine")
  for r in study["likelihood"]:
    lines.append(f"  {r['estimator']:<12} q={r['q']:<4} M={r['M']:<4} ratio {r['scaled_bias_over_coefficient']:.3f}"
                 f"  cosine {r['cosine']:.5f}  (relative se {r['relative_se']:.3f})")
  return "\n".join(lines)


def plot(study: dict):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  p_values = sorted({round(r["P"], 4) for r in study["binary"]})
  fig, axes = plt.subplots(1, len(p_values), figsize=(5.5 * len(p_values), 4.2), squeeze=False)
  for ax, p in zip(axes[0], p_values):
    # q = 1 is left out: its shrinkage 1 - (1-P)^M vanishes exponentially in M, not as 1/M (see the table).
    for q, color in zip(sorted({r["q"] for r in study["binary"] if r["q"] < 1.0}), ("C0", "C1", "C2", "C3")):
      rows = [r for r in study["binary"] if r["estimator"] == "garl_plugin" and r["q"] == q
              and abs(r["P"] - p) < 1e-3]
      sizes = np.array([r["M"] for r in rows])
      ax.errorbar(sizes, [1 - r["rho_measured"] for r in rows], yerr=[2 * r["rho_se"] for r in rows], fmt="o",
                  color=color, mfc="none", label=f"q={q:g} measured (GARL plug-in)")
      ax.loglog(sizes, [1 - r["rho_exact"] for r in rows], "-", color=color, label=f"q={q:g} exact")
      ax.loglog(sizes, [1 - r["rho_delta"] for r in rows], ":", color=color)
      for estimator, marker in (("garl_rloo", "x"), ("paft", "+")):
        more = [r for r in study["binary"] if r["estimator"] == estimator and r["q"] == q and abs(r["P"] - p) < 1e-3]
        ax.plot([r["M"] for r in more], [1 - r["rho_measured"] for r in more], marker, color=color, ms=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("M (samples per prompt)")
    ax.set_ylabel("1 - rho (relative shrinkage bias)")
    ax.set_title(f"binary toy, P={p:g}: measured (2 se), exact (lines), delta method (dotted); x RLOO, + PAFT",
                 fontsize=8)
    ax.legend(fontsize=7)
  return fig


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="experiments/results")
  parser.add_argument("--replicates", type=int, default=40_000, help="groups of M samples per cell")
  parser.add_argument("--p", type=float, nargs="+", default=list(P_VALUES),
                      help="success probabilities of the binary toy (e.g. --p 0.05 0.2; 0.05 shows MP <~ 1)")
  args = parser.parse_args(argv)
  start = time.time()
  study = run_bias_study(num_replicates=args.replicates, p_values=tuple(args.p))
  print(format_tables(study))
  write_study(study, plot, args.out_dir, "estimator_bias", start)
  return study


if __name__ == "__main__":
  main()
