"""The pure half of `qlm-bench chaos`: the seeded fault schedule, each request's seeded choices, and
the accounting of what the clients saw. No I/O and no clock: times are arguments, so all of it is
unit-tested (tests/unit/test_chaos_schedule.py); bench/chaos.py is the shell that acts and observes.

Definitions the report uses:
- *sent*: well-formed requests sent (bad inputs are counted on their own).
- *refused*: an explicit error at admission, before any token: shed, queue full, or the router
  unavailable (unloaded, reloading, crashed).
- *accepted*: sent - refused. *completed*: the final response arrived.
- *cancelled*: the bench's own client cancelled it before its answer (the clients that cancel).
- *orphaned*: a Triton-front stream held by the router's stub when it was SIGKILLed
  (`router-crash`) that never got an answer. Triton 2.51 cannot answer those
  (docs/reliability.md, the router's own crash), so they are counted apart, not as lost.
- *lost*: accepted, not cancelled, not orphaned, and neither a final response nor an explicit error
  within the client's deadline. Must be 0.
- *waiting*: what would be lost but for its SLO: no first token yet when its client gave up (or the
  run ended), and its class's TTFT SLO had not run out. The router owes it nothing yet (a batch-2
  request may wait an hour), so a client deadline shorter than the SLO cannot judge it; counted
  apart (a 10-minute run's one "lost" request was a batch-2 request sent at the end of a 10x
  burst; whether it had a token by then was not recorded).
- *recovery* of a fault: from its start to the end of the first request served normally (completed
  with TTFT within its class SLO) by the part the fault hit, among requests sent after the fault
  (after its window, for the load-shaped faults). For the router (reload, crash) and the load shapes
  that is any request through the router; for an engine kill, its instance, and for a server
  restart every instance of that server, each served through the router or by a direct probe of
  its engine (the router may send an instance no work at a low load).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qlm_backend.stats import percentile

# What the bench can do, in the words: an engine stub killed, a remote Triton server killed
# and restarted, the router reloaded (unload/load through the repository API), a wave of clients
# cancelling, a window of bad inputs, a 10x burst; and, only when asked for, the router's stub
# SIGKILLed (its Triton-front streams cannot be answered: counted as orphaned).
KINDS = (
    "engine-kill",
    "server-restart",
    "router-reload",
    "cancel-wave",
    "bad-input",
    "burst",
    "router-crash",
)
DEFAULT_KINDS = KINDS[:-1]
WINDOW_KINDS = frozenset({"cancel-wave", "bad-input", "burst"})  # load shapes, over a window
FRONTS = ("grpc", "http", "openai")
PHASES = ("before", "during", "after")
Outcome = Literal["completed", "error", "lost", "cancelled"]
# Error kinds that are refusals at admission (the request never ran).
REFUSALS = frozenset({"shed", "queue-full", "router-unavailable", "router-down"})


@dataclass(frozen=True)
class Fault:
    index: int  # 1-based, in schedule order
    kind: str
    at_s: float  # planned start, seconds from the start of the load
    duration_s: float  # window length, server downtime or router hold-down; 0 for a kill
    target: str = ""  # the engine model, the server, or "" (the router, the load)


@dataclass(frozen=True)
class ScheduleConfig:
    kinds: tuple[str, ...]
    start_s: float  # the first fault not before (after the "before" phase)
    end_s: float  # every fault planned to end before this (then the "after" phase)
    every_s: float  # mean spacing: more faults than kinds when the window allows
    durations_s: Mapping[str, float] = field(default_factory=dict)
    gap_s: float = 1.0  # quiet time between one fault's planned end and the next's start

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be some of {', '.join(KINDS)}; got {self.kinds}")
        if not 0 <= self.start_s < self.end_s:
            raise ValueError(f"fault window [{self.start_s}, {self.end_s}] is empty")
        if self.every_s <= 0 or self.gap_s < 0:
            raise ValueError("every_s must be > 0 and gap_s >= 0")


def plan_faults(
    seed: int, cfg: ScheduleConfig, targets: Mapping[str, Sequence[str]]
) -> tuple[Fault, ...]:
    """The faults, one at a time: every kind at least once, in a seeded order (whole shuffled passes
    over the kinds, so they recur evenly), each in its own slot of the window at a seeded offset,
    with its target drawn among `targets[kind]` (kinds absent there have none)."""
    rng = random.Random(f"chaos-faults/{seed}")
    span = cfg.end_s - cfg.start_s
    n = max(len(cfg.kinds), int(span // cfg.every_s))
    order: list[str] = []
    while len(order) < n:
        order += rng.sample(list(cfg.kinds), len(cfg.kinds))
    order = order[:n]
    slot = span / n
    out = []
    for k, kind in enumerate(order):
        dur = float(cfg.durations_s.get(kind, 0.0))
        room = slot - dur - cfg.gap_s
        if room < 0:
            raise ValueError(
                f"fault window of {span:g} s is too short for {n} faults: a {kind} needs "
                f"{dur + cfg.gap_s:g} s, a slot is {slot:.1f} s (longer run, fewer kinds or "
                "shorter durations)"
            )
        choices = list(targets.get(kind, ()))
        if kind in targets and not choices:
            raise ValueError(f"no target for {kind}")
        target = rng.choice(choices) if choices else ""
        out.append(Fault(k + 1, kind, cfg.start_s + k * slot + rng.uniform(0, room), dur, target))
    return tuple(out)


@dataclass(frozen=True)
class FaultRun:
    """A fault as it happened (the shell starts each at its planned time or, when the previous one
    ran late, `gap_s` after that one ended)."""

    fault: Fault
    start_s: float
    end_s: float  # the window's end, the server ready again, the router loaded again
    note: str = ""
    error: str | None = None  # the injection itself failed (then it is no recovery to wait for)
    target: str = ""  # what was hit: the planned target, or for an engine kill the busiest engine

    @property
    def serve_after_s(self) -> float:
        """Requests sent from here on can show the recovery: after the window for load shapes,
        from the fault on for the others (a request sent while a server is down may be served by
        it once it is back)."""
        return self.end_s if self.fault.kind in WINDOW_KINDS else self.start_s


def next_start_s(planned_s: float, previous_end_s: float | None, gap_s: float) -> float:
    """One at a time: a fault waits for its planned time and for `gap_s` after the previous one."""
    return planned_s if previous_end_s is None else max(planned_s, previous_end_s + gap_s)


def busiest(running: Mapping[str, float], seed: int, index: int) -> str:
    """The engine an engine kill hits: the one running the most requests at that moment (killing
    an idle engine tests nothing: the router notices a dead engine only when it sends it work),
    ties broken by the seed."""
    if not running:
        raise ValueError("no engine to kill")
    top = max(running.values())
    tied = sorted(e for e, n in running.items() if n == top)
    return random.Random(f"chaos-kill/{seed}/{index}").choice(tied)


# --- the requests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BadCase:
    """A bad input: `param` is the field its refusal must name. Triton fronts change the client Request
    (`request`: its attributes; `sampling`: extra sampling keys); qlm-openai the JSON body
    (`body`) or headers (`headers`)."""

    param: str
    request: Mapping[str, Any] = field(default_factory=dict)
    sampling: Mapping[str, Any] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


TRITON_BAD = (
    BadCase("slo_class", request={"slo_class": "gold"}),
    BadCase("max_tokens", request={"max_tokens": 0}),
    BadCase("temperature", sampling={"temperature": -0.5}),
    BadCase("model", request={"model": "gpt-9"}),
    BadCase("top_p", sampling={"top_p": 1.5}),
)
OPENAI_BAD = (
    BadCase("x-slo-class", headers={"x-slo-class": "gold"}),
    BadCase("max_tokens", body={"max_tokens": 0}),
    BadCase("temperature", body={"temperature": -0.5}),
    BadCase("model", body={"model": "gpt-9"}),
    BadCase("top_p", body={"top_p": 1.5}),
)


@dataclass(frozen=True)
class Choice:
    front: str
    bad: BadCase | None  # None: a well-formed request
    cancel_at: float | None  # None: kept; else cancelled at this fraction of its expected time


def choose(
    seed: int,
    rid: str,
    front_shares: Mapping[str, float],
    cancel_p: float,
    bad_p: float,
) -> Choice:
    """A request's front, and whether its client sends it bad or cancels it: seeded by the request's
    id, so a run's choices do not depend on timing (only the window in force changes the odds)."""
    rng = random.Random(f"chaos-request/{seed}/{rid}")
    fronts = [f for f in FRONTS if front_shares.get(f, 0) > 0]
    front = rng.choices(fronts, [front_shares[f] for f in fronts])[0]
    bad = None
    if rng.random() < bad_p:
        bad = rng.choice(OPENAI_BAD if front == "openai" else TRITON_BAD)
    # Between "before it reaches an engine" and "near its end": queued and mid-stream cancels.
    cancel_at = rng.uniform(0.05, 0.9) if bad is None and rng.random() < cancel_p else None
    return Choice(front, bad, cancel_at)


