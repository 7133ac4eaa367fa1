"""Online recalibration (core/recalibration.py): the concurrency an instance is seen to run converges
to the true one through noise, nothing changes when observations match the estimator, and the
estimator's batch follows it."""

from __future__ import annotations

import random

import pytest
from conftest import make_fleet

from qlm_backend.core.api import ManagerConfig, OutputPrior, Request
from qlm_backend.core.estimator import RwtEstimator
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.recalibration import PROMPT_RATIO, Recalibrator
from qlm_backend.core.request import RequestState, Status
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES, index_classes

KEY = ("mistral-7b", "A100-80G", 1)


# ---------------------------------------------------------------------------------- Recalibrator
def test_converges_to_the_true_concurrency_through_noise() -> None:
    # The engine runs 40 at once; the count seen at a finish is off by a few either way.
    rng = random.Random(3)
    rc = Recalibrator(alpha=0.05)
    errors = []
    for _ in range(500):
        rc.observe_first_token(KEY, 0.2, 0.2, in_flight=40 + rng.randint(-3, 3))
        errors.append(abs(rc.state()[KEY].concurrency - 40.0))
    assert errors[-1] < 1.0 and rc.concurrency(KEY) == 40
    # A running mean first: close after 20 observations already, not dragged from 0 by the EWMA.
    assert errors[19] < 1.5
    assert rc.state()[KEY].observations == 500


def test_concurrency_is_a_running_mean_then_an_ewma() -> None:
    rc = Recalibrator(alpha=0.1)
    for n in (30, 40, 40, 40):
        rc.observe_first_token(KEY, 0.2, 0.2, in_flight=n)
    assert rc.state()[KEY].concurrency == pytest.approx(37.5)  # (30 + 40 + 40 + 40) / 4
    assert rc.concurrency(KEY) == 38
    for _ in range(6):  # n = 10: 1/n reaches alpha
        rc.observe_first_token(KEY, 0.2, 0.2, in_flight=40)
    before = rc.state()[KEY].concurrency
    rc.observe_first_token(KEY, 0.2, 0.2, in_flight=20)
    assert rc.state()[KEY].concurrency == pytest.approx(before + 0.1 * (20 - before))


def test_only_prompt_first_tokens_count() -> None:
    rc = Recalibrator(alpha=0.05)
    # The request waited in the engine: the count says nothing of what runs at once.
    assert not rc.observe_first_token(KEY, 0.2 * (PROMPT_RATIO + 0.1), 0.2, in_flight=40)
    assert not rc.observe_first_token(KEY, 0.0, 0.2, in_flight=40)  # broken observation
    assert rc.concurrency(KEY) == 0 and rc.state() == {}
    assert rc.observe_first_token(KEY, 0.2 * PROMPT_RATIO, 0.2, in_flight=40)
    assert rc.concurrency(KEY) == 40


def test_no_change_when_observation_matches_the_estimator() -> None:
    rc = Recalibrator(alpha=0.05)
    for _ in range(50):
        rc.observe_first_token(KEY, 0.3, 0.3, in_flight=30)
    # A floor below the estimator's own KV fit leaves it as it is.
    assert rc.kv_fit(KEY, 35) == 35
    assert rc.kv_fit(KEY, 25) == 30
    assert rc.kv_fit(("other", "A100-80G", 1), 25) == 25  # nothing learnt for that key


def test_disabled_or_frozen_is_inert() -> None:
    for rc in (Recalibrator(alpha=0.05, enabled=False), Recalibrator(alpha=0.0)):
        assert not rc.enabled
        assert not rc.observe_first_token(KEY, 0.2, 0.2, in_flight=40)
        assert rc.concurrency(KEY) == 0 and rc.kv_fit(KEY, 25) == 25
        assert rc.state() == {}


# ---------------------------------------------------------------------------------- estimator
def _setup(recalibrate: bool, prior_mean: float) -> tuple[RwtEstimator, InstanceState]:
    fleet = make_fleet(n=1, max_in_flight=40)
    cfg = ManagerConfig(
        recalibrate=recalibrate,
        priors={("mistral-7b", "batch-1"): OutputPrior(prior_mean, prior_mean / 2)},
    )
    est = RwtEstimator(index_classes(DEFAULT_SLO_CLASSES), cfg)
    est.observe_output(
        "mistral-7b", "batch-1", int(prior_mean)
    )  # the profile averages classes seen
    return est, InstanceState(fleet.instances[0], model="mistral-7b")


def _finish(est: RwtEstimator, inst: InstanceState, k: int, delay_s: float, others: int) -> None:
    """A request of fixed output length (it teaches no output length), 4 tokens (no cadence), whose
    first token came `delay_s` after its pull while `others` more ran on the instance."""
    req = Request(f"r{k}", "mistral-7b", "batch-1", 0.0, 60.0, 512, 4, output_fixed=True)
    st = RequestState(req, status=Status.IN_FLIGHT, instance_id=inst.instance_id)
    st.dispatched_s, st.first_token_s = 0.0, delay_s
    inst.in_flight = {f"o{j}" for j in range(others)}
    est.profile("mistral-7b", inst.spec)  # the planner forecast meanwhile: its profile is cached
    est.observe_finished(st, 4, inst, now=1.0 + delay_s)


def test_concurrency_seen_raises_a_pessimistic_kv_fit() -> None:
    # Long outputs: counting every request at its full context, the KV cache seems to hold fewer
    # than the 40 the pull bound sends.
    est, inst = _setup(recalibrate=True, prior_mean=30_000.0)
    prof = est.profile("mistral-7b", inst.spec)
    assert prof.batch < 40
    for k in range(50):
        _finish(est, inst, k, prof.prefill_first_s, others=39)  # taken at once with 39 running
    assert est.recal.state()[("mistral-7b", "A100-80G", 1)].observations == 50
    after = est.profile("mistral-7b", inst.spec)
    assert after.batch == 40  # the pull bound still caps it
    assert after.step_s > prof.step_s  # a bigger batch's step (and a cheaper token)
    assert after.token_cost_s < prof.token_cost_s
    # Off: the same observations leave the profile as it was.
    off, inst_off = _setup(recalibrate=False, prior_mean=30_000.0)
    for k in range(50):
        _finish(off, inst_off, k, prof.prefill_first_s, others=39)
    assert off.profile("mistral-7b", inst_off.spec) == prof


def test_estimator_unchanged_when_its_batch_was_right() -> None:
    est, inst = _setup(recalibrate=True, prior_mean=256.0)
    before = est.profile("mistral-7b", inst.spec)
    assert before.batch == 40  # short outputs: the pull bound binds, not the KV cache
    for k in range(50):
        _finish(est, inst, k, before.prefill_first_s, others=39)
    assert est.profile("mistral-7b", inst.spec) == before


def test_estimator_waits_in_the_engine_teach_nothing() -> None:
    est, inst = _setup(recalibrate=True, prior_mean=30_000.0)
    prof = est.profile("mistral-7b", inst.spec)
    for k in range(50):
        _finish(est, inst, k, 10 * prof.prefill_first_s, others=39)  # queued in the engine
    assert est.profile("mistral-7b", inst.spec) == prof
    assert est.recal.state() == {}
