"""The privacy report of a DP run, written beside its checkpoints from the ledger.

`privacy_report.json` is the machine-readable record; `privacy_report.txt` says the same in words.
The guarantee is recomputed from the `accounting.PrivacyLedger`; the release traces of a workdir
(`release_traces`, `archive_earlier_reports`) let a restarted run report what was released
before it. The run's settings come as a `RunSettings` (`experiment.report_settings` builds it
from the config): this module never reads the config.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jaxdpdm import storage

PRIVACY_JSON = "privacy_report.json"
PRIVACY_TEXT = "privacy_report.txt"
# The report of an earlier DP run in the same workdir, kept when a new run starts over there.
EARLIER_JSON = "privacy_report.earlier-{}.json"
_EARLIER = re.compile(r"privacy_report\.earlier-(\d+)\.json$")
# Names in a workdir that show an earlier DP run released something (reports, sample grids,
# generated samples, evaluations); TensorBoard logs and checkpoints are not releases.
_RELEASE_TRACE = re.compile(r"(privacy_report.*\.(json|txt)|grid_.*\.png|samples.*|eval)$")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings of a DP run that its report states besides the ledger.

    Attributes:
      expected_batch_size: q * N, the public constant the noisy sum is divided by.
      clip_norm: C, the bound on each example's gradient norm.
      augmult: K, the noise draws averaged inside each example's loss.
      trainable_pattern: the regex naming the trained parameters, or None (all of them).
      init_from: the workdir of the initial model, or None (trained from scratch).
    """
    expected_batch_size: int
    clip_norm: float
    augmult: int
    trainable_pattern: str | None
    init_from: str | None


def privacy_report(ledger, *, settings: RunSettings, num_examples: int, num_params: int,
                   num_trainable: int, dataset: str, stopped_by_budget: bool, calibrated: bool,
                   seed_fixed: bool | None = False, earlier_releases: list[dict] | None = None,
                   initial_model: dict | None = None) -> dict[str, Any]:
    """Collects the guarantee of a finished (or stopped) DP run.

    The guarantee is recomputed from the ledger with both accountants; the run's own accountant
    is the one whose budget was enforced.

    Args:
      settings: the run's batch size, clip norm, K, trainable pattern and initial model.
      seed_fixed: whether the config fixed the seed (then anyone with the config can recompute
        the noise); None when an old checkpoint did not record it.
      earlier_releases: earlier DP runs of this workdir (`archive_earlier_reports`); their
        guarantees compose with this one's, which the report states.
      initial_model: for a run started from `init_from`, what that model was trained on
        (`phases.describe_initial_model`): its data is named as not protected.
    """
    history = ledger.to_dict()
    earlier = list(earlier_releases or [])
    report = {
        "guarantee": {
            **delta_check(ledger.delta, num_examples),
            "epsilon_pld": ledger.spent_epsilon("pld"),
            "epsilon_rdp": ledger.spent_epsilon("rdp"),
            # The ledger's own values: on resume they are the checkpoint's, whatever the config.
            "delta": ledger.delta,
            "target_epsilon": ledger.target_epsilon,
            "enforced_accountant": ledger.accountant,
            "unit": "example-level add/remove adjacency (one training example)",
            "seed_fixed_by_config": seed_fixed,
        },
        "mechanism": {
            "name": "DP-SGD, Poisson-subsampled Gaussian, self-composed",
            "noise_multiplier": history_value(history, "noise_multiplier"),
            "noise_multiplier_calibrated": calibrated,
            "sampling_rate": history_value(history, "sampling_rate"),
            "steps": ledger.total_steps,
            "expected_batch_size": settings.expected_batch_size,
            "num_examples": num_examples,
            "clip_norm": settings.clip_norm,
            "augmult": settings.augmult,
            "history": history,
        },
        "training": {
            "dataset": dataset,
            "num_params": num_params,
            "num_trainable_params": num_trainable,
            "trainable_pattern": settings.trainable_pattern,
            "init_from": settings.init_from,
            "stopped_by_budget": stopped_by_budget,
        },
        "protected": f"each of the {num_examples} training examples of this run: {dataset}",
        "not_protected": _unprotected(initial_model),
        "not_covered":
            ("The guarantee covers the released model parameters and everything sampled from "
             "them. The training logs (losses, gradient-norm quantiles, fraction clipped) are "
             "computed from the private data without noise: do not publish them. "
             "Hyperparameters tuned on the private data are not accounted for."),
    }
    if earlier:
        report["earlier_releases"] = earlier
        report["composition"] = _composition(report["guarantee"], earlier)
    return report


def _composition(guarantee: dict, earlier: list[dict]) -> dict[str, Any]:
    """The guarantee of all releases of this workdir together (basic composition: the epsilons
    and the deltas add up), or None totals when an earlier epsilon is unknown."""
    known = all(e.get("epsilon_pld") is not None for e in earlier)
    return {
        "rule": "basic composition: the releases of this workdir together satisfy "
                "(sum of epsilons, sum of deltas)-DP for the data they share",
        "epsilon_total":
            (guarantee["epsilon_pld"] + sum(e["epsilon_pld"] for e in earlier) if known else None),
        "delta_total": (guarantee["delta"] + sum(e["delta"] for e in earlier) if known else None),
    }


