"""The RWT estimator's first-token predictions against the simulated engine in virtual time."""

from __future__ import annotations

import random

from conftest import Cluster, make_fleet, make_request

from qlm_backend.core.api import ManagerConfig, OutputPrior, QueueEntry, QueueManager


def test_predicted_first_token_mean_within_15pct_at_100_queued() -> None:
    # 100 requests queued at t=0 on one A100 running mistral-7b, 16 in flight at a time, output
    # lengths drawn from a known distribution that is also the estimator's prior.
    rng = random.Random(7)
    outs = [max(8, int(rng.gauss(300, 120))) for _ in range(100)]
    cfg = ManagerConfig(
        priors={("mistral-7b", "batch-2"): OutputPrior(300.0, 120.0)},
        ewma_alpha=0.0,
        group_max_size=16,
    )
    fleet = make_fleet(n=1, max_in_flight=16)
    reqs = [
        make_request(
            f"r{k:03d}",
            slo_class="batch-2",
            prompt_tokens=400,
            max_tokens=2000,
            deadline_s=3600.0 + k * 1e-3,
            true_output_tokens=outs[k],
        )
        for k in range(100)
    ]
    # Prediction: each request is its own entry at its deadline-order position of one queue.
    pred_qm = QueueManager(fleet, "edf", cfg)
    for r in reqs:
        pred_qm.add_request(r, 0.0)
    ctx = pred_qm._context("test")
    entries = [
        QueueEntry(pred_qm.requests[r.request_id].group_id or "", (r.request_id,)) for r in reqs
    ]
    fc = pred_qm.estimator.forecast_queue(pred_qm.instances["i-0"], entries, ctx, 0.0)
    predicted = [f.first_token_mean_s for f in fc]
    # Ground truth: EDF pulls in the same (deadline) order into a SimEngine, 16 at a time.
    cl = Cluster(QueueManager(fleet, "edf", cfg)).run(reqs)
    actual = [cl.first_token[r.request_id] for r in reqs]
    mp, ma = sum(predicted) / 100, sum(actual) / 100
    print(f"estimator vs sim: predicted mean {mp:.2f} s, simulated mean {ma:.2f} s")
    assert abs(mp - ma) / ma < 0.15, (mp, ma)
    # The order is right too: later positions are predicted later (monotone forecast).
    assert predicted == sorted(predicted)
