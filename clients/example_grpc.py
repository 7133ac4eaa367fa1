"""Stream one request through QLM over gRPC with the package client (sync).

python clients/example_grpc.py [--url 127.0.0.1:8001]
"""

from __future__ import annotations

import argparse

from qlm_backend.client import GrpcClient, Request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="127.0.0.1:8001")
    a = p.parse_args()
    req = Request(
        "Tell me about queues",
        model="mistral-7b",  # the logical model; QLM picks the instance
        slo_class="interactive",  # or ttft_slo_s=5.0 for a deadline of your own
        max_tokens=16,
    )
    with GrpcClient(a.url) as client:
        gen = client.stream(req)
        for text in gen:  # tokens as they arrive
            print(text, end="", flush=True)
    r = gen.result
    assert r is not None
    print()
    if not r.ok:
        raise SystemExit(f"error ({r.status}): {r.error}")
    print(f"TTFT {r.ttft_s:.3f} s, total {r.total_s:.3f} s, {r.tokens} tokens, "
          f"waited {r.queue_s:.3f} s in QLM's queue, served by {r.instance}")  # fmt: skip


if __name__ == "__main__":
    main()