# --- what the clients saw -------------------------------------------------------------------------
def error_kind(status: str | None, message: str) -> str:
    """One word for an explicit error, from its status and message (all three fronts)."""
    m = message.lower()
    if "request shed" in m:
        return "shed"
    if "queue is full" in m or "queue_full" in m:
        return "queue-full"
    if "request timed out" in m or status in ("HTTP 504", "504"):
        return "timeout"
    if "went down" in m:
        # qlm-openai ended a stream its router left silent, heartbeats included, while not ready.
        return "router-down"
    router_gone = (
        "request for unknown model" in m  # Triton: unloaded, no version serves it
        or "has no available versions" in m
        or "router is unloading" in m
        or "router is unavailable" in m
        or "router model is not loaded" in m
        or ("stub process" in m and "qlm_0_0" in m)  # the router's stub died
    )
    if router_gone:
        return "router-unavailable"
    if "cancel" in m or status == "CANCELLED":
        return "cancelled"
    if status in ("INVALID_ARG", "INVALID_ARGUMENT", "HTTP 400", "400", "HTTP 404", "404"):
        return "invalid"
    return "other"


@dataclass(frozen=True)
class Observed:
    """One request as its client saw it. Times are seconds from the start of the load."""

    rid: str
    front: str
    slo_class: str
    sent_s: float
    outcome: Outcome
    end_s: float | None = None
    ttft_s: float | None = None  # wall seconds from send to the first token
    tokens: int = 0
    instance: str | None = None
    status: str | None = None
    error: str | None = None
    bad_field: str | None = None  # a bad input: the field its refusal must name
    burst: bool = False  # one of a burst's extra arrivals

    @property
    def kind(self) -> str | None:
        if self.outcome != "error":
            return None
        return error_kind(self.status, self.error or "")


