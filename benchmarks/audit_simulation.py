"""The white-box audit's ceiling: the same canaries without any data, in numpy.

Each gradient canary's score in `--mode=audit` is the sum over steps of the released update at
its coordinate: (k C + sum of T noise draws N(0, (sigma C)^2) + data gradients) / B, where k is
the number of steps that drew it (0 when excluded). Dropping the data gradients leaves the scores
of an ideal white-box attacker on the same mechanism; their bounds show how much of the gap to
the claimed epsilon is the one-run method's (m canaries, Poisson sampling) and how much is the
data's. Usage:

    python benchmarks/audit_simulation.py --q=0.05242 --steps=30 --sigma=0.5406 --canaries=500
"""

import argparse
import json

import numpy as np

from jaxdpdm.audit.report import lower_bounds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--q", type=float, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--canaries", type=int, required=True)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for _ in range(args.repeats):
        included = rng.random(args.canaries) < 0.5
        drawn = rng.binomial(args.steps, args.q, size=args.canaries) * included
        scores = drawn + args.sigma * np.sqrt(args.steps) * rng.normal(size=args.canaries)
        results.append(lower_bounds(scores, included, delta=args.delta,
                                    confidence=args.confidence))
    summary = {k: float(np.median([r[k] for r in results])) for k in
               ("epsilon_lower_bound", "epsilon_lower_bound_fdp", "tpr_at_1pct_fpr", "auroc")}
    print(json.dumps({"args": vars(args), "median_over_repeats": summary}))


if __name__ == "__main__":
    main()
