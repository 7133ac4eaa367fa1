"""`qlm-bench cancel` on a tiny run: its own server, 3 cancelled streams per case, two paths into
the router (gRPC, HTTP) and two phases (queued in the router, mid-stream).

A behaviour test, not a timing test: the report has its structure, every stream is accounted for
(cancelled, or ended with a final response or an explicit error), the router stopped the engine
stream of every cancel it saw on one (no router fault) and nothing was lost. Cancels a Triton
frontend lost are figures here (docs/reliability.md, known issues), not failures.
"""

from __future__ import annotations

import json

import pytest

from qlm_backend.bench import cancel

pytestmark = pytest.mark.timeout(180)

PATHS = ("qlm-grpc", "qlm-http")
PHASES = ("queued", "mid")
N = 3


def test_a_tiny_cancel_run_finds_no_router_fault(tmp_path, capsys):
    out = tmp_path / "cancel.json"
    rc = cancel.main(
        ["--n", str(N), "--wave", "3", "--paths", ",".join(PATHS), "--phases", ",".join(PHASES)]
        # Fillers shorter than the default: the queued wave ends sooner.
        + ["--filler-tokens", "48", "--out", str(out), "--workdir", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["bench"] == "cancel" and rep["server_crash"] is None
    cases = {(c["path"], c["phase"]): c for c in rep["cases"]}
    assert set(cases) == {(p, ph) for p in PATHS for ph in PHASES}
    for (path, phase), c in cases.items():
        where = f"{path}/{phase}: {c}"
        assert c["sent"] == N, where
        assert c["cancelled"] + c["completed_early"] + c["errors"] == N, where
        assert c["router_faults"] == [], where
        assert c["lost"] == 0, where
        assert c["unsettled_waves"] == 0, where
        # Each cancel the router saw is accounted for once, and each hop's losses add up.
        assert c["router_saw"] + c["lost_client_to_server"] == c["cancelled"], where
        assert c["router_stopped"] <= c["router_saw"], where
        assert c["engine_aborted"] + c["lost_router_to_engine"] == c["router_stopped"], where
        if phase == "mid":
            assert c["router_stopped"] == c["router_saw"], where  # every one was on a stream
    assert rep["totals"]["router_faults"] == 0 and rep["totals"]["lost_requests"] == 0
    assert rc == 0, printed
    # The table: a header and one row per case, in the order run.
    rows = [line.split() for line in printed.splitlines() if line.startswith(("path", "qlm-"))]
    assert rows[0][:3] == ["path", "phase", "cancelled"]
    assert [tuple(r[:2]) for r in rows[1:]] == [(p, ph) for p in PATHS for ph in PHASES]
