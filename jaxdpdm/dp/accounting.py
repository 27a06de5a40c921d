"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD: a thin layer over `dp_accounting`.

One DP-SGD step is `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` under add/remove-one
adjacency; T steps at fixed (sigma, q) are that event self-composed T times, and a run whose sigma
or q changed is the composition of its phases. Two accountants are offered: "pld" (privacy loss
distributions; tight) and "rdp" (Renyi DP; looser, the classic choice).

PLD discretisation. `dp_accounting` discretises privacy losses on a grid of width
`value_discretization_interval` and rounds pessimistically, so a coarser grid only ever OVERstates
epsilon. We use 1e-4 (the library default): on this project's reference setting (q = 4096/50000,
875 steps, sigma ~ 9.1) one epsilon evaluation takes ~0.05 s and is within ~1e-4 of the continuous
value, whereas 1e-3 takes ~0.01 s but overstates epsilon by ~1e-3. Small-sigma / many-step settings
are slower (sigma = 0.6, q = 0.01, 10k steps: ~1 s at 1e-4), which is why the ledger never runs a
full computation per step (see `PrivacyLedger`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from scipy import optimize, stats

log = logging.getLogger(__name__)

ACCOUNTANTS = ("pld", "rdp")
# During a calibration, one progress line at most this often (long PLD runs take minutes).
_PROGRESS_EVERY_S = 10.0
PLD_DISCRETIZATION = 1e-4
_PLD_FULL_RESOLUTION_SIGMA = 0.5
# Calibration precision on sigma (absolute). The result is always on the safe side of the target.
_CALIBRATION_TOL = 1e-4
# PLD grid coarsening for calibration's root search (the answer is then settled at full precision).
_SEARCH_COARSENING = 30.0


class BudgetExceededError(RuntimeError):
    """Raised when recording steps would take the spent epsilon past the target."""


# --- validation -------------------------------------------------------------------------------------


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}")
    return accountant


def _check_delta(delta: float, num_examples: int | None) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    if num_examples is not None:
        if int(num_examples) != num_examples or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer; got {num_examples!r}")
        if delta >= 1 / num_examples:
            warnings.warn(
                f"delta={delta} >= 1/N = {1 / num_examples:.3g}: a mechanism that "
                "publishes one random example outright satisfies this guarantee; "
                "use delta << 1/N", UserWarning, stacklevel=3)
    return float(delta)


def _check_epsilon(epsilon: float) -> float:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"target epsilon must be finite and > 0; got {epsilon}")
    return float(epsilon)


def _check_sigma(sigma: float) -> float:
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier must be finite and >= 0; got {sigma}")
    return float(sigma)


def _check_rate(q: float) -> float:
    if not 0 < q <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {q}")
    return float(q)


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
    return int(steps)


# --- epsilon of a list of phases --------------------------------------------------------------------


def _pld_discretization(phases) -> float:
    """Grid width for a PLD computation over `phases`.

    A Gaussian step's privacy losses span ~1/(2 sigma^2): for sigma << 1 a 1e-4 grid would need
    billions of points (sigma = 1e-3 asks numpy for 38 GiB). Below sigma = 0.5 the grid is widened
    by (0.5 / sigma)^2, which keeps the single-step grid at ~2e4 points. Pessimistic rounding keeps
    the result an upper bound on epsilon; such small sigmas give epsilons in the tens or more,
    where the extra looseness is irrelevant.
    """
    smallest = min((sigma for sigma, _, steps in phases if steps > 0 and sigma > 0), default=1.0)
    return PLD_DISCRETIZATION * max(1.0, (_PLD_FULL_RESOLUTION_SIGMA / smallest)**2)


def _make_accountant(accountant: str, phases,
                     coarsening: float = 1.0) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld.PLDAccountant(
            value_discretization_interval=coarsening * _pld_discretization(phases))
    return rdp.RdpAccountant()


def _dp_event(phases) -> dp_accounting.DpEvent:
    """The DpEvent of `phases`, a sequence of (sigma, q, steps) applied in order."""
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in phases
        if steps > 0
    ])


@functools.lru_cache(maxsize=512)
def _cached_epsilon(phases: tuple, delta: float, accountant: str, coarsening: float) -> float:
    return float(
        _make_accountant(accountant, phases, coarsening).compose(
            _dp_event(phases)).get_epsilon(delta))


