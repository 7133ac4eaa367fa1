"""A cold swap on a real engine loads the incoming model only once the outgoing one is fully
unloaded (issue 16): Triton 2.51's unload returns when the unload begins, and a GPU engine holds its
memory until its process has stopped. `EngineServer.wait_unloaded` reads the repository index (a
restricted API: the router's admin key) until the model is neither READY nor UNLOADING."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ADMIN_KEY

from qlm_backend.router.dispatch import EngineServer
from qlm_backend.router.stream_driver import EngineError
from qlm_backend.triton.repository import write_sim_engine
from qlm_backend.triton.server import TritonServer, admin_headers

pytestmark = pytest.mark.timeout(60)

ENGINE = "mistral-7b__unload-0"


def test_wait_unloaded_returns_once_the_engine_is_gone_and_names_a_model_still_loaded(
    triton: TritonServer,
) -> None:
    write_sim_engine(triton.model_repository, "mistral-7b", "unload-0", {"gpu": "A10"})

    async def main() -> None:
        server = EngineServer(triton.grpc_url, admin_headers(ADMIN_KEY), ADMIN_KEY)
        try:
            await server.load(ENGINE)
            assert await server.is_ready(ENGINE)
            # Still loaded: the wait runs out and says in which state the model is.
            with pytest.raises(EngineError, match=r"still \['READY'\]"):
                await server.wait_unloaded(ENGINE, timeout_s=0.3)
            await server.unload(ENGINE)
            waited_s = await server.wait_unloaded(ENGINE, timeout_s=30.0)
            assert waited_s >= 0.0
            index = await server.client.get_model_repository_index(
                headers=admin_headers(ADMIN_KEY), as_json=True
            )
            states = {m.get("state") for m in index["models"] if m["name"] == ENGINE}
            assert states == {"UNAVAILABLE"}
            assert not await server.is_ready(ENGINE)
        finally:
            await server.close()

    asyncio.run(main())
