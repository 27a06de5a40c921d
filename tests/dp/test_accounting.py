"""Accounting against known values, calibration tightness, and the budget-enforcing ledger."""

import itertools
import json
import logging
import math
import warnings

import dp_accounting
import numpy as np
import pytest

from jaxdpdm.dp import accounting
from jaxdpdm.dp.accounting import (BudgetExceededError, PrivacyLedger, calibrate_noise_multiplier,
                                   epsilon)

# CIFAR-10-sized reference setting: N = 50,000, expected batch 4096, 875 steps, delta = 1e-5.
Q, STEPS, DELTA = 4096 / 50_000, 875, 1e-5
KNOWN_SIGMA = {"rdp": 9.89, "pld": 9.12}  # sigma that spends epsilon = 1


@pytest.fixture(scope="module")
def calibrated():
    return {
        acc: calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sampling_rate=Q,
                                        steps=STEPS, accountant=acc) for acc in KNOWN_SIGMA
    }


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_calibration_matches_known_values_and_is_tight(calibrated, acc):
    sigma = calibrated[acc]
    assert sigma == pytest.approx(KNOWN_SIGMA[acc], abs=0.01)
    spent = epsilon(noise_multiplier=sigma, sampling_rate=Q, steps=STEPS, delta=DELTA,
                    accountant=acc)
    less_noise = epsilon(noise_multiplier=0.99 * sigma, sampling_rate=Q, steps=STEPS, delta=DELTA,
                         accountant=acc)
    assert spent <= 1.0 < less_noise


def test_epsilon_is_monotone_and_pld_is_tighter_than_rdp():
    base = dict(sampling_rate=0.05, steps=200, delta=DELTA)
    eps = lambda **kw: epsilon(**{**base, "noise_multiplier": 2.0, **kw})
    assert eps(noise_multiplier=4.0) < eps() < eps(noise_multiplier=1.5)
    assert eps(steps=100) < eps() < eps(steps=400)
    assert eps(sampling_rate=0.02) < eps() < eps(sampling_rate=0.1)
    assert eps() < eps(accountant="rdp")
    assert eps(steps=0) == 0.0
    assert eps(noise_multiplier=0.0) == math.inf


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(sampling_rate=0.0), "sampling_rate"),
    (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(steps=-1), "steps"),
    (dict(accountant="moments"), "accountant"),
])
def test_epsilon_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        epsilon(
            **
            {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": DELTA, **kwargs})


@pytest.mark.parametrize("seed", range(4))
def test_calibration_returns_the_smallest_safe_sigma_at_full_precision(seed):
    """Whatever the coarse search found, the answer is judged by the accountant of record: its
    epsilon is within the target and 1e-4 less noise is not (random settings, PLD)."""
    rng = np.random.default_rng(seed)
    q, steps = float(rng.uniform(0.005, 0.1)), int(rng.integers(1, 400))
    target, delta = float(rng.uniform(0.5, 8.0)), float(10.0**rng.uniform(-7, -4))
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sampling_rate=q,
                                       steps=steps)
    spent = lambda s: epsilon(noise_multiplier=s, sampling_rate=q, steps=steps, delta=delta)
    assert spent(sigma) <= target < spent(sigma - 1e-4)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_calibration_rejects_non_positive_epsilon(target):
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sampling_rate=Q, steps=10)
    with pytest.raises(ValueError, match="epsilon"):
        PrivacyLedger(target, DELTA)


def test_delta_not_much_below_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/N"):
        epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=1, delta=1e-3, num_examples=5000)
    with pytest.warns(UserWarning, match="1/N"):
        PrivacyLedger(1.0, 1e-3, num_examples=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrivacyLedger(1.0, 1e-5, num_examples=1000)


def test_ledger_composes_phases_that_change_sigma_and_q():
    ledger = PrivacyLedger(50.0, DELTA, accountant="rdp")
    for _ in range(30):
        ledger.record(1.5, 0.05)
    ledger.record(3.0, 0.1, steps=20)
    ledger.record(1.5, 0.05, steps=10)
    assert ledger.phases == [(1.5, 0.05, 30), (3.0, 0.1, 20), (1.5, 0.05, 10)]
    assert ledger.total_steps == 60
    reference = dp_accounting.rdp.RdpAccountant().compose(
        dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
            for s, q, n in ledger.phases
        ])).get_epsilon(DELTA)
    assert ledger.spent_epsilon() == pytest.approx(reference, rel=1e-12)
    first_phase_only = epsilon(noise_multiplier=1.5, sampling_rate=0.05, steps=40, delta=DELTA,
                               accountant="rdp")
    assert ledger.spent_epsilon() > first_phase_only
    assert ledger.spent_epsilon("pld") < ledger.spent_epsilon("rdp")


