"""Many concurrent requests from one asyncio task: interactive ones behind a batch burst.

    python clients/example_asyncio.py [--url 127.0.0.1:8001] [--protocol grpc|http]

With QLM the interactive requests' TTFT stays short although the batch burst arrived first: the
router serves them first (and evicts batch work when a deadline is at risk).
"""

from __future__ import annotations

import argparse
import asyncio

from qlm_backend.client import AsyncGrpcClient, AsyncHttpClient, Request


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    a = p.parse_args()
    client = (
        AsyncGrpcClient(a.url or "127.0.0.1:8001")
        if a.protocol == "grpc"
        else AsyncHttpClient(a.url or "127.0.0.1:8000")
    )
    batch = [
        Request(f"report {i}", model="mistral-7b", slo_class="batch-2", max_tokens=64,
                ignore_eos=True)
        for i in range(24)
    ]  # fmt: skip
    burst = [asyncio.create_task(client.generate(r)) for r in batch]
    await asyncio.sleep(0.5)  # the burst is queued
    chat = [Request(f"question {i}", model="mistral-7b", slo_class="interactive", max_tokens=8)
            for i in range(3)]  # fmt: skip
    for r in await asyncio.gather(*(client.generate(q) for q in chat)):
        print("interactive:", r.summary())
    results = await asyncio.gather(*burst)
    done = [r for r in results if r.ok]
    print(f"batch: {len(done)}/{len(results)} completed, TTFT p50 "
          f"{sorted(r.ttft_s or 0 for r in done)[len(done) // 2]:.2f} s")  # fmt: skip
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