def release_traces(workdir: str) -> list[str]:
    """Names in `workdir` that an earlier DP run released (sorted); empty for a clean workdir."""
    if not storage.isdir(workdir):
        return []
    return sorted(name for name in storage.listdir(workdir) if _RELEASE_TRACE.match(name))


def archive_earlier_reports(workdir: str, traces: list[str]) -> list[dict]:
    """Keeps the current report as `privacy_report.earlier-<n>.json` (and .txt); returns every
    earlier release of `workdir`, oldest first, for the next report.

    A release with traces but no report (grids only) is listed with an unknown epsilon.
    """
    if PRIVACY_JSON in traces:
        taken = [int(m.group(1)) for name in traces if (m := _EARLIER.match(name))]
        number = max(taken, default=0) + 1
        for name, kept in ((PRIVACY_JSON, EARLIER_JSON.format(number)),
                           (PRIVACY_TEXT, EARLIER_JSON.format(number)[:-5] + ".txt")):
            if name in traces:
                storage.rename(storage.join(workdir, name), storage.join(workdir, kept))
    releases = []
    names = sorted(storage.listdir(workdir), key=lambda n: int(m.group(1))
                   if (m := _EARLIER.match(n)) else -1)
    for name in names:
        if _EARLIER.match(name):
            g = json.loads(storage.read_text(storage.join(workdir, name)))["guarantee"]
            releases.append({"report": name, "epsilon_pld": g["epsilon_pld"], "delta": g["delta"]})
    if not releases:
        releases.append(
            {"report": None, "epsilon_pld": None, "delta": None, "traces": list(traces)})
    return releases


def delta_check(delta: float, num_examples: int) -> dict[str, Any]:
    """Whether delta is too large for N examples to mean anything, with the reason in words.

    Returns {"delta_at_least_1_over_n": bool, "delta_warning": str or None}.
    """
    weak = delta >= 1.0 / num_examples
    warning = (f"delta = {delta:g} >= 1/N = {1.0 / num_examples:.3g}: a mechanism that publishes "
               "one randomly chosen training example in the clear satisfies this guarantee, so it "
               "protects nobody in particular; use delta well below 1/N") if weak else None
    return {"delta_at_least_1_over_n": weak, "delta_warning": warning}


def _unprotected(initial_model: dict | None) -> str | None:
    if initial_model is None:
        return None
    how = ("without privacy" if initial_model["phase"] == "pretrain" else
           "by an earlier DP run, whose own guarantee covers them")
    return (f"the {initial_model['num_examples']} images that trained the initial model "
            f"({initial_model['workdir']}, {initial_model['steps']} {initial_model['phase']} "
            f"steps) {how}: {initial_model['dataset']}")


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
        *([f"WARNING: {g['delta_warning']}."] if g.get("delta_warning") else []),
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
        "",
        f"Protected: {report['protected']}.",
    ]
    if report.get("not_protected"):
        lines.append(f"Not protected by this guarantee: {report['not_protected']}.")
    if t["stopped_by_budget"]:
        lines.append("Training stopped early: the next step would have exceeded the budget.")
    if g.get("seed_fixed_by_config"):
        lines += [
            "", "WARNING: the seed was fixed by the config, so the noise and the batches "
            "are reproducible by anyone who has the config: the guarantee does not hold "
            "against them. Train private data with an unset (secret) seed."
        ]
    elif g.get("seed_fixed_by_config") is None:
        lines += [
            "", "Seed: not recorded by the checkpoint this run resumed (it may have been "
            "fixed by the config)."
        ]
    for e in report.get("earlier_releases", []):
        lines += [
            "", "EARLIER RELEASE in this workdir: " +
            (f"{e['report']}: ({e['epsilon_pld']:.3f}, {e['delta']:.1e})-DP"
             if e["report"] else f"of unknown epsilon (traces: {', '.join(e['traces'])})")
        ]
    if "composition" in report:
        c = report["composition"]
        lines.append("Together with this run: " + (
            f"({c['epsilon_total']:.3f}, {c['delta_total']:.1e})-DP by basic composition, if "
            "the runs trained on the same data." if c["epsilon_total"] is not None else
            "the total epsilon is unknown (an earlier release has no report); the guarantees "
            "above are NOT the total."))
    lines += ["", "Not covered: " + report["not_covered"]]
    return "\n".join(lines) + "\n"


def write_privacy_report(workdir: str, report: dict[str, Any]) -> str:
    """Writes the JSON and text reports into `workdir`; returns the text."""
    text = format_privacy_report(report)
    storage.write_text(storage.join(workdir, PRIVACY_JSON), json.dumps(report, indent=2) + "\n")
    storage.write_text(storage.join(workdir, PRIVACY_TEXT), text)
    print(text, flush=True)
    return text
