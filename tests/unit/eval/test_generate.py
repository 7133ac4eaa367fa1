"""The trace generator: seeded, its figures on target, errors naming the option; wd and wd2."""

from __future__ import annotations

import copy
import json
import shlex
import statistics
from pathlib import Path

import pytest

from qlm_backend.eval import generate as gen
from qlm_backend.eval.cli import main
from qlm_backend.eval.scenario import (
    SCENARIOS_DIR,
    SHIPPED,
    ScenarioError,
    build_workload,
    load_scenario,
    parse_scenario,
)
from qlm_backend.eval.traces import TRACES_DIR, load_trace, window


def spec(n: int, seed: int = 0, **kw) -> gen.GenSpec:
    args = {
        "requests": n,
        "prompt": gen.length_dist("prompt", 12000, 7000, None, 31744),
        "output": gen.length_dist("output", 300, 180, None, 1024),
        "rate_per_s": 2.0,
        "arrival_cv": 2.0,
        "models": (("a", 0.25), ("b", 0.75)),
        "classes": (("interactive", 0.4), ("batch-1", 0.3), ("batch-2", 0.3)),
        "seed": seed,
    }
    args.update(kw)
    return gen.make_spec(**args)


def test_same_seed_same_file_other_seed_other_rows(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    gen.write_trace(a, spec(500, seed=3))
    gen.write_trace(b, spec(500, seed=3))
    gen.write_trace(c, spec(500, seed=4))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    ra, rc = gen.generate(spec(500, seed=3)), gen.generate(spec(500, seed=4))
    assert [r.input_tokens for r in ra] != [r.input_tokens for r in rc]
    assert [r.arrival_s for r in ra] != [r.arrival_s for r in rc]


def test_a_class_mix_does_not_move_arrivals_or_lengths() -> None:
    with_mix = gen.generate(spec(300, seed=1))
    without = gen.generate(spec(300, seed=1, models=(), classes=()))
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in with_mix] == [
        (r.arrival_s, r.input_tokens, r.output_tokens) for r in without
    ]
    assert all(r.model is None and r.slo_class is None for r in without)


