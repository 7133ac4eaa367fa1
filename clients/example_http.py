"""One request over Triton's HTTP generate_stream (server-sent events) with the package client.

    python clients/example_http.py [--url 127.0.0.1:8000]

The same as curl:
    curl -N 127.0.0.1:8000/v2/models/qlm/generate_stream \
         -d '{"text_input": "hi", "stream": true, "model": "mistral-7b", "slo_class": "batch-1", "max_tokens": 8}'
"""

from __future__ import annotations

import argparse

from qlm_backend.client import HttpClient, Request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="127.0.0.1:8000")
    a = p.parse_args()
    client = HttpClient(a.url)
    # Streaming: tokens printed as they arrive.
    r = client.generate(
        Request("hi", model="mistral-7b", slo_class="batch-1", max_tokens=8),
        on_text=lambda t: print(t, end="", flush=True),
    )
    print("\n" + r.summary())
    # Non-streaming: one response at the end, the prompt prepended (vllm_backend's default).
    r = client.generate(Request("Once", model="llama-2-13b", max_tokens=8, stream=False))
    print(r.text)
    print(r.summary())
    # An error is a result too: here an unknown SLO class, refused at once (HTTP 400).
    r = client.generate(Request("hi", model="mistral-7b", slo_class="vip"))
    print(r.outcome, r.status, r.error)


if __name__ == "__main__":
    main()