def _phases_epsilon(phases, delta: float, accountant: str, coarsening: float = 1.0) -> float:
    """Epsilon of a sequence of (sigma, q, steps) phases; memoised (ledger queries repeat).

    `coarsening` > 1 widens the PLD grid by that factor (a cheaper, slightly larger epsilon); only
    calibration's search uses it, never a reported or enforced epsilon.
    """
    phases = tuple((float(s), float(q), int(n)) for s, q, n in phases if n > 0)
    if not phases:
        return 0.0
    return _cached_epsilon(phases, float(delta), accountant, float(coarsening))


def epsilon(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld", num_examples: int | None = None) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps at the given delta.

    Args:
      noise_multiplier: sigma >= 0 (noise std / clip norm); sigma == 0 gives inf.
      sampling_rate: q in (0, 1].
      steps: T >= 0 (T == 0 gives 0).
      delta: in (0, 1).
      accountant: "pld" or "rdp".
      num_examples: optional N, only to warn when delta >= 1/N.
    """
    sigma, q = _check_sigma(noise_multiplier), _check_rate(sampling_rate)
    steps, delta = _check_steps(steps), _check_delta(delta, num_examples)
    return _phases_epsilon([(sigma, q, steps)], delta, _check_accountant(accountant))


def _gaussian_dp_sigma(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """Starting guess for calibration from the central-limit (mu-GDP) approximation of DP-SGD.

    T Poisson-subsampled Gaussian steps are approximately mu-GDP with
    mu = q sqrt(T (exp(1 / sigma^2) - 1)) (Bu et al., 2020), and mu-GDP gives
    delta(eps) = Phi(-eps / mu + mu / 2) - exp(eps) Phi(-eps / mu - mu / 2). Only a guess: the
    accountant decides.
    """

    def delta_of_mu(mu: float) -> float:
        return (stats.norm.cdf(-target_epsilon / mu + mu / 2) -
                math.exp(target_epsilon) * stats.norm.cdf(-target_epsilon / mu - mu / 2))

    try:
        mu = optimize.brentq(lambda m: delta_of_mu(m) - delta, 1e-6, 1e3)
        return 1.0 / math.sqrt(math.log1p((mu / (q * math.sqrt(steps)))**2))
    except (OverflowError, ValueError, ZeroDivisionError):
        return 1.0  # extreme epsilons: start the bracket search from sigma = 1


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: str = "pld",
                               num_examples: int | None = None) -> float:
    """The smallest sigma (to ~1e-4) whose `steps` steps at rate q spend at most `target_epsilon`.

    The result sigma* satisfies epsilon(sigma*) <= target_epsilon with the same accountant at its
    full precision (checked), and epsilon(sigma* - 1e-4) > target_epsilon. With PLD the root
    is first searched on a grid `_SEARCH_COARSENING` times coarser (each evaluation several
    times cheaper), then settled by the accountant of record in 2-5 full-precision evaluations,
    where a search at full precision needs ~8 (4.7 s against 11.8 s for a 2-step calibration like
    the quickstart's on a 2-core CPU; benchmarks/RESULTS.md section 13). PLD evaluations slow
    down with the step count (about a minute per calibration at 10^6 steps), so progress is
    logged every ~10 s.
    """
    target = _check_epsilon(target_epsilon)
    q, steps = _check_rate(sampling_rate), _check_steps(steps)
    delta, accountant = _check_delta(delta, num_examples), _check_accountant(accountant)
    if steps == 0:
        return 0.0
    log.info(
        "calibrating the noise multiplier: epsilon=%g at delta=%g over %d steps at "
        "q=%.4g (%s accountant)", target, delta, steps, q, accountant)
    start = last_report = time.perf_counter()
    evaluations = 0

    def gap_at(coarsening: float):

        def gap(sigma: float) -> float:  # increasing epsilon <=> decreasing sigma
            nonlocal evaluations, last_report
            spent = _phases_epsilon([(sigma, q, steps)], delta, accountant, coarsening)
            evaluations += 1
            now = time.perf_counter()
            if now - last_report >= _PROGRESS_EVERY_S:
                last_report = now
                log.info(
                    "calibrating: sigma=%.4f gives epsilon=%.4f (target %g); %d accountant "
                    "evaluations, %.0f s so far", sigma, spent, target, evaluations, now - start)
            return spent - target

        return gap

    gap = gap_at(1.0)
    guess = _gaussian_dp_sigma(target, delta, q, steps)
    if accountant == "pld":
        coarse_gap = gap_at(_SEARCH_COARSENING)
        sigma = _settle(gap, coarse_gap, _root(coarse_gap, guess, target), target)
    else:
        sigma = _root(gap, guess, target)
    # A root is within xtol of the crossing; step to the safe side if it is not already.
    while gap(sigma) > 0:
        sigma += _CALIBRATION_TOL
    return float(sigma)


def _root(gap, guess: float, target: float) -> float:
    """A sigma within `_CALIBRATION_TOL` of the decreasing `gap`'s zero, searched from `guess`.

    The bracket [low, high], gap(low) > 0 >= gap(high), is grown around the Gaussian-DP (CLT)
    guess, so the accountant is only evaluated near the answer: small sigmas are the slow ones for
    PLD. (The sigma-dependent PLD grid is why dp_accounting.calibrate_dp_mechanism, which wants
    one accountant factory for every sigma, is not used.)
    """
    low, high = guess / 1.1, guess * 1.1
    while gap(high) > 0:
        low, high = high, high * 1.5
        if high > 2.0**30:
            raise ValueError(f"no noise multiplier below 2**30 reaches epsilon={target}")
    while gap(low) <= 0:
        low, high = low / 1.5, low
        if low < _CALIBRATION_TOL:
            return high  # the target is met even with almost no noise
    return optimize.brentq(gap, low, high, xtol=_CALIBRATION_TOL)


def _settle(gap, coarse_gap, sigma: float, target: float) -> float:
    """The zero of the full-precision `gap` near `sigma`, the zero of the cheaper `coarse_gap`.

    Over few steps the two zeros are usually within `_CALIBRATION_TOL`: two full-precision
    evaluations confirm it. Otherwise (the coarse grid's error grows with the step count), the
    two epsilons differ by an almost constant offset near the answer, so the coarse search is
    repeated with the offset measured at `sigma`; its result is bracketed with full-precision
    steps of `_CALIBRATION_TOL` doubling away from it, usually in two more evaluations, and
    root-found inside the bracket.
    """
    fine = gap(sigma)
    if fine <= 0 and sigma >= 2 * _CALIBRATION_TOL and gap(sigma - _CALIBRATION_TOL) > 0:
        return sigma
    offset = fine - coarse_gap(sigma)
    sigma = _root(lambda s: coarse_gap(s) + offset, sigma, target)
    step = _CALIBRATION_TOL
    if gap(sigma) > 0:  # the zero lies above
        low, high = sigma, sigma + step
        while gap(high) > 0:
            low, high, step = high, high + 2 * step, 2 * step
    else:
        low, high = sigma - step, sigma
        while low < _CALIBRATION_TOL or gap(low) <= 0:
            if low < _CALIBRATION_TOL:
                return high  # the target is met even with almost no noise
            low, high, step = low - 2 * step, low, 2 * step
    if high - low <= _CALIBRATION_TOL:
        return high
    return optimize.brentq(gap, low, high, xtol=_CALIBRATION_TOL)


# --- the ledger ------------------------------------------------------------------------------------


class PrivacyLedger:
    """The privacy history of one training run, enforcing a hard epsilon budget.

    The history is a list of phases `(noise_multiplier, sampling_rate, steps)`; consecutive steps
    with equal (sigma, q) are merged into one phase. Its epsilon is that of the composition of the
    phases, so changing sigma or q mid-run is accounted correctly.

    Cheap per-step checks. For the trailing phase's (sigma, q) and the fixed history before it, the
    ledger caches a bracket [allowed, refused) on the phase's total step count: a count known to
    be within budget and one known to exceed it. `can_record` answers from the bracket in O(1);
    only when a query falls inside it does it evaluate epsilon, at a doubled (or bisected) count,
    so a run of T steps triggers O(log T) accountant evaluations in total, not T.

    Only Poisson sampling is accounted: `record(..., sampling="shuffled")` raises.
    """

    def __init__(self, target_epsilon: float, delta: float, *, accountant: str = "pld",
                 num_examples: int | None = None):
        self.target_epsilon = _check_epsilon(target_epsilon)
        self.delta = _check_delta(delta, num_examples)
        self.accountant = _check_accountant(accountant)
        self.num_examples = None if num_examples is None else int(num_examples)
        self._phases: list[tuple[float, float, int]] = []
        # (history before the trailing phase, sigma, q) -> (largest total known allowed,
        #                                                   smallest total known refused or None)
        self._brackets: dict[tuple, tuple[int, int | None]] = {}

    # -- queries --

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self._phases)

    @property
    def phases(self) -> list[tuple[float, float, int]]:
        return list(self._phases)

    def spent_epsilon(self, accountant: str | None = None) -> float:
        """Epsilon spent so far at the ledger's delta (optionally with the other accountant)."""
        accountant = self.accountant if accountant is None else _check_accountant(accountant)
        return _phases_epsilon(self._phases, self.delta, accountant)

    def _split(self, sigma: float, q: float) -> tuple[tuple, int]:
        """(history before a trailing (sigma, q) phase, the steps already in that phase)."""
        if self._phases and self._phases[-1][:2] == (sigma, q):
            return tuple(self._phases[:-1]), self._phases[-1][2]
        return tuple(self._phases), 0

    def _within_budget(self, prefix: tuple, sigma: float, q: float, phase_steps: int) -> bool:
        phases = list(prefix) + [(sigma, q, phase_steps)]
        return _phases_epsilon(phases, self.delta, self.accountant) <= self.target_epsilon

    def _allowed(self, prefix: tuple, sigma: float, q: float, phase_steps: int) -> bool:
        """Whether a trailing (sigma, q) phase of `phase_steps` total steps fits the budget."""
        key = (prefix, sigma, q)
        allowed, refused = self._brackets.get(key, (0, None))
        while not (phase_steps <= allowed or (refused is not None and phase_steps >= refused)):
            if refused is None:
                probe = max(phase_steps, 2 * allowed)  # doubling: O(log T) probes over a run
            else:
                probe = (allowed + refused) // 2  # allowed < phase_steps < refused
            if self._within_budget(prefix, sigma, q, probe):
                allowed = probe
            else:
                refused = probe
            self._brackets[key] = (allowed, refused)
        return phase_steps <= allowed

    def can_record(self, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> bool:
        """Whether `steps` more steps at (sigma, q) keep the spent epsilon <= target (cheap)."""
        sigma, q = _check_sigma(noise_multiplier), _check_rate(sampling_rate)
        steps = _check_steps(steps)
        prefix, done = self._split(sigma, q)
        return self._allowed(prefix, sigma, q, done + steps)

    # -- updates --

    def record(self, noise_multiplier: float, sampling_rate: float, steps: int = 1,
               sampling: str = "poisson") -> None:
        """Records `steps` releases at (sigma, q), refusing any that would exceed the budget.

        Raises:
          ValueError: `sampling` is not "poisson" (e.g. fixed-size shuffled batches, which are a
            different mechanism from the Poisson subsampling accounted here).
          BudgetExceededError: the steps would take the spent epsilon past the target; nothing is
            recorded.
        """
        if sampling != "poisson":
            raise ValueError(f"sampling={sampling!r}: only Poisson-sampled batches can be "
                             "accounted as PoissonSampledDpEvent; fixed-size shuffled batches "
                             "are a different mechanism and are not private here")
        sigma, q = _check_sigma(noise_multiplier), _check_rate(sampling_rate)
        steps = _check_steps(steps)
        if steps == 0:
            return
        if not self.can_record(sigma, q, steps):
            raise BudgetExceededError(
                f"{steps} more step(s) at noise_multiplier={sigma}, sampling_rate={q} would "
                f"exceed epsilon={self.target_epsilon} at delta={self.delta} "
                f"(spent so far: {self.spent_epsilon():.4f} over {self.total_steps} steps)")
        prefix, done = self._split(sigma, q)
        self._phases = list(prefix) + [(sigma, q, done + steps)]

    # -- serialisation --

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (the spent epsilon is included for readers, not trusted)."""
        return {
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "num_examples": self.num_examples,
            "phases": [
                {"noise_multiplier": s, "sampling_rate": q, "steps": n} for s, q, n in self._phases
            ],
            "spent_epsilon": self.spent_epsilon(),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> PrivacyLedger:
        """Rebuilds a ledger from `to_dict()` output (the epsilon is recomputed, not read)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the delta >= 1/N warning was given at creation
            ledger = cls(record["target_epsilon"], record["delta"], accountant=record["accountant"],
                         num_examples=record.get("num_examples"))
        for phase in record["phases"]:
            sigma = _check_sigma(phase["noise_multiplier"])
            q = _check_rate(phase["sampling_rate"])
            steps = _check_steps(phase["steps"])
            if steps == 0:
                continue
            if ledger._phases and ledger._phases[-1][:2] == (sigma, q):
                ledger._phases[-1] = (sigma, q, ledger._phases[-1][2] + steps)
            else:
                ledger._phases.append((sigma, q, steps))
        return ledger
