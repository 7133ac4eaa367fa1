"""Expected order of first tokens per policy on a tiny hand-made workload.

One Mistral-7B instance on an A100 whose engine runs ONE sequence at a time (max_num_seqs=1) and
whose router bound is one in flight, so every policy's ordering shows directly:

    t=0.00  b0  batch-2 (SLO 3600 s), 4,000 output tokens: ~37 s alone on the GPU
    t=0.01  b1  batch-2
    t=0.02  m   batch-1 (SLO 60 s)
    t=0.03  i   interactive (SLO 20 s)

b0 arrives to an idle GPU and starts at once under every policy. What differs is who comes next
and whether b0 may be interrupted:
- fcfs: vLLM alone. Everything is pushed into the engine at once; its FCFS queue gives b1, m, i
  after b0 finishes, so i waits ~37 s and misses its 20 s SLO.
- priority: vLLM priority scheduling; the engine queue orders by class priority: i, m, b1 after b0
  (no preemption: the engine has KV room, vLLM preempts by priority only on KV shortage).
- edf: the router orders by deadline: i (t+20), m (t+60), b1 (t+3600), but only after b0 ends: i
  still misses.
- flow-control: the router holds the queue (the engine is at its in-flight bound, saturated) and
  dispatches by band: i, m, b1, after b0 ends; no preemption, so i misses.
- qlm / qlm-true-lengths: same deadline order, and the planner sees that i cannot meet its deadline behind b0
  and evicts b0 (already past its first token, lower class): i gets its token within its SLO; b0
  resumes by recompute as with vLLM v1, and finds its prompt in the engine's prefix cache (nothing
  else was big enough to overwrite it).
- shepherd: preemptive; evicts b0 for i as well.

Every policy gets the same estimator state: output-length priors as if the classes' lengths had
been learnt (batch-2 ~4,000 tokens, the others ~50). Without them QLM's estimator assumes the
default 256-token prior and, for a request past its mean, a quarter of the mean still to go, so it
never sees that b0 will hold the GPU for 37 s and does not evict (reported to the core owner).
"""

from __future__ import annotations

import pytest

from qlm_backend.core.config import ManagerConfig, OutputPrior
from qlm_backend.core.fleet import parse_fleet
from qlm_backend.eval.scenario import WorkloadRequest
from qlm_backend.eval.simulator import SimSettings, simulate

FLEET = parse_fleet(
    {
        "instances": [
            {
                "instance_id": "gpu0",
                "gpu": "A100-80G",
                "models_allowed": ["mistral-7b"],
                "initial_model": "mistral-7b",
                "max_in_flight": 1,
            }
        ]
    }
)


def w(rid: str, t: float, cls: str, out: int) -> WorkloadRequest:
    return WorkloadRequest(rid, t, "mistral-7b", cls, 200, 4096, out)


WORKLOAD = [
    w("b0", 0.00, "batch-2", 4000),
    w("b1", 0.01, "batch-2", 50),
    w("m", 0.02, "batch-1", 50),
    w("i", 0.03, "interactive", 50),
]

LEARNT = ManagerConfig(
    priors={
        ("mistral-7b", "batch-2"): OutputPrior(4000, 100),
        ("mistral-7b", "batch-1"): OutputPrior(50, 10),
        ("mistral-7b", "interactive"): OutputPrior(50, 10),
    }
)

EXPECTED = {
    "fcfs": (["b0", "b1", "m", "i"], False),
    "priority": (["b0", "i", "m", "b1"], False),
    "edf": (["b0", "i", "m", "b1"], False),
    "qlm": (["b0", "i", "m", "b1"], True),
    "qlm-true-lengths": (["b0", "i", "m", "b1"], True),
    "flow-control": (["b0", "i", "m", "b1"], False),
    "shepherd": (["b0", "i", "m", "b1"], True),
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_first_token_order(policy: str) -> None:
    res = simulate(
        FLEET, WORKLOAD, SimSettings(policy, manager_config=LEARNT, engine_max_num_seqs=1)
    )
    recs = {r.req.request_id: r for r in res.records}
    assert all(r.outcome == "finished" for r in recs.values())
    order = sorted(recs, key=lambda k: recs[k].first_token_s or float("inf"))
    want, i_meets = EXPECTED[policy]
    assert order == want
    ri = recs["i"]
    assert ri.first_token_s is not None
    assert (ri.first_token_s <= ri.deadline_s) is i_meets
    # Whoever is evicted resumes and still produces exactly its tokens.
    assert all(r.tokens == r.req.output_tokens for r in recs.values())
    if i_meets:
        assert recs["b0"].evictions == 1
        assert res.counters.get("resume_recompute") == 1
        # b0's blocks were still cached when it came back (i and m needed far fewer than freed).
        assert res.counters.get("resume_cached_tokens", 0) > 0
    else:
        assert recs["b0"].evictions == 0
