"""Reports a user can keep: the privacy report of a DP run, and the evaluation summary.

`privacy_report.json` is the machine-readable record; `privacy_report.txt` says the same in words.
"""

from __future__ import annotations

import json
from typing import Any

from jaxdpdm import storage

PRIVACY_JSON = "privacy_report.json"
PRIVACY_TEXT = "privacy_report.txt"


def privacy_report(ledger, *, config, num_examples: int, num_params: int, num_trainable: int,
                   dataset: str, stopped_by_budget: bool, calibrated: bool) -> dict[str, Any]:
    """Collects the guarantee of a finished (or stopped) DP run.

    The guarantee is recomputed from the ledger with both accountants; the run's own accountant
    is the one whose budget was enforced.
    """
    history = ledger.to_dict()
    return {
        "guarantee": {
            "epsilon_pld": ledger.spent_epsilon("pld"),
            "epsilon_rdp": ledger.spent_epsilon("rdp"),
            # The ledger's own values: on resume they are the checkpoint's, whatever the config.
            "delta": ledger.delta,
            "target_epsilon": ledger.target_epsilon,
            "enforced_accountant": ledger.accountant,
            "unit": "example-level add/remove adjacency (one training example)",
        },
        "mechanism": {
            "name": "DP-SGD, Poisson-subsampled Gaussian, self-composed",
            "noise_multiplier": history_value(history, "noise_multiplier"),
            "noise_multiplier_calibrated": calibrated,
            "sampling_rate": history_value(history, "sampling_rate"),
            "steps": ledger.total_steps,
            "expected_batch_size": config.train.batch_size,
            "num_examples": num_examples,
            "clip_norm": config.dp.clip_norm,
            "augmult": config.diffusion.augmult,
            "history": history,
        },
        "training": {
            "dataset": dataset,
            "num_params": num_params,
            "num_trainable_params": num_trainable,
            "trainable_pattern": config.dp.trainable,
            "init_from": config.init_from,
            "stopped_by_budget": stopped_by_budget,
        },
        "not_covered": (
            "The guarantee covers the released model parameters and everything sampled from "
            "them. The training logs (losses, gradient-norm quantiles, fraction clipped) are "
            "computed from the private data without noise: do not publish them. "
            "Hyperparameters tuned on the private data are not accounted for."),
    }


def history_value(history: dict, key: str):
    """The value of `key` over the ledger's phases: one value, a list when it changed, or None
    when the ledger has no step."""
    values = [phase[key] for phase in history.get("phases", []) if key in phase]
    distinct = sorted(set(values))
    if not distinct:  # no step was taken
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def format_privacy_report(report: dict[str, Any]) -> str:
    g, m, t = report["guarantee"], report["mechanism"], report["training"]
    lines = [
        "Privacy report (jaxdpdm)",
        "========================",
        f"The released model satisfies ({g['epsilon_pld']:.3f}, {g['delta']:.1e})-DP "
        f"(PLD accountant); the RDP accountant gives epsilon = {g['epsilon_rdp']:.3f}.",
        f"Target: epsilon <= {g['target_epsilon']} ({g['enforced_accountant']} accountant, "
        "enforced before every step).",
        f"Privacy unit: {g['unit']}.",
        "",
        f"Mechanism: {m['name']}",
        f"  noise multiplier sigma = {m['noise_multiplier']}"
        f"{' (calibrated to the target)' if m['noise_multiplier_calibrated'] else ''}",
        f"  sampling rate q = {m['sampling_rate']} "
        f"(expected batch {m['expected_batch_size']} of N = {m['num_examples']})",
        f"  steps = {m['steps']}, clip norm C = {m['clip_norm']}, "
        f"augmentation multiplicity K = {m['augmult']}",
        "",
        f"Trained: {t['num_trainable_params']:,} of {t['num_params']:,} parameters"
        f"{' matching ' + repr(t['trainable_pattern']) if t['trainable_pattern'] else ''}; "
        f"initialised from {t['init_from'] or 'scratch'}.",
        f"Data: {t['dataset']}",
    ]
    if t["stopped_by_budget"]:
        lines.append("Training stopped early: the next step would have exceeded the budget.")
    lines += ["", "Not covered: " + report["not_covered"]]
    return "\n".join(lines) + "\n"


def write_privacy_report(workdir: str, report: dict[str, Any]) -> str:
    """Writes the JSON and text reports into `workdir`; returns the text."""
    text = format_privacy_report(report)
    storage.write_text(storage.join(workdir, PRIVACY_JSON), json.dumps(report, indent=2) + "\n")
    storage.write_text(storage.join(workdir, PRIVACY_TEXT), text)
    print(text, flush=True)
    return text
