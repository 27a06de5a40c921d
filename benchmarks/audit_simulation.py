"""The white-box audit's ceiling: the same canaries without any data, in numpy.

In `--mode=audit`, a gradient canary's coordinate receives at step t the release
x_t = b_t + (data gradients) + N(0, sigma^2) in units of C / B, where b_t = 1 if the step drew
the (included) canary. Dropping the data gradients leaves an ideal white-box attacker on the same
mechanism; its bounds show how much of the gap to the claimed epsilon is the one-run method's
(m canaries, Poisson sampling) and how much is the data's. Both scores of the report are
simulated: the summed per-step log-likelihood ratio ("gradient") and the plain sum
("gradient_sum"). Usage:

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
    parser.add_argument("--confidence", type=float, default=0.975)  # a report's per-kind
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, sigma = args.q, args.sigma
    results = {"gradient": [], "gradient_sum": []}
    for _ in range(args.repeats):
        included = rng.random(args.canaries) < 0.5
        drawn = (rng.random((args.canaries, args.steps)) < q) & included[:, None]
        x = drawn + sigma * rng.normal(size=drawn.shape)
        scores = {
            "gradient": np.logaddexp(np.log1p(-q),
                                     np.log(q) + (x - 0.5) / sigma**2).sum(1),
            "gradient_sum": x.sum(1)
        }
        for kind, score in scores.items():
            results[kind].append(
                lower_bounds(score, included, delta=args.delta, confidence=args.confidence))
    summary = {
        kind: {
            k: [round(float(f([r[k]
                               for r in rs])), 3)
                for f in (np.min, np.median, np.max)]
            for k in ("epsilon_lower_bound", "epsilon_lower_bound_fdp", "auroc")
        } for kind, rs in results.items()
    }
    print(json.dumps({"args": vars(args), "min_median_max_over_repeats": summary}))


if __name__ == "__main__":
    main()
