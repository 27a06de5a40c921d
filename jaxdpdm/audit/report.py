"""Empirical epsilon lower bounds from canary scores, and the audit report.

The statistics are jax-privacy's `CanaryScoreAuditor` (imported here, lazily, so the rest of
jaxdpdm never loads it); this module only chooses the methods and writes what they mean.

* `one_run` (the verdict): Steinke, Nasr and Jagielski (2023), "Privacy auditing with one (1)
  training run". Guessing which canaries were included, from their scores, cannot beat what an
  (epsilon, delta)-DP mechanism allows; the bound is the largest epsilon that the observed guesses
  reject at the stated confidence. It holds for any (epsilon, delta)-DP mechanism.
* `one_run_fdp`: Mahloujifar et al. (2024), "Auditing f-differential privacy in one run": tighter,
  but it tests the stronger claim that the mechanism is as private as the Gaussian mechanism with
  that (epsilon, delta), whose trade-off curve DP-SGD's need not match exactly. Reported for
  comparison; the verdict uses `one_run`.
* TPR at 1% FPR and AUROC: how well the scores separate included from excluded canaries
  (AUROC 0.5: not at all).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxdpdm import storage

# The scores whose bounds decide the verdict (one per canary kind, chosen before the run).
VERDICT_KINDS = ("gradient", "input")
REPORT_JSON = "audit_report.json"
REPORT_TXT = "audit_report.txt"

SCORES = {
    "gradient": ("white box: gradient-space Dirac canaries (norm C on one trainable coordinate "
                 "each); score = sum over all steps of the log-likelihood ratio of 'included' "
                 "given the released noisy update ((clipped sum + noise) / expected batch size) "
                 "at the canary's coordinate, for the claimed sigma and q"),
    "gradient_sum": ("the same white-box canaries scored by the plain sum of the released "
                     "updates at their coordinates (for comparison; not in the verdict)"),
    "input": ("black box: out-of-distribution images (uniform random pixels) with random "
              "labels; score = minus the final EMA model's diffusion loss on the canary, "
              "averaged over fixed timesteps and noise draws"),
}


def lower_bounds(scores: np.ndarray, included: np.ndarray, *, delta: float,
                 confidence: float) -> dict[str, Any]:
    """Epsilon lower bounds and attack quality from m canaries' scores (higher: "included").

    Args:
      scores: f32[m] scores of all canaries.
      included: bool[m] their secret inclusion bits.
      delta: the delta of the claim under test.
      confidence: probability that a bound holds for a mechanism that meets the claim.
    """
    from jax_privacy.auditing import CanaryScoreAuditor  # pylint: disable=import-outside-toplevel

    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and inclusion bits {included.shape} must be "
                         "vectors of the same length")
    if included.all() or not included.any():
        raise ValueError(f"all {included.size} canaries fell on the same side of the coin: an "
                         "audit needs included and excluded canaries (use more canaries)")
    auditor = CanaryScoreAuditor(scores[included], scores[~included])
    significance = 1.0 - confidence
    return {
        "num_canaries": int(included.size),
        "num_included": int(included.sum()),
        "epsilon_lower_bound": float(auditor.epsilon_one_run(significance, delta)),
        "epsilon_lower_bound_fdp": float(auditor.epsilon_one_run_fdp(significance, delta)),
        "tpr_at_1pct_fpr": float(auditor.tpr_at_given_fpr(0.01)),
        "auroc": float(auditor.attack_auroc()),
    }


def audit_report(bounds: dict[str,
                              dict], *, claimed_epsilon: float, delta: float, confidence: float,
                 per_kind_confidence: float, privacy: dict, compute: dict) -> dict[str, Any]:
    """The report: the claim, per canary kind its bounds and score, and a verdict.

    `per_kind_confidence` is the confidence of each bound: 1 - (1 - confidence) / k for the k
    kinds in the verdict, so that the verdict as a whole errs with probability <= 1 - confidence.
    """
    exceeded = [
        k for k, b in bounds.items()
        if k in VERDICT_KINDS and b["epsilon_lower_bound"] > claimed_epsilon
    ]
    if exceeded:
        verdict = (f"VIOLATION: the {' and '.join(exceeded)} canaries give an epsilon lower "
                   f"bound above the claimed {claimed_epsilon:.4g}. At {confidence:.0%} "
                   "confidence the implementation leaks more than it claims: do not release "
                   "models trained with it until the cause is found.")
    else:
        verdict = (f"consistent: every lower bound is at most the claimed epsilon "
                   f"{claimed_epsilon:.4g}.")
    return {
        "claim": {
            "epsilon": claimed_epsilon, "delta": delta, "target_epsilon": privacy["guarantee"]
                                                                          ["target_epsilon"],
            "accountant": privacy["guarantee"]["enforced_accountant"]
        },
        "confidence": confidence,
        "per_kind_confidence": per_kind_confidence,
        "methods": {
            "epsilon_lower_bound": "one run, Steinke, Nasr & Jagielski 2023 (verdict)",
            "epsilon_lower_bound_fdp": "one run f-DP, Mahloujifar et al. 2024 (assumes a "
                                       "Gaussian trade-off curve)",
            "statistics": "jax_privacy.auditing.CanaryScoreAuditor (Bonferroni over thresholds; "
                          "each kind's bound at per_kind_confidence, Bonferroni over the kinds "
                          "in the verdict)",
        },
        "canaries": {
            kind: {"score": SCORES[kind], "in_verdict": kind in VERDICT_KINDS, **b}
            for kind, b in bounds.items()
        },
        "mechanism": {
            k: privacy["mechanism"][k] for k in ("noise_multiplier", "sampling_rate", "steps",
                                                "expected_batch_size", "num_examples", "clip_norm")
        },
        "compute": compute,
        "verdict": verdict,
        "reading":
            ("A lower bound is an epsilon that the observed canary guesses prove the run exceeds, "
             f"with probability at least {confidence:.0%} if the claim were false only by chance. "
             "A lower bound below the claim is consistent with it (it is not a proof: a weak "
             "attack gives low bounds whatever the truth); a lower bound above the claim means the "
             "implementation leaks more than it claims. White-box bounds come close to the claim "
             "only at high epsilon and with many canaries; black-box bounds are usually far "
             "below it. This model was trained WITH canaries: it is for auditing only, never "
             "for release."),
    }


def format_audit_report(report: dict[str, Any]) -> str:
    claim = report["claim"]
    lines = [
        f"Privacy audit: claimed ({claim['epsilon']:.4g}, {claim['delta']:.2g})-DP "
        f"({claim['accountant']} accountant), confidence {report['confidence']:.0%} "
        f"(each bound: {report['per_kind_confidence']:.1%})", ""
    ]
    for kind, b in report["canaries"].items():
        lines += [
            f"{kind} canaries ({b['num_canaries']}, {b['num_included']} included): "
            f"epsilon lower bound {b['epsilon_lower_bound']:.3f} "
            f"(f-DP method {b['epsilon_lower_bound_fdp']:.3f}), TPR at 1% FPR "
            f"{b['tpr_at_1pct_fpr']:.3f}, AUROC {b['auroc']:.3f}", f"  {b['score']}"
        ]
    m = report["mechanism"]
    lines += [
        "", f"mechanism: sigma={m['noise_multiplier']:.4g}, q={m['sampling_rate']:.4g}, "
        f"{m['steps']} steps, C={m['clip_norm']:.3g}, {m['num_examples']} examples "
        "(canaries included)",
        "compute: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["compute"].items()), "",
        "Verdict: " + report["verdict"], "", report["reading"]
    ]
    return "\n".join(lines) + "\n"


def write_audit_report(directory: str, report: dict[str, Any]) -> str:
    """Writes audit_report.json and .txt into the AUDIT directory; returns the text."""
    text = format_audit_report(report)
    storage.write_text(storage.join(directory, REPORT_JSON), json.dumps(report, indent=2) + "\n")
    storage.write_text(storage.join(directory, REPORT_TXT), text)
    return text
