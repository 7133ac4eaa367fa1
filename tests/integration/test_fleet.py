"""A fleet across three real tritonservers: one router server and two engine servers of different
simulated GPU types. The router dispatches over gRPC to remote engines and treats a server that goes
away as failed instances: their requests complete elsewhere or get an explicit error."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import pytest
import tritonclient.grpc.aio as grpcaio
from conftest import QUICK_EXIT
from streams import TimedStream, timed_stream

from qlm_backend.triton.repository import engine_model_name, write_router, write_sim_engine
from qlm_backend.triton.server import TritonServer

pytestmark = pytest.mark.timeout(240)
TIME_SCALE = 0.1
SERVERS = {
    "e1": [("e1-a10-0", "A10", ["mistral-7b"]), ("e1-a10-1", "A10", ["mistral-7b"])],
    "e2": [("e2-a100-0", "A100-80G", ["mistral-7b", "llama-2-13b"])],
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TritonServer]]:
    base = tmp_path_factory.mktemp("fleet")
    servers: dict[str, TritonServer] = {}
    instances, instance_servers = [], {}
    for name, insts in SERVERS.items():
        repo = base / name
        loads = []
        for iid, gpu, models in insts:
            for m in models:
                write_sim_engine(
                    repo, m, iid, {"gpu": gpu, "time_scale": TIME_SCALE, "max_num_seqs": 8}
                )
            loads.append(engine_model_name(models[0], iid))
            instances.append(
                {
                    "instance_id": iid,
                    "gpu": gpu,
                    "models_allowed": models,
                    "initial_model": models[0],
                    "max_in_flight": 8,
                }
            )
        # A short exit timeout: the router's server holds streams to the engine server a test
        # stopped, and Triton's default 30 s wait for them only slows the teardown.
        servers[name] = TritonServer(
            repo, load_models=loads, log_path=base / f"{name}.log", extra_args=QUICK_EXIT
        )
        for iid, _, _ in insts:
            instance_servers[iid] = f"grpc://{servers[name].grpc_url}"
    router_repo = base / "router"
    router_repo.mkdir()
    (router_repo / "fleet.json").write_text(json.dumps({"instances": instances}))
    write_router(
        router_repo,
        {"policy": "qlm", "time_scale": TIME_SCALE, "instance_servers": instance_servers},
    )
    servers["router"] = TritonServer(
        router_repo, load_models=["qlm"], log_path=base / "router.log", extra_args=QUICK_EXIT
    )
    try:
        for s in servers.values():
            s.start(timeout_s=90)
        yield servers
    finally:
        for s in servers.values():
            s.stop()
            assert s.descendants() == []


def fields(model: str, max_tokens: int, cls: str = "batch-1", i: int = 0) -> dict:
    return {
        "text_input": f"request {i}",
        "model": model,
        "slo_class": cls,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
    }


async def run_load(url: str, n: int, max_tokens: int, during=None) -> list[TimedStream]:
    client = grpcaio.InferenceServerClient(url)
    streams = [TimedStream() for _ in range(n)]
    tasks = [
        asyncio.create_task(timed_stream(client, "qlm", fields("mistral-7b", max_tokens, i=i), s))
        for i, s in enumerate(streams)
    ]
    if during is not None:
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, during)
    await asyncio.gather(*tasks)
    await client.close()
    return streams


def test_load_through_the_router_is_spread_over_both_engine_servers(fleet):
    streams = asyncio.run(run_load(fleet["router"].grpc_url, 24, 40))
    assert all(s.error is None and s.tokens == 40 for s in streams), [
        s.error for s in streams if s.error
    ]
    used = Counter(s.final["qlm_instance"].reshape(-1)[0].decode() for s in streams)
    print(f"\nrequests per instance: {dict(used)}")
    assert any(i.startswith("e1-") for i in used) and any(i.startswith("e2-") for i in used)


def test_stopping_an_engine_server_mid_load_loses_no_request(fleet):
    streams = asyncio.run(run_load(fleet["router"].grpc_url, 24, 60, during=fleet["e1"].stop))
    completed = [s for s in streams if s.error is None]
    errored = [s for s in streams if s.error is not None]
    # Nothing lost: each request completed (with exactly its tokens) or got an explicit error.
    assert all(s.tokens == 60 and s.done_s is not None for s in completed)
    assert all(s.error for s in errored)
    print(f"\nafter stopping e1: {len(completed)} completed, {len(errored)} explicit errors")
    assert len(completed) >= 20
    # The router keeps serving on what is left.
    again = asyncio.run(run_load(fleet["router"].grpc_url, 4, 5))
    assert all(s.error is None and s.tokens == 5 for s in again)
    assert {s.final["qlm_instance"].reshape(-1)[0].decode() for s in again} == {"e2-a100-0"}
