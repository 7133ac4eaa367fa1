"""Shedding under overload (core/policies/qlm/shedding.py): a sheddable request is refused where
it would stand in the queue, with room kept for the classes above it."""

from __future__ import annotations

from conftest import make_request

from qlm_backend.core.api import QueueManager, Reject, parse_fleet

CLASSES = [
    {"name": "interactive", "ttft_slo_s": 20.0, "weight": 10.0, "priority": 0},
    {"name": "batch-1", "ttft_slo_s": 60.0, "weight": 2.0, "sheddable": True, "priority": 1},
    {"name": "batch-2", "ttft_slo_s": 3600.0, "weight": 1.0, "sheddable": True, "priority": 2},
]


def make_manager() -> QueueManager:
    fleet = parse_fleet(
        {
            "instances": [
                {
                    "instance_id": "l4-0",
                    "gpu": "L4",
                    "models_allowed": ["mistral-7b"],
                    "initial_model": "mistral-7b",
                    "max_in_flight": 4,
                }
            ],
            "slo_classes": CLASSES,
        }
    )
    return QueueManager(fleet, "qlm")


def flood(qm: QueueManager, n: int, *, interactive_every: int = 0) -> list[int]:
    """n batch-1 arrivals 0.1 s apart (planned as they come); returns the indices refused."""
    refused = []
    for i in range(n):
        t = 0.1 * i
        if interactive_every and i % interactive_every == 0:
            # Interactive is not sheddable: always admitted.
            assert qm.add_request(make_request(f"u{i}", "mistral-7b", "interactive", t), t) is None
        rej = qm.add_request(make_request(f"b{i}", "mistral-7b", "batch-1", t, max_tokens=256), t)
        if rej is not None:
            assert isinstance(rej, Reject)
            assert "cannot be met" in rej.reason and "behind the work queued" in rej.reason
            refused.append(i)
        qm.plan(t)
    return refused


def test_a_batch_flood_is_refused_once_the_queue_ahead_outlasts_its_slo() -> None:
    # The L4 serves mistral-7b at 4 seats, ~65 ms a step: the 256-token prior costs ~17 s a
    # request per seat, ~4 s of instance time. 4 in flight plus ~15 queued fill the 60 s SLO, so
    # the flood (10 arrivals a second) is refused from about the 20th arrival on (22 when
    # written), at once, while the earlier ones stay admitted.
    qm = make_manager()
    refused = flood(qm, 120)
    assert refused, "a 10x flood must be shed"
    first = refused[0]
    assert 12 <= first <= 40, first
    assert all(i not in refused for i in range(first))
    # Most of what follows is refused; what is admitted still fits its deadline.
    assert len(refused) > 0.5 * (120 - first)


def test_higher_class_arrivals_make_room_for_themselves() -> None:
    # The same flood with an interactive request every 5th arrival (2 a second): their work goes
    # ahead of batch-1 whose deadlines come later, so batch-1 is refused sooner (15th arrival
    # instead of the 22nd when written) and more of it.
    alone = flood(make_manager(), 120)
    mixed = flood(make_manager(), 120, interactive_every=5)
    assert mixed[0] < alone[0], (mixed[0], alone[0])
    assert len(mixed) > len(alone)


def test_far_deadline_work_is_not_refused_for_a_short_burst() -> None:
    # batch-2 (3600 s SLO) behind the same flood: an hour of slack covers the queue, and the
    # burst's rate is extrapolated a minute, not an hour.
    qm = make_manager()
    flood(qm, 120, interactive_every=5)
    r = make_request("late", "mistral-7b", "batch-2", 12.0)
    assert qm.add_request(r, 12.0) is None


def test_a_shed_reason_says_when_the_first_token_could_come_even_when_p_is_zero() -> None:
    # A 1 ms deadline behind a full instance: P(meet) is 0 everywhere, yet the instance serves the
    # model, so the reason gives the earliest first-token time (clients derive Retry-After from it)
    # rather than "no instance serves it".
    qm = make_manager()
    flood(qm, 30)
    rej = qm.add_request(
        make_request("late", "mistral-7b", "batch-1", 3.0, deadline_s=3.001, max_tokens=256), 3.0
    )
    assert rej is not None and "no instance serves it" not in rej.reason
    assert "first token in ~" in rej.reason