def test_the_file_reads_back_as_a_generic_csv_trace(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    recs = gen.write_trace(p, spec(200, seed=2))
    tr = load_trace(p)
    assert tr.format == "csv" and len(tr.records) == 200
    assert [r.input_tokens for r in tr.records] == [r.input_tokens for r in recs]
    assert {r.model for r in tr.records} == {"a", "b"}
    assert p.read_text().splitlines()[0] == "arrival_s,input_tokens,output_tokens,model,slo_class"


def _cv(xs: list[float]) -> float:
    return statistics.pstdev(xs) / statistics.fmean(xs)


@pytest.mark.parametrize(
    ("prompt", "output", "cv"),
    [
        # capped (the wd figures): mean and median are of the capped lengths
        ((12000, 7000, None, 31744), (300, 180, None, 1024), 2.0),
        # uncapped, median given; a smooth, Poisson-like arrival process
        ((1500, 900, None, None), (250, 120, None, None), 1.0),
        # sigma given instead of a median, capped, smoother than Poisson
        ((4000, None, 0.8, 16000), (500, None, 1.2, 4000), 0.5),
    ],
)
def test_figures_within_5_percent_of_the_targets(prompt, output, cv: float) -> None:
    p = gen.length_dist("prompt", *prompt)
    o = gen.length_dist("output", *output)
    s = spec(100_000, seed=7, prompt=p, output=o, arrival_cv=cv, rate_per_s=3.0)
    recs = gen.generate(s)
    prompts = [r.input_tokens for r in recs]
    outputs = [r.output_tokens for r in recs]
    assert statistics.fmean(prompts) == pytest.approx(prompt[0], rel=0.05)
    assert statistics.fmean(outputs) == pytest.approx(output[0], rel=0.05)
    assert statistics.median(prompts) == pytest.approx(p.median_tokens, rel=0.05)
    assert statistics.median(outputs) == pytest.approx(o.median_tokens, rel=0.05)
    if prompt[1] is not None:
        assert statistics.median(prompts) == pytest.approx(prompt[1], rel=0.05)
    if prompt[3] is not None:
        assert max(prompts) <= prompt[3]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(recs, recs[1:], strict=False)]
    assert _cv(gaps) == pytest.approx(cv, rel=0.05)
    assert 1.0 / statistics.fmean(gaps) == pytest.approx(3.0, rel=0.05)
    classes = [r.slo_class for r in recs]
    for name, share in (("interactive", 0.4), ("batch-1", 0.3), ("batch-2", 0.3)):
        assert classes.count(name) / len(recs) == pytest.approx(share, rel=0.05)
    assert [r.model for r in recs].count("a") / len(recs) == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--prompt-mean", "100", "--prompt-median", "200"], "--prompt-median"),
        (["--prompt-median", "100", "--prompt-sigma", "1"], "--prompt-sigma"),
        (["--prompt-mean", "0.5"], "--prompt-mean"),
        (["--prompt-mean", "9000", "--prompt-max", "8192"], "--prompt-mean"),
        (
            ["--prompt-mean", "8192", "--prompt-median", "8192", "--prompt-max", "8192"],
            "--prompt-median",
        ),
        (
            ["--output-mean", "500", "--output-median", "250", "--output-max", "1024"],
            "--output-mean",
        ),
        (["--output-sigma", "-1"], "--output-sigma"),
        (["--prompt-sigma", "40", "--prompt-max", "9000"], "--prompt-sigma"),
        (["--output-max", "0"], "--output-max"),
        (["--rate", "0"], "--rate"),
        (["--arrival-cv", "0"], "--arrival-cv"),
        (["--requests", "0"], "--requests"),
        (["--models", "a"], "--models"),
        (["--models", "a:-1"], "--models"),
        (["--classes", "interactive:0.5,interactive:0.5"], "--classes"),
        (["--classes", "x:0,y:0"], "--classes"),
    ],
)
def test_bad_generator_options_are_named(tmp_path: Path, capsys, argv, option: str) -> None:
    out = tmp_path / "t.csv"
    assert main(["--generate", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qlm-eval: error: {option}:"), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "option"), [(["--rate", "x"], "--rate"), (["--rate", "2"], "--rate")]
)
def test_generator_options_rejected_by_the_parser_are_named(capsys, argv, option: str) -> None:
    # "--rate x" is no float; "--rate 2" without --generate belongs to no evaluation
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert option in capsys.readouterr().err


def test_cli_writes_the_trace_and_its_figures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.csv"
    argv = [
        "--generate",
        str(out),
        "--requests",
        "300",
        "--classes",
        "interactive:1",
        "--seed",
        "5",
    ]
    assert main(argv) == 0
    first = out.read_bytes()
    assert "300 requests" in capsys.readouterr().out
    assert main(argv) == 0
    assert out.read_bytes() == first
    assert {r.slo_class for r in load_trace(out).records} == {"interactive"}


def _attribution_commands() -> list[list[str]]:
    text = (TRACES_DIR / "ATTRIBUTION.md").read_text()
    return [
        shlex.split(line.strip())[1:]
        for line in text.splitlines()
        if line.strip().startswith("qlm-eval --generate")
    ]


def test_shipped_generated_traces_are_what_their_commands_write(tmp_path: Path) -> None:
    commands = _attribution_commands()
    assert {Path(c[1]).name for c in commands} == {"generated_wd.csv", "generated_wd2.csv"}
    for argv in commands:
        shipped = TRACES_DIR / Path(argv[1]).name
        out = tmp_path / shipped.name
        assert main(["--generate", str(out), *argv[2:]]) == 0
        assert out.read_bytes() == shipped.read_bytes(), shipped.name
        assert shipped.stat().st_size < 200_000


@pytest.mark.parametrize("name", ["wd", "wd2"])
def test_wd_loads_its_own_trace_and_builds_a_long_prompt_workload(name: str) -> None:
    assert name in SHIPPED
    sc = load_scenario(name)
    assert sc.trace_path is not None and sc.trace_path.name == f"generated_{name}.csv"
    tr = window(load_trace(sc.trace_path), max_requests=sc.window_max_requests, duration_s=None)
    wl = build_workload(sc, tr, seed=0)
    assert len(wl) == 2000 and {w.model for w in wl} == {"llama-3-8b"}
    assert sc.context_tokens("llama-3-8b") == 32768
    for w in wl:
        assert w.prompt_tokens + w.output_tokens <= 32768 and w.output_tokens <= w.max_tokens
    prompts = [w.prompt_tokens for w in wl]
    # the served window keeps the long prompts (no clipping at the model table's 8k)
    assert sum(p > 8192 for p in prompts) > 0.2 * len(wl)
    assert statistics.fmean(prompts) == pytest.approx(12000 if name == "wd" else 8000, rel=0.1)
    shares = {c: sum(w.slo_class == c for w in wl) / len(wl) for c in sc.class_shares}
    assert shares == pytest.approx({"interactive": 0.4, "batch-1": 0.3, "batch-2": 0.3}, abs=0.04)


def _wd() -> dict:
    return json.loads((SCENARIOS_DIR / "wd.json").read_text())


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.update(max_model_len={"llama-3-8b": "32k"}), "max_model_len.llama-3-8b"),
        (lambda d: d.update(max_model_len={"mistral-7b": 32768}), "max_model_len.mistral-7b"),
        (lambda d: d.update(trace="no/such/trace.csv"), "trace"),
        (lambda d: d.update(trace=7), "trace"),
    ],
)
def test_wd_keys_are_checked_and_named(mutate, key: str) -> None:
    d = copy.deepcopy(_wd())
    mutate(d)
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d, "test.json", SCENARIOS_DIR)
    assert repr(key) in str(ei.value)


def test_cli_runs_wd_on_its_own_trace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "--scenario",
        "wd",
        "--max-requests",
        "40",
        "--policies",
        "fcfs",
        "--capacity",
        "fluid",
        "--out",
        str(out),
        "--no-plots",
        "--no-progress",
    ]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert Path(doc["trace"]).name == "generated_wd.csv" and doc["requests"] == 40
