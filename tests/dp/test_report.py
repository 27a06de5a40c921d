"""The privacy report of a DP run, built from a real ledger with recorded steps."""

import json
import os

import pytest

from jaxdpdm.config import get_config
from jaxdpdm.dp.accounting import PrivacyLedger
from jaxdpdm.dp import report as report_lib
from jaxdpdm.experiment import report_settings

NUM_EXAMPLES = 1000


def _ledger(phases, *, delta=1e-5, target=10.0, accountant="pld") -> PrivacyLedger:
    ledger = PrivacyLedger(target, delta, accountant=accountant, num_examples=NUM_EXAMPLES)
    for sigma, q, steps in phases:
        ledger.record(sigma, q, steps=steps)
    return ledger


def _config(**dp):
    config = get_config()
    config.train.batch_size = 10
    config.dp.clip_norm = 0.5
    config.diffusion.augmult = 3
    for name, value in dp.items():
        config.dp[name] = value
    return config


def _report(ledger, config=None, **overrides):
    kwargs = dict(settings=report_settings(config or _config()), num_examples=NUM_EXAMPLES,
                  num_params=12345, num_trainable=2345, dataset="digits train: 1000 images 8x8x1",
                  stopped_by_budget=False, calibrated=True)
    kwargs.update(overrides)
    return report_lib.privacy_report(ledger, **kwargs)


def test_a_configs_report_has_the_keys_values_and_order_it_always_had():
    """The config reaches the report through `experiment.report_settings`; the JSON written
    (keys, values and their order) is the one the report wrote when it read the config."""
    sigmas = [0.9, 1.3]
    ledger = _ledger([(sigmas[0], 0.02, 3), (sigmas[1], 0.02, 4)], delta=1e-6, target=7.5,
                     accountant="rdp")
    config = _config(trainable="(?!.*norm).*", clip_norm=0.37)
    config.train.batch_size, config.diffusion.augmult = 23, 7
    config.init_from = "/runs/seven/pretrain"
    initial = {
        "workdir": "/runs/seven/pretrain", "phase": "pretrain", "steps": 41, "num_examples": 77,
        "dataset": "digits [public part]: 77 images"
    }
    earlier = [{"report": "privacy_report.earlier-1.json", "epsilon_pld": 0.25, "delta": 1e-6}]
    report = _report(ledger, config, num_params=98765, num_trainable=4321, dataset="ds seven",
                     stopped_by_budget=True, calibrated=False, seed_fixed=None,
                     earlier_releases=earlier, initial_model=initial)
    eps_pld, eps_rdp = ledger.spent_epsilon("pld"), ledger.spent_epsilon("rdp")
    expected = {
        "guarantee": {
            "delta_at_least_1_over_n": False, "delta_warning": None, "epsilon_pld": eps_pld,
            "epsilon_rdp": eps_rdp, "delta": 1e-6, "target_epsilon": 7.5,
            "enforced_accountant": "rdp",
            "unit": "example-level add/remove adjacency (one training example)",
            "seed_fixed_by_config": None
        },
        "mechanism": {
            "name": "DP-SGD, Poisson-subsampled Gaussian, self-composed",
            "noise_multiplier": sigmas, "noise_multiplier_calibrated": False, "sampling_rate": 0.02,
            "steps": 7, "expected_batch_size": 23, "num_examples": NUM_EXAMPLES, "clip_norm": 0.37,
            "augmult": 7, "history": ledger.to_dict()
        },
        "training": {
            "dataset": "ds seven", "num_params": 98765, "num_trainable_params": 4321,
            "trainable_pattern": "(?!.*norm).*", "init_from": "/runs/seven/pretrain",
            "stopped_by_budget": True
        },
        "protected": "each of the 1000 training examples of this run: ds seven",
        "not_protected": ("the 77 images that trained the initial model (/runs/seven/pretrain, "
                          "41 pretrain steps) without privacy: digits [public part]: 77 images"),
        "not_covered":
            ("The guarantee covers the released model parameters and everything sampled from "
             "them. The training logs (losses, gradient-norm quantiles, fraction clipped) are "
             "computed from the private data without noise: do not publish them. "
             "Hyperparameters tuned on the private data are not accounted for."),
        "earlier_releases": earlier,
        "composition": {
            "rule": "basic composition: the releases of this workdir together satisfy "
                    "(sum of epsilons, sum of deltas)-DP for the data they share",
            "epsilon_total": eps_pld + 0.25, "delta_total": 1e-6 + 1e-6
        },
    }
    assert json.dumps(report, indent=2) == json.dumps(expected, indent=2)


@pytest.fixture(scope="module")
def one_phase():
    """Five steps at sigma = 1.2, q = 0.01: `(ledger, report)`."""
    ledger = _ledger([(1.2, 0.01, 5)])
    return ledger, _report(ledger)


