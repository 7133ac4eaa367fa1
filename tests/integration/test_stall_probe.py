"""What the router's stall probe relies on, on a real tritonserver 2.51 (router/stall_watch.py): a
one-token request to an engine whose stub was SIGKILLed is refused as gone ("Stub process ... is
not healthy") within the probe's wait, while a live engine takes it; and after an unload and a
load the engine serves again. The streams open at the kill may never end (docs/triton-vllm-facts.md
section 8), which is why the router cannot wait for them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, QUICK_EXIT

from qlm_backend.router.dispatch import EngineServer
from qlm_backend.router.stall_watch import probe_engine
from qlm_backend.triton.repository import write_sim_engine
from qlm_backend.triton.server import TritonServer, admin_headers

pytestmark = pytest.mark.timeout(120)

ENGINE = "mistral-7b__stall-0"
PROBE_WAIT_S = 3.0  # the driver's default probe_s


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server of our own: a killed stub leaks its model until the server exits."""
    base = tmp_path_factory.mktemp("stall")
    repo = base / "repo"
    repo.mkdir()
    write_sim_engine(repo, "mistral-7b", "stall-0", {"gpu": "A10"})
    server = TritonServer(
        repo, load_models=[ENGINE], log_path=base / "server.log", admin_key=ADMIN_KEY,
        extra_args=QUICK_EXIT,
    )  # fmt: skip
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()
        assert server.descendants() == []


def stub_pid(server: TritonServer, model: str) -> int:
    found = []
    for pid in server.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{model}/" in cmdline and "stub" in cmdline:
            found.append(pid)
    assert len(found) == 1, f"stub of {model}: {found}"
    return found[0]


async def probe(server: EngineServer, rid: str) -> tuple[bool, str, float]:
    """(gone, what happened, seconds): the driver's probe (stall_watch.probe_engine)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result, what = await probe_engine(server, ENGINE, rid, PROBE_WAIT_S)
    return result == "gone", what, loop.time() - t0


def test_a_killed_engine_stub_refuses_the_probe_at_once_and_serves_after_a_reload(
    own: TritonServer,
) -> None:
    async def main() -> None:
        server = EngineServer(own.grpc_url, admin_headers(ADMIN_KEY), ADMIN_KEY)
        try:
            gone, what, _ = await probe(server, "probe-live")
            assert not gone and what == "answered", what
            long = {
                "text_input": "a long answer",
                "stream": True,
                "sampling_parameters": json.dumps({"max_tokens": 4000, "ignore_eos": True}),
            }
            work = server.stream(ENGINE, long, "long-1")
            chunks = work.chunks()
            await asyncio.wait_for(anext(chunks), timeout=30)
            os.kill(stub_pid(own, ENGINE), signal.SIGKILL)
            gone, what, took_s = await probe(server, "probe-dead")
            assert gone and "is not healthy" in what, what
            assert took_s < PROBE_WAIT_S
            work.cancel()
            # The recovery the router then runs (stream_driver._recover for a dead stub).
            await server.unload(ENGINE)
            await server.load(ENGINE)
            gone, what, _ = await probe(server, "probe-reloaded")
            assert not gone and what == "answered", what
        finally:
            await server.close()

    asyncio.run(main())
