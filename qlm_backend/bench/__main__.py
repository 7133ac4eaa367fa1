"""`qlm-bench <name> [args]`: one entry point for every benchmark; each prints figures and writes JSON."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "planner": "qlm_backend.bench.planner",  # plan time vs queued requests and instances
    "fidelity": "qlm_backend.bench.fidelity",  # simulated engine vs real vLLM on CPU
    "calibrate": "qlm_backend.bench.calibrate",  # fit the CPU profile on the real engine
    "router": "qlm_backend.bench.router",  # router overhead on a real Triton server
    "realtime": "qlm_backend.bench.realtime",  # qlm vs fcfs attainment, real time, real server
    "overload": "qlm_backend.bench.overload",  # 10x burst: completed / shed / lost per class
    "soak": "qlm_backend.bench.soak",  # long trace-shaped load: lost requests, TTFT over time, RSS
    "calibration": "qlm_backend.bench.calibration",  # estimator's error, with/without recalibration
    "cancel": "qlm_backend.bench.cancel",  # cancelled streams: where each cancel went, work wasted
    "chaos": "qlm_backend.bench.chaos",  # seeded faults under trace-shaped load: lost, recovery
    "openai": "qlm_backend.bench.openai_bench",  # vllm bench serve vs qlm-openai: qlm vs fcfs
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: qlm-bench {" + ",".join(BENCHES) + "} [args]\n")
        for bench_name, module in BENCHES.items():
            print(f"  {bench_name:11s} {module}")
        return 0 if args else 2
    name = args.pop(0)
    if name not in BENCHES:
        print(
            f"qlm-bench: unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr
        )
        return 2
    try:
        bench = importlib.import_module(BENCHES[name])
    except ModuleNotFoundError as e:
        print(
            f"qlm-bench: benchmark {name!r} is not available in this checkout ({e})",
            file=sys.stderr,
        )
        return 2
    return int(bench.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
