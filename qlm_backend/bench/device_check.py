"""The device check (`scripts/device-check.sh`): what a GPU really does, beside the step model.

Run on a machine with an NVIDIA GPU and PyTorch but no vLLM and no network (never by CI). In a few
minutes it measures, with random weights in bf16:
- the decode step of a Llama-7B-shaped layer stack (32 layers, hidden 4096, 32 heads, MLP 11008,
  vocab 32000) at batch 1 and 64 with 512 tokens of context per sequence;
- the prefill of one 2048-token prompt through the same stack;
- a host-to-device copy of 14 GB from pinned memory (the floor of a sleep-mode wake) and from a
  file on disk whose pages were dropped from the page cache (the floor of a cold load);
and prints each beside what `engine/perf.py`'s step model predicts for `llama-7b` on that GPU
(engine/hardware.py), with the ratio. JSON goes to `--out`.

What it leaves out, so its figures are floors of an engine's: no KV write per step (reads
dominate), no sampling, no CUDA graphs, no paged attention (one contiguous KV per layer, shared by
all layers: the bytes read per layer are a real step's). `--small --device cpu` runs the same code
on tiny shapes so that the path can be tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

LLAMA_7B = {"layers": 32, "hidden": 4096, "heads": 32, "intermediate": 11008, "vocab": 32000}
SMALL = {"layers": 2, "hidden": 256, "heads": 4, "intermediate": 688, "vocab": 1000}
GPU_NAMES = (("H200", "H200"), ("H100", "H100"), ("A100", "A100-80G"), ("L4", "L4"), ("A10", "A10"))
GB = 1e9


def gpu_key(device_name: str) -> str | None:
    """engine/hardware.py's GPU for a CUDA device name (None: not modelled)."""
    for needle, key in GPU_NAMES:
        if needle in device_name:
            return key
    return None


class Stack:
    """A decoder layer stack with random weights: the shapes and matmuls of the real model."""

    def __init__(self, torch: Any, dims: dict[str, int], device: str, dtype: Any) -> None:
        self.t, self.d = torch, dims
        h, f, n = dims["hidden"], dims["intermediate"], dims["layers"]

        def w(*shape: int) -> Any:
            return torch.randn(*shape, device=device, dtype=dtype) * 0.02

        self.qkv = [w(h, 3 * h) for _ in range(n)]
        self.o = [w(h, h) for _ in range(n)]
        self.gate_up = [w(h, 2 * f) for _ in range(n)]
        self.down = [w(f, h) for _ in range(n)]
        self.head = w(h, dims["vocab"])

    def _norm(self, x: Any) -> Any:
        return x * self.t.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def _layer(self, i: int, x: Any, kv: tuple[Any, Any] | None) -> Any:
        t, heads = self.t, self.d["heads"]
        b, s, h = x.shape
        q, k, v = (self._norm(x) @ self.qkv[i]).split(h, dim=-1)
        q = q.view(b, s, heads, -1).transpose(1, 2)
        if kv is None:  # prefill: attend to itself, causally
            k = k.view(b, s, heads, -1).transpose(1, 2)
            v = v.view(b, s, heads, -1).transpose(1, 2)
            a = t.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decode: attend to the cached context
            a = t.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])
        x = x + a.transpose(1, 2).reshape(b, s, h) @ self.o[i]
        g, u = (self._norm(x) @ self.gate_up[i]).chunk(2, dim=-1)
        return x + (t.nn.functional.silu(g) * u) @ self.down[i]

    def decode(self, x: Any, kv: tuple[Any, Any]) -> Any:
        for i in range(self.d["layers"]):
            x = self._layer(i, x, kv)
        return self._norm(x) @ self.head

    def prefill(self, x: Any) -> Any:
        for i in range(self.d["layers"]):
            x = self._layer(i, x, None)
        return self._norm(x[:, -1:]) @ self.head


