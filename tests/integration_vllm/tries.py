"""Tries of the real-vLLM tests, each recorded with its cause, and bounds on them.

On this shared 2-core VM a try's precondition sometimes does not hold (the client stalls for
seconds, a burst drains before the request that should wait behind it arrives), and Triton 2.51's
gRPC frontend sometimes loses a stream cancel. Such a try is not judged and is tried again; but a
test that repeats until one try passes would hide a failure rate. So every try is recorded with
its cause, and:
- a try that failed for a cause of ours (router or engine) fails the test at once (never
  retried);
- a test ends with a judged try within its `max_tries`;
- over the whole session, the share of tries not judged stays at or under MAX_UNJUDGED_SHARE, and
  the share lost to the frontend's cancel race at or under MAX_FRONTEND_LOST_SHARE of the tries
  that cancel (checked when the session's server stops: conftest.py).
Every try goes to results/integration_vllm.json (`tries`), with its evidence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Cause = Literal[
    "judged",  # the precondition held: the test's assertions apply to this try
    "precondition",  # the situation the test needs did not form (e.g. no queue ahead)
    "client_stall",  # this client sent late or read late (the VM stalled it), shown by timings
    "frontend_lost_cancel",  # a cancel Triton's frontend never delivered, shown by the logs
    "router_fault",  # the router did not do its part (e.g. saw a cancel, left the engine running)
    "engine_fault",  # our engine model did not (e.g. saw a cancel, kept generating)
]
FAULTS: tuple[Cause, ...] = ("router_fault", "engine_fault")
NOT_JUDGED: tuple[Cause, ...] = ("precondition", "client_stall", "frontend_lost_cancel")
# Measured before 2026-12-02: the cancel race in 3 of 13 tries; other preconditions in about one
# try in five on a loaded VM. The bounds leave room for that and catch a systematic failure.
MAX_UNJUDGED_SHARE = 0.5
MAX_FRONTEND_LOST_SHARE = 0.5


# A cancel crosses the client's gRPC stream, Triton's frontend and the stub before the engine sees
# it: one sent this little before the engine finished could not have stopped it (seen: 7 and 14 ms
# before the end, on a VM loaded by another run, classed as lost by the frontend before).
CANCEL_TRANSIT_S = 0.05


def cancel_cause(
    cancelled_s: float, finished_s: float, engine_log: str, request_ids: Iterable[str]
) -> Cause:
    """Why a stream this client cancelled ran to its end, from evidence: the cancel left after the
    engine had finished, or too close to it to arrive (the client read its replies late), or the engine was told of it and kept
    generating (its fault), or it was never told (Triton's frontend lost the cancel). The engine
    logs every cancel it is told of ("request <id> cancelled by the client")."""
    if cancelled_s >= finished_s - CANCEL_TRANSIT_S:
        return "client_stall"
    told = any(f"request {r} cancelled by the client" in engine_log for r in request_ids)
    return "engine_fault" if told else "frontend_lost_cancel"


@dataclass
class Tries:
    test: str
    max_tries: int
    records: list[dict[str, Any]] = field(default_factory=list)
    cancels: bool = False  # its tries cancel streams (they count for the frontend bound)

    def add(self, cause: Cause, **evidence: Any) -> None:
        self.records.append({"try": len(self.records) + 1, "cause": cause, **evidence})
        if cause in FAULTS:
            raise AssertionError(f"{self.test}: {cause}: {evidence}")
        if cause != "judged":
            print(f"\n{self.test}: try {len(self.records)} not judged ({cause}): {evidence}")

    @property
    def judged(self) -> bool:
        return bool(self.records) and self.records[-1]["cause"] == "judged"

    def more(self) -> bool:
        """Whether to try (again): no judged try yet, and tries left."""
        return not self.judged and len(self.records) < self.max_tries

    def done(self, figures: dict[str, Any]) -> None:
        """Record the tries; the test must have a judged one."""
        figures.setdefault("tries", {})[self.test] = {
            "cancels": self.cancels,
            "records": self.records,
        }
        assert self.judged, f"{self.test}: no judged try in {self.max_tries}: {self.records}"


def session_shares(figures: dict[str, Any]) -> dict[str, float]:
    """Over every test's tries: how many, and the shares not judged and lost to the frontend."""
    tests = figures.get("tries", {}).values()
    all_tries = [r for t in tests for r in t["records"]]
    cancel_tries = [r for t in tests if t["cancels"] for r in t["records"]]
    unjudged = sum(r["cause"] in NOT_JUDGED for r in all_tries)
    lost = sum(r["cause"] == "frontend_lost_cancel" for r in cancel_tries)
    return {
        "tries": len(all_tries),
        "unjudged_share": round(unjudged / len(all_tries), 3) if all_tries else 0.0,
        "frontend_lost_share": round(lost / len(cancel_tries), 3) if cancel_tries else 0.0,
        "max_unjudged_share": MAX_UNJUDGED_SHARE,
        "max_frontend_lost_share": MAX_FRONTEND_LOST_SHARE,
    }


def assert_session_bounds(shares: dict[str, float]) -> None:
    assert shares["unjudged_share"] <= MAX_UNJUDGED_SHARE, shares
    assert shares["frontend_lost_share"] <= MAX_FRONTEND_LOST_SHARE, shares
