"""Scenarios: a fleet, its models and SLO classes, and how trace requests become workload requests.

A scenario is one JSON file (the shipped ones are `scenarios/wa.json` ... `wd2.json`)::

    {
      "name": "wa",
      "description": "free text",
      "fleet": {...},                      # the core's fleet format (instances, slo_classes, ...)
      "models": {"vicuna-13b": 1.0},       # share of trace requests per model (seeded draw)
      "classes": {"interactive": 0.5, "batch-1": 0.3, "batch-2": 0.2},   # share per SLO class
      "model_classes": {"llama-3-70b": {"batch-2": 1.0}},   # optional per-model override
      "class_run_mean": 1.0,               # optional: mean run length of one class (1 = i.i.d.)
      "max_tokens": 1024,                  # max_tokens the clients send (true output <= it)
      "mega_prompts": {"share": 0.05, "min_tokens": 6000, "max_tokens": 7600},   # optional
      "trace_window": {"max_requests": 2000, "duration_s": null},                # optional
      "max_model_len": {"llama-3-8b": 32768},   # optional: the context a model is served with
      "trace": "../../data/traces/generated_wd.csv"   # optional: default trace, relative to the file
    }

Every request of the trace gets a model and a class from a generator seeded with `--seed`, so all
policies see the identical workload; rows of a generic CSV trace that name a model or class keep it.
`class_run_mean` > 1 draws classes as runs (a batch job submits a block of requests at once; with
the trace's own burstiness this is the head-of-line blocking of the paper). Prompt and output are
clipped to the model's context window (output to at most half of it) and output to `max_tokens`.

`max_model_len` is the context the deployment serves a model with (vLLM's `max_model_len`) where it
is not the model table's (engine/hardware.py): the table holds one context per architecture, while
the same shapes ship with longer windows (Llama-3.1-8B is Llama-3-8B's shape with 128k positions).
`trace` names the trace the scenario was made for (a generated one, say); `--trace` overrides it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.core.fleet import FleetConfig, parse_fleet
from qlm_backend.engine import hardware as hw
from qlm_backend.eval.traces import Trace

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
SHIPPED = ("wa", "wb", "wc", "wd", "wd2")

_TOP_KEYS = {
    "name",
    "description",
    "fleet",
    "models",
    "classes",
    "model_classes",
    "class_run_mean",
    "max_tokens",
    "mega_prompts",
    "trace_window",
    "max_model_len",
    "trace",
}
_MEGA_KEYS = {"share", "min_tokens", "max_tokens"}
_WINDOW_KEYS = {"max_requests", "duration_s"}


@dataclass(frozen=True)
class MegaPrompts:
    share: float
    min_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    fleet: FleetConfig
    fleet_raw: Mapping[str, Any]
    model_shares: Mapping[str, float]
    class_shares: Mapping[str, float]
    model_class_shares: Mapping[str, Mapping[str, float]]
    class_run_mean: float
    max_tokens: int
    mega: MegaPrompts | None
    window_max_requests: int | None
    window_duration_s: float | None
    source: str
    max_model_len: Mapping[str, int] = field(default_factory=dict)
    trace_path: Path | None = None  # the scenario's own trace, if it names one
    content_sha256: str = ""  # of the scenario's JSON content, canonical (key order, spacing)

    def context_tokens(self, model: str) -> int:
        return self.max_model_len.get(model) or hw.get_model(model).max_context_tokens


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    arrival_s: float
    model: str
    slo_class: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int  # the true output length (the engine produces exactly this many)
    mega: bool = False


class ScenarioError(ValueError):
    pass


def _fail(src: str, key: str, msg: str) -> ScenarioError:
    return ScenarioError(f"scenario {src}: key {key!r}: {msg}")


def _shares(src: str, key: str, d: Any, known: set[str], what: str) -> dict[str, float]:
    if not isinstance(d, Mapping) or not d:
        raise _fail(src, key, f"expected a non-empty object of {what} -> share")
    out: dict[str, float] = {}
    for name, v in d.items():
        if name not in known:
            raise _fail(src, f"{key}.{name}", f"unknown {what}; known: {', '.join(sorted(known))}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise _fail(src, f"{key}.{name}", f"expected a share >= 0, got {v!r}")
        out[str(name)] = float(v)
    if sum(out.values()) <= 0:
        raise _fail(src, key, "shares sum to 0")
    return out


def parse_scenario(
    data: Mapping[str, Any], source: str = "<dict>", base_dir: Path | None = None
) -> Scenario:
    """Validate a scenario dict; every error names the offending key. A relative `trace` is
    resolved against `base_dir` (the scenario file's folder; the working directory if None)."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"scenario {source}: expected a JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; known: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "fleet", "models", "classes"):
        if key not in data:
            raise _fail(source, key, "missing")
    try:
        fleet = parse_fleet(data["fleet"])
    except ValueError as e:
        raise _fail(source, "fleet", str(e)) from None
    served = set(fleet.models)
    models = _shares(source, "models", data["models"], served, "model served by the fleet")
    class_names = {c.name for c in fleet.slo_classes}
    classes = _shares(source, "classes", data["classes"], class_names, "slo class")
    mc_raw = data.get("model_classes", {})
    if not isinstance(mc_raw, Mapping):
        raise _fail(source, "model_classes", "expected an object model -> {class: share}")
    model_classes = {}
    for m, d in mc_raw.items():
        if m not in models:
            raise _fail(source, f"model_classes.{m}", "not a model of 'models'")
        model_classes[str(m)] = _shares(source, f"model_classes.{m}", d, class_names, "slo class")
    run = data.get("class_run_mean", 1.0)
    if isinstance(run, bool) or not isinstance(run, int | float) or run < 1:
        raise _fail(source, "class_run_mean", f"expected a number >= 1, got {run!r}")
    max_tokens = data.get("max_tokens", 1024)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _fail(source, "max_tokens", f"expected an integer >= 1, got {max_tokens!r}")
    mega = None
    if data.get("mega_prompts") is not None:
        mp = data["mega_prompts"]
        if not isinstance(mp, Mapping):
            raise _fail(source, "mega_prompts", "expected an object")
        bad = sorted(set(mp) - _MEGA_KEYS)
        if bad:
            raise _fail(
                source, f"mega_prompts.{bad[0]}", f"unknown key; known: {sorted(_MEGA_KEYS)}"
            )
        share = mp.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise _fail(source, "mega_prompts.share", f"expected a number in [0, 1], got {share!r}")
        lo, hi = mp.get("min_tokens"), mp.get("max_tokens")
        for k, v in (("min_tokens", lo), ("max_tokens", hi)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(source, f"mega_prompts.{k}", f"expected an integer >= 1, got {v!r}")
        assert isinstance(lo, int) and isinstance(hi, int)
        if lo > hi:
            raise _fail(source, "mega_prompts.min_tokens", "greater than max_tokens")
        mega = MegaPrompts(float(share), lo, hi)
    win = data.get("trace_window", {}) or {}
    if not isinstance(win, Mapping):
        raise _fail(source, "trace_window", "expected an object")
    bad = sorted(set(win) - _WINDOW_KEYS)
    if bad:
        raise _fail(source, f"trace_window.{bad[0]}", f"unknown key; known: {sorted(_WINDOW_KEYS)}")
    wmax = win.get("max_requests")
    if wmax is not None and (isinstance(wmax, bool) or not isinstance(wmax, int) or wmax < 1):
        raise _fail(source, "trace_window.max_requests", f"expected an integer >= 1, got {wmax!r}")
    wdur = win.get("duration_s")
    if wdur is not None and (
        isinstance(wdur, bool) or not isinstance(wdur, int | float) or wdur <= 0
    ):
        raise _fail(source, "trace_window.duration_s", f"expected a number > 0, got {wdur!r}")
    mml_raw = data.get("max_model_len", {}) or {}
    if not isinstance(mml_raw, Mapping):
        raise _fail(source, "max_model_len", "expected an object model -> context tokens")
    max_model_len: dict[str, int] = {}
    for m, v in mml_raw.items():
        if m not in served:
            raise _fail(source, f"max_model_len.{m}", "not a model served by the fleet")
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise _fail(source, f"max_model_len.{m}", f"expected an integer >= 2, got {v!r}")
        max_model_len[str(m)] = v
    trace_path = None
    if data.get("trace") is not None:
        t = data["trace"]
        if not isinstance(t, str) or not t.strip():
            raise _fail(source, "trace", f"expected a file path, got {t!r}")
        trace_path = Path(t) if Path(t).is_absolute() else (base_dir or Path.cwd()) / t
        if not trace_path.is_file():
            raise _fail(source, "trace", f"no such file: {trace_path}")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return Scenario(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        fleet=fleet,
        fleet_raw=data["fleet"],
        model_shares=models,
        class_shares=classes,
        model_class_shares=model_classes,
        class_run_mean=float(run),
        max_tokens=max_tokens,
        mega=mega,
        window_max_requests=wmax,
        window_duration_s=float(wdur) if wdur is not None else None,
        source=source,
        max_model_len=max_model_len,
        trace_path=trace_path.resolve() if trace_path is not None else None,
        content_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
    )


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name (see SHIPPED) or a JSON file path."""
    p = SCENARIOS_DIR / f"{name_or_path}.json" if name_or_path in SHIPPED else Path(name_or_path)
    if not p.is_file():
        raise ScenarioError(
            f"scenario {name_or_path!r}: not a shipped scenario ({', '.join(SHIPPED)}) "
            "nor a JSON file"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ScenarioError(f"scenario {p}: invalid JSON: {e}") from None
    return parse_scenario(data, str(p), p.resolve().parent)


def _pick(rng: random.Random, shares: Mapping[str, float]) -> str:
    names = list(shares)
    return rng.choices(names, weights=[shares[n] for n in names])[0]


def build_workload(sc: Scenario, trace: Trace, seed: int) -> list[WorkloadRequest]:
    """Assign a model and class to every trace request (seeded), add mega prompts, clip to fit."""
    rng = random.Random(f"{sc.name}/{seed}")
    out: list[WorkloadRequest] = []
    cls_prev: dict[str, str] = {}
    switch_p = 1.0 / sc.class_run_mean
    for k, r in enumerate(trace.records):
        model = r.model or _pick(rng, sc.model_shares)
        if model not in sc.fleet.models:
            raise ScenarioError(
                f"{trace.path}: request {k} names model {model!r}, not served by scenario "
                f"{sc.name} ({', '.join(sc.fleet.models)})"
            )
        shares = sc.model_class_shares.get(model, sc.class_shares)
        if r.slo_class is not None:
            cls = r.slo_class
        elif model in cls_prev and rng.random() >= switch_p:
            cls = cls_prev[model]  # the run of this class goes on
        else:
            cls = _pick(rng, shares)
        cls_prev[model] = cls
        prompt, is_mega = r.input_tokens, False
        if sc.mega is not None and rng.random() < sc.mega.share:
            prompt, is_mega = rng.randint(sc.mega.min_tokens, sc.mega.max_tokens), True
        ctx = sc.context_tokens(model)
        output = max(1, min(r.output_tokens, sc.max_tokens, ctx // 2))
        prompt = max(1, min(prompt, ctx - output))
        max_tokens = max(output, min(sc.max_tokens, ctx - prompt))
        out.append(
            WorkloadRequest(
                f"r{k:06d}", r.arrival_s, model, cls, prompt, max_tokens, output, is_mega
            )
        )
    known = {c.name for c in sc.fleet.slo_classes}
    for w in out:
        if w.slo_class not in known:
            raise ScenarioError(
                f"{trace.path}: slo_class {w.slo_class!r} not in scenario {sc.name} "
                f"({', '.join(sorted(known))})"
            )
    return out


__all__ = [
    "SCENARIOS_DIR",
    "SHIPPED",
    "MegaPrompts",
    "Scenario",
    "ScenarioError",
    "WorkloadRequest",
    "build_workload",
    "load_scenario",
    "parse_scenario",
]