def bad_input_ok(o: Observed) -> bool:
    """Refused explicitly, as bad input, naming its field: HTTP 400/404 (Triton HTTP, qlm-openai),
    or an error inside the gRPC stream whose message names the field (gRPC stream errors carry no
    status code)."""
    if o.outcome != "error" or o.bad_field is None:
        return False
    named = o.bad_field in (o.error or "")
    if o.front == "grpc":
        return named
    return named and o.status in ("INVALID_ARG", "NOT_FOUND", "HTTP 400", "HTTP 404", "400", "404")


def orphaned(o: Observed, router_kills_s: Sequence[float]) -> bool:
    """A Triton-front stream open on the router when its stub was killed, never answered after."""
    if o.front == "openai" or o.outcome not in ("lost", "cancelled"):
        return False
    return any(o.sent_s < t and (o.end_s is None or o.end_s > t) for t in router_kills_s)


def within_slo(o: Observed, slo_s: Mapping[str, float] | None, time_scale: float) -> bool:
    """No first token yet, and its class's TTFT SLO had not run out when its client stopped
    waiting: the router had not yet broken its contract with it."""
    if slo_s is None or o.tokens or o.ttft_s is not None or o.end_s is None:
        return False
    return o.end_s - o.sent_s < slo_s.get(o.slo_class, 0.0) * time_scale


def served_normally(o: Observed, slo_s: Mapping[str, float], time_scale: float) -> bool:
    return (
        o.outcome == "completed"
        and o.ttft_s is not None
        and o.ttft_s / time_scale <= slo_s.get(o.slo_class, float("inf"))
    )


@dataclass(frozen=True)
class Recovery:
    after_s: float  # from the fault's start
    by: tuple[str, ...]  # the fronts of the requests that showed it ("probe": a direct probe)


def recovery(
    run: FaultRun,
    seen: Iterable[Observed],
    parts: Sequence[str],
    slo_s: Mapping[str, float],
    time_scale: float,
) -> Recovery | None:
    """When the part the fault hit served normally again (None: not yet). `parts`: the instances
    that must each serve (an engine kill: its instance; a server restart: the server's instances),
    through the router or, since the router may send an instance no work at a low load, by a
    direct probe of its engine (front "probe"); empty: any request through the router will do."""
    if run.error is not None:
        return None
    first: dict[str, Observed] = {}
    for o in seen:
        if o.sent_s < run.serve_after_s or o.end_s is None or o.bad_field is not None:
            continue
        if not served_normally(o, slo_s, time_scale) or (not parts and o.front == "probe"):
            continue
        key = (o.instance or "") if parts else ""
        if parts and key not in parts:
            continue
        if key not in first or o.end_s < (first[key].end_s or 0.0):
            first[key] = o
    needed = list(parts) if parts else [""]
    if any(p not in first for p in needed):
        return None
    ends = [first[p].end_s or 0.0 for p in needed]
    return Recovery(max(ends) - run.start_s, tuple(sorted({first[p].front for p in needed})))


def phase_of(t_s: float, first_start_s: float | None, last_end_s: float | None) -> str:
    if first_start_s is None or t_s < first_start_s:
        return "before"
    if last_end_s is None or t_s <= last_end_s:
        return "during"
    return "after"