def test_report_is_json_serialisable(one_phase):
    _, report = one_phase
    assert json.loads(json.dumps(report)) == report


def test_epsilons_are_the_ledgers(one_phase):
    ledger, report = one_phase
    g = report["guarantee"]
    assert g["epsilon_pld"] == ledger.spent_epsilon("pld")
    assert g["epsilon_rdp"] == ledger.spent_epsilon("rdp")
    assert 0 < g["epsilon_pld"] <= g["epsilon_rdp"]  # PLD is the tighter accountant
    assert g["delta"] == 1e-5 and g["target_epsilon"] == 10.0


def test_mechanism_describes_the_recorded_steps(one_phase):
    ledger, report = one_phase
    m = report["mechanism"]
    assert m["noise_multiplier"] == 1.2
    assert m["sampling_rate"] == 0.01
    assert m["steps"] == ledger.total_steps == 5
    assert (m["expected_batch_size"], m["num_examples"], m["clip_norm"],
            m["augmult"]) == (10, NUM_EXAMPLES, 0.5, 3)
    assert m["history"] == ledger.to_dict()
    assert PrivacyLedger.from_dict(m["history"]).spent_epsilon() == ledger.spent_epsilon()


def test_training_section(one_phase):
    _, report = one_phase
    t = report["training"]
    assert (t["num_params"], t["num_trainable_params"]) == (12345, 2345)
    assert t["init_from"] is None and t["trainable_pattern"] is None
    assert t["stopped_by_budget"] is False


def test_guarantee_states_the_delta_and_budget_the_ledger_used():
    """On resume the ledger comes from the checkpoint while the config may have been edited:
    the epsilons are computed at the ledger's delta and its budget was enforced, so those are
    the numbers the guarantee must state."""
    ledger = _ledger([(1.2, 0.01, 5)], delta=1e-6, target=8.0, accountant="rdp")
    report = _report(ledger, _config(delta=1e-5, target_epsilon=10.0, accountant="pld"))
    g = report["guarantee"]
    assert g["epsilon_pld"] == ledger.spent_epsilon("pld")
    assert g["delta"] == ledger.delta
    assert g["target_epsilon"] == ledger.target_epsilon
    assert g["enforced_accountant"] == ledger.accountant


def test_history_value_lists_values_that_changed_between_phases():
    ledger = _ledger([(1.2, 0.01, 3), (2.0, 0.01, 2)])
    history = ledger.to_dict()
    assert report_lib.history_value(history, "sampling_rate") == 0.01
    assert report_lib.history_value(history, "noise_multiplier") == [1.2, 2.0]
    report = _report(ledger)
    assert report["mechanism"]["noise_multiplier"] == [1.2, 2.0]
    assert report["mechanism"]["steps"] == 5


@pytest.mark.parametrize("phases, expected", [
    ([{"noise_multiplier": 1.0}], 1.0),
    ([{"noise_multiplier": 1.0}, {"noise_multiplier": 1.0}], 1.0),
    ([{"noise_multiplier": 3.0}, {"noise_multiplier": 1.0}], [1.0, 3.0]),
])
def test_history_value(phases, expected):
    assert report_lib.history_value({"phases": phases}, "noise_multiplier") == expected


def test_format_mentions_every_number_a_reader_needs(one_phase):
    _, report = one_phase
    text = report_lib.format_privacy_report(report)
    g = report["guarantee"]
    for fragment in (f"{g['epsilon_pld']:.3f}", f"{g['epsilon_rdp']:.3f}", "1.0e-05", "epsilon",
                     "sigma = 1.2", "q = 0.01", "steps = 5", "clip norm C = 0.5", "K = 3",
                     "N = 1000", "calibrated", "12,345", "2,345", "scratch", "Not covered",
                     "do not publish"):
        assert fragment in text, fragment
    assert "stopped early" not in text


def test_format_mentions_early_stop_pattern_and_init_from():
    ledger = _ledger([(1.2, 0.01, 2)])
    config = _config(trainable="Dense_.*", noise_multiplier=1.2)
    config.init_from = "/runs/pretrain"
    text = report_lib.format_privacy_report(
        _report(ledger, config, stopped_by_budget=True, calibrated=False))
    assert "stopped early" in text
    assert "'Dense_.*'" in text and "/runs/pretrain" in text
    assert "calibrated" not in text


def test_write_privacy_report_writes_json_and_text(tmp_path, one_phase, capsys):
    _, report = one_phase
    text = report_lib.write_privacy_report(str(tmp_path), report)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [report_lib.PRIVACY_JSON, report_lib.PRIVACY_TEXT])
    with open(tmp_path / report_lib.PRIVACY_JSON) as f:
        assert json.load(f) == report
    assert (tmp_path / report_lib.PRIVACY_TEXT).read_text() == text
    assert text == report_lib.format_privacy_report(report)
    assert text in capsys.readouterr().out