def timed_ms(torch: Any, fn: Any, device: str, warmup: int, repeat: int) -> float:
    """Median wall time of fn() in ms, the device synchronised around each call."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compute(
    torch: Any, dims: dict[str, int], device: str, dtype: Any, ctx: int
) -> dict[str, float]:
    """Decode at batch 1 and 64 over `ctx` tokens each, then one 2048-token prefill (ms)."""
    stack = Stack(torch, dims, device, dtype)
    heads, hd = dims["heads"], dims["hidden"] // dims["heads"]
    out: dict[str, float] = {}
    for batch in (1, 64):
        x = torch.randn(batch, 1, dims["hidden"], device=device, dtype=dtype)
        kv = (
            torch.randn(batch, heads, ctx, hd, device=device, dtype=dtype),
            torch.randn(batch, heads, ctx, hd, device=device, dtype=dtype),
        )
        key = f"decode_b{batch}_ms"
        out[key] = timed_ms(torch, partial(stack.decode, x, kv), device, 3, 10)
        print(f"  decode batch {batch:2d}: {out[key]:.2f} ms", flush=True)
    prompt = torch.randn(1, 2048, dims["hidden"], device=device, dtype=dtype)
    out["prefill_2048_ms"] = timed_ms(torch, partial(stack.prefill, prompt), device, 1, 3)
    print(f"  prefill 2048 tokens: {out['prefill_2048_ms']:.1f} ms", flush=True)
    return out  # the weights go with this frame: the copies below get the device's memory


def copies(
    torch: Any, device: str, total_bytes: int, chunk_bytes: int, tmp: Path
) -> dict[str, Any]:
    """Host-to-device copies of `total_bytes`: from pinned memory, then from a file on disk."""
    pin = device == "cuda"
    n = max(1, total_bytes // chunk_bytes)
    host = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n)]
    for h in host:
        h.fill_(7)
    dev = [torch.empty(chunk_bytes, dtype=torch.uint8, device=device) for _ in range(n)]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for h, d in zip(host, dev, strict=True):
        d.copy_(h, non_blocking=pin)
    sync()
    pinned_s = time.perf_counter() - t0
    moved = n * chunk_bytes
    print(f"  pinned -> device: {moved / GB:.1f} GB in {pinned_s:.2f} s", flush=True)
    path = tmp / "device-check.bin"
    with open(path, "wb") as f:
        for h in host:
            f.write(memoryview(h.numpy()))
        f.flush()
        os.fsync(f.fileno())
        # Drop the file's pages so that the read below comes from the disk, as a cold load's.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    sync()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as src:
        for h, d in zip(host, dev, strict=True):
            src.readinto(memoryview(h.numpy()))
            d.copy_(h, non_blocking=pin)
    sync()
    disk_s = time.perf_counter() - t0
    path.unlink()
    print(f"  disk -> device: {moved / GB:.1f} GB in {disk_s:.2f} s", flush=True)
    return {
        "bytes": moved,
        "pinned_to_device_s": pinned_s,
        "pinned_to_device_gb_per_s": moved / pinned_s / GB,
        "disk_to_device_s": disk_s,
        "disk_to_device_gb_per_s": moved / disk_s / GB,
    }


def model_figures(gpu: str | None, copy_bytes: int) -> dict[str, float] | None:
    """What engine/perf.py predicts for llama-7b on `gpu` (None where the GPU is not modelled)."""
    if gpu is None:
        return None
    from qlm_backend.engine import hardware as hw
    from qlm_backend.engine.perf import PerfModel

    pm = PerfModel.from_names("llama-7b", gpu, 1)
    return {
        "decode_b1_ms": pm.decode_step_s(1, 512) * 1e3,
        "decode_b64_ms": pm.decode_step_s(64, 64 * 512) * 1e3,
        "prefill_2048_ms": pm.prefill_s(2048) * 1e3,
        "pinned_to_device_s": copy_bytes / pm.gpu.pcie_bytes_per_s,
        "disk_to_device_s": copy_bytes / hw.DISK_READ_BYTES_PER_S,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="device-check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/device-check.json"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--copy-gb", type=float, default=14.0, help="bytes copied to the device, GB")
    ap.add_argument("--small", action="store_true", help="tiny shapes and copies (a dry run)")
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("device-check: needs PyTorch", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            "device-check: no CUDA device (use --device cpu --small for a dry run)", file=sys.stderr
        )
        return 2
    t_start = time.monotonic()
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu"
    gpu = gpu_key(name) if a.device == "cuda" else None
    dims = SMALL if a.small else LLAMA_7B
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    copy_bytes = int((0.05 if a.small else a.copy_gb) * GB)
    print(f"device-check on {name} (model: {gpu or 'not modelled'})", flush=True)
    measured = compute(torch, dims, a.device, dtype, 64 if a.small else 512)
    if a.device == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(dir=a.out.parent if a.out.parent.exists() else None) as tmp:
        measured.update(copies(torch, a.device, copy_bytes, min(copy_bytes, 1 << 30), Path(tmp)))
    model = None if a.small else model_figures(gpu, int(measured["bytes"]))
    doc = {
        "check": "device",
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "engine_hardware_gpu": gpu,
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "shapes": "small" if a.small else "llama-7b",
        "measured": measured,
        "step_model": model,
        "wall_s": time.monotonic() - t_start,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    if model:
        print(f"{'figure':22s} {'measured':>12s} {'step model':>12s} {'ratio':>7s}")
        for key, pred in model.items():
            got = measured[key]
            print(f"{key:22s} {got:12.3f} {pred:12.3f} {got / pred:7.2f}")
    print(f"device-check: wrote {a.out} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