@dataclass(frozen=True)
class Accounting:
    sent: int
    refused: int
    accepted: int
    completed: int
    cancelled: int
    orphaned: int
    lost: int
    waiting: int
    errors_by_kind: Mapping[str, int]
    error_samples: Mapping[str, str]  # kind -> the front, status and message of one
    bad_inputs: int
    bad_inputs_refused_ok: int
    bad_input_misanswers: tuple[str, ...]  # what a wrongly answered bad input got
    lost_samples: tuple[str, ...]
    waiting_samples: tuple[str, ...]
    per_front: Mapping[str, Mapping[str, int]]
    ttft_p99_sim_s: Mapping[str, Mapping[str, float | None]]  # class -> phase -> p99
    ttft_n: Mapping[str, Mapping[str, int]]
    # Completed Triton-front requests by the instance that served them and phase (qlm-openai's
    # streams do not name their instance): where the load went before, during, after the faults.
    per_instance: Mapping[str, Mapping[str, int]]

    def as_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in vars(self).items()}


def account(
    seen: Sequence[Observed],
    runs: Sequence[FaultRun],
    classes: Sequence[str],
    time_scale: float,
    slo_s: Mapping[str, float] | None = None,
) -> Accounting:
    """`slo_s`: each class's TTFT SLO (s, unscaled); without it nothing counts as *waiting*."""
    kills = [r.start_s for r in runs if r.fault.kind == "router-crash" and r.error is None]
    first = min((r.start_s for r in runs), default=None)
    last = max((r.end_s for r in runs), default=None)
    good = [o for o in seen if o.bad_field is None]
    bad = [o for o in seen if o.bad_field is not None]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    refused = completed = cancelled = orphans = lost = waiting = 0
    lost_samples: list[str] = []
    waiting_samples: list[str] = []
    per_front: dict[str, dict[str, int]] = {f: {} for f in FRONTS}
    ttft: dict[str, dict[str, list[float]]] = {c: {p: [] for p in PHASES} for c in classes}
    per_instance: dict[str, dict[str, int]] = {}
    for o in good:
        if orphaned(o, kills):
            verdict = "orphaned"
            orphans += 1
        elif o.outcome == "completed":
            verdict = "completed"
            completed += 1
            phase = phase_of(o.sent_s, first, last)
            if o.ttft_s is not None and o.slo_class in ttft:
                ttft[o.slo_class][phase].append(o.ttft_s / time_scale)
            if o.instance:
                row = per_instance.setdefault(o.instance, dict.fromkeys(PHASES, 0))
                row[phase] += 1
        elif o.outcome == "cancelled":
            verdict = "cancelled"
            cancelled += 1
        elif o.outcome == "lost" and within_slo(o, slo_s, time_scale):
            verdict = "waiting"
            waiting += 1
            if len(waiting_samples) < 10:
                waiting_samples.append(
                    f"{o.rid} {o.front} {o.slo_class} sent at {o.sent_s:.1f} s: {o.error}"
                )
        elif o.outcome == "lost":
            verdict = "lost"
            lost += 1
            if len(lost_samples) < 10:
                lost_samples.append(f"{o.rid} {o.front} sent at {o.sent_s:.1f} s: {o.error}")
        else:
            verdict = kind = o.kind or "other"
            errors[kind] = errors.get(kind, 0) + 1
            samples.setdefault(kind, f"{o.front} {o.status}: {(o.error or '')[:200]}")
            refused += kind in REFUSALS and o.tokens == 0
        per_front[o.front][verdict] = per_front[o.front].get(verdict, 0) + 1
    misanswers = tuple(
        f"{o.front} {o.bad_field}: {o.outcome} {o.status}: {(o.error or '')[:120]}"
        for o in bad
        if not bad_input_ok(o)
    )
    return Accounting(
        sent=len(good),
        refused=refused,
        accepted=len(good) - refused,
        completed=completed,
        cancelled=cancelled,
        orphaned=orphans,
        lost=lost,
        waiting=waiting,
        errors_by_kind=dict(sorted(errors.items())),
        error_samples=samples,
        bad_inputs=len(bad),
        bad_inputs_refused_ok=len(bad) - len(misanswers),
        bad_input_misanswers=misanswers,
        lost_samples=tuple(lost_samples),
        waiting_samples=tuple(waiting_samples),
        per_front=per_front,
        ttft_p99_sim_s={c: {p: percentile(xs, 99) for p, xs in d.items()} for c, d in ttft.items()},
        ttft_n={c: {p: len(xs) for p, xs in d.items()} for c, d in ttft.items()},
        per_instance=dict(sorted(per_instance.items())),
    )