def test_single_phase_ledger_agrees_with_epsilon():
    ledger = PrivacyLedger(5.0, DELTA)
    ledger.record(2.0, 0.02, steps=150)
    assert ledger.spent_epsilon() == pytest.approx(
        epsilon(noise_multiplier=2.0, sampling_rate=0.02, steps=150, delta=DELTA), rel=1e-9)


def test_ledger_round_trips_through_json():
    ledger = PrivacyLedger(3.0, DELTA, accountant="pld", num_examples=60_000)
    ledger.record(3.0, 0.01, steps=100)
    ledger.record(2.5, 0.02, steps=7)
    record = json.loads(json.dumps(ledger.to_dict()))
    restored = PrivacyLedger.from_dict(record)
    assert restored.phases == ledger.phases
    assert restored.total_steps == 107
    assert (restored.target_epsilon, restored.delta, restored.accountant,
            restored.num_examples) == (3.0, DELTA, "pld", 60_000)
    assert restored.spent_epsilon() == ledger.spent_epsilon()
    assert restored.can_record(2.5, 0.02, steps=1000) == ledger.can_record(2.5, 0.02, steps=1000)


def test_ledger_refuses_the_step_that_would_exceed_the_budget(calibrated):
    sigma = calibrated["pld"]
    ledger = PrivacyLedger(1.0, DELTA, accountant="pld", num_examples=50_000)
    # The most steps the budget allows: the first count whose next step would be refused.
    allowed = next(n for n in itertools.count() if not ledger.can_record(sigma, Q, steps=n + 1))
    # sigma was calibrated to spend exactly epsilon = 1 over 875 steps.
    assert STEPS <= allowed <= STEPS * 1.02
    ledger.record(sigma, Q, steps=allowed)
    assert ledger.spent_epsilon() <= 1.0
    assert not ledger.can_record(sigma, Q)
    with pytest.raises(BudgetExceededError):
        ledger.record(sigma, Q)
    assert ledger.total_steps == allowed  # a refused step is not recorded
    assert not ledger.can_record(0.0, Q)  # sigma = 0 is never affordable
    restored = PrivacyLedger.from_dict(ledger.to_dict())
    with pytest.raises(BudgetExceededError):
        restored.record(sigma, Q)


def test_per_step_budget_checks_are_cheap(monkeypatch):
    calls = []
    real = accounting._phases_epsilon
    monkeypatch.setattr(accounting, "_phases_epsilon",
                        lambda *args: calls.append(args[0]) or real(*args))
    ledger = PrivacyLedger(2.0, DELTA, accountant="rdp")
    steps = 0
    while ledger.can_record(2.0, 0.05):
        ledger.record(2.0, 0.05)
        steps += 1
    # A full computation per step would be `steps` calls; the cached bracket needs O(log steps).
    assert steps > 200
    assert len(calls) <= 4 * math.ceil(math.log2(steps))
    assert max(sum(n for _, _, n in phases) for phases in calls) <= 2 * steps + 2


def test_calibration_says_what_it_is_doing(caplog, monkeypatch):
    """A long calibration (10^6 PLD steps: ~40 s) used to run without a word."""
    monkeypatch.setattr(accounting, "_PROGRESS_EVERY_S", 0.0)  # every evaluation
    with caplog.at_level(logging.INFO, logger="jaxdpdm.dp.accounting"):
        calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sampling_rate=Q, steps=7,
                                   accountant="rdp")
    messages = [r.getMessage() for r in caplog.records]
    assert "over 7 steps" in messages[0] and "rdp accountant" in messages[0]
    assert any(m.startswith("calibrating: sigma=") for m in messages[1:])