@pytest.mark.parametrize("seed_fixed, fragment",
                         [(True, "WARNING: the seed was fixed by the config"),
                          (None, "Seed: not recorded"), (False, None)])
def test_the_report_states_whether_the_seed_was_fixed(seed_fixed, fragment):
    report = _report(_ledger([(1.2, 0.01, 2)]), seed_fixed=seed_fixed)
    assert report["guarantee"]["seed_fixed_by_config"] is seed_fixed
    text = report_lib.format_privacy_report(report)
    assert ("seed was fixed" in text or "Seed:" in text) is (fragment is not None)
    if fragment:
        assert fragment in text


def test_earlier_releases_are_archived_listed_and_composed(tmp_path, one_phase, capsys):
    _, first = one_phase
    report_lib.write_privacy_report(str(tmp_path), first)
    (tmp_path / "grid_final.png").write_bytes(b"png")
    (tmp_path / "events.out.tfevents.1").write_bytes(b"")
    traces = report_lib.release_traces(str(tmp_path))
    assert traces == ["grid_final.png", "privacy_report.json", "privacy_report.txt"]
    earlier = report_lib.archive_earlier_reports(str(tmp_path), traces)
    assert sorted(os.listdir(tmp_path)) == [
        "events.out.tfevents.1", "grid_final.png", "privacy_report.earlier-1.json",
        "privacy_report.earlier-1.txt"
    ]
    g = first["guarantee"]
    assert earlier == [{
        "report": "privacy_report.earlier-1.json", "epsilon_pld": g["epsilon_pld"],
        "delta": g["delta"]
    }]
    second = _report(_ledger([(1.2, 0.01, 5)]), earlier_releases=earlier)
    assert second["composition"]["epsilon_total"] == pytest.approx(2 * g["epsilon_pld"])
    assert second["composition"]["delta_total"] == pytest.approx(2 * g["delta"])
    text = report_lib.format_privacy_report(second)
    assert "EARLIER RELEASE" in text and "basic composition" in text


def test_an_earlier_release_without_a_report_has_an_unknown_epsilon(tmp_path):
    (tmp_path / "grid_final.png").write_bytes(b"png")
    earlier = report_lib.archive_earlier_reports(str(tmp_path),
                                                 report_lib.release_traces(str(tmp_path)))
    assert earlier == [{
        "report": None, "epsilon_pld": None, "delta": None, "traces": ["grid_final.png"]
    }]
    report = _report(_ledger([(1.2, 0.01, 5)]), earlier_releases=earlier)
    assert report["composition"]["epsilon_total"] is None
    assert "are NOT the total" in report_lib.format_privacy_report(report)


def test_delta_of_at_least_one_over_n_is_stated_in_the_report():
    """delta >= 1/N used to be only a console warning; the report must say it too."""
    with pytest.warns(UserWarning, match="1/N"):
        weak = _ledger([(1.2, 0.01, 5)], delta=2.0 / NUM_EXAMPLES)
    report = _report(weak)
    assert report["guarantee"]["delta_at_least_1_over_n"] is True
    assert "1/N" in report["guarantee"]["delta_warning"]
    assert "WARNING: delta = 0.002 >= 1/N = 0.001" in report_lib.format_privacy_report(report)
    sound = _report(_ledger([(1.2, 0.01, 5)]))
    assert sound["guarantee"]["delta_at_least_1_over_n"] is False
    assert "WARNING" not in report_lib.format_privacy_report(sound)


def test_report_names_the_protected_data_and_the_unprotected_pretraining_data():
    ledger = _ledger([(1.2, 0.01, 2)])
    config = _config()
    config.init_from = "/runs/q/pretrain"
    initial = {
        "workdir": "/runs/q/pretrain", "phase": "pretrain", "steps": 600, "num_examples": 288,
        "dataset": "digits [public part]: 288 images"
    }
    report = _report(ledger, config, initial_model=initial)
    assert report["protected"] == ("each of the 1000 training examples of this run: "
                                   "digits train: 1000 images 8x8x1")
    assert report["not_protected"].startswith("the 288 images that trained the initial model "
                                              "(/runs/q/pretrain, 600 pretrain steps) without "
                                              "privacy: digits [public part]")
    text = report_lib.format_privacy_report(report)
    assert f"Protected: {report['protected']}." in text
    assert f"Not protected by this guarantee: {report['not_protected']}." in text
    assert _report(ledger)["not_protected"] is None
    assert "Not protected" not in report_lib.format_privacy_report(_report(ledger))
