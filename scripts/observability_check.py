"""The scrape half of `make test-observability` (scripts/test-observability.sh starts the servers):
send requests to a running qlm-serve (qlm-client over gRPC, one OpenAI call to qlm-openai), then
ask a real Prometheus, which scrapes both and loads docker/prometheus/rules, over its HTTP API:
- every recording and alert rule evaluates with health "ok";
- the attainment rules produce series for the classes that got requests, as ratios in [0, 1];
- every query of the Grafana dashboard parses and runs.
Standard library only; not collected by pytest."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

CLASSES = ("interactive", "batch-1")
MODEL = "mistral-7b"


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait(what: str, check, timeout: float) -> None:
    end = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < end:
        try:
            if check():
                print(f"   {what}: ok")
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {what} ({last})")


def query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(get(url))
    if body.get("status") != "success":
        raise RuntimeError(f"{expr!r}: {body}")
    return body["data"]["result"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--openai", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()

    print("== waiting for qlm-serve's router metrics, qlm-openai and Prometheus")
    wait("router metrics", lambda: b"qlm_queue_length" in get(a.metrics), a.timeout)
    wait("qlm-openai /metrics", lambda: get(a.openai + "/metrics") is not None, 120)
    wait("prometheus ready", lambda: get(a.prometheus + "/-/ready") is not None, 120)

    def send() -> None:
        for cls in CLASSES:
            for i in range(3):
                out = subprocess.run(
                    [a.client, "--url", a.grpc, "--model", MODEL, "--slo-class", cls,
                     "--max-tokens", "4", "--ignore-eos", "--json", f"hello {cls} {i}"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stdout[-2000:], out.stderr[-2000:])
                    raise SystemExit(f"qlm-client failed ({cls})")
        req = urllib.request.Request(
            a.openai + "/v1/completions",
            data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json", "x-slo-class": "interactive"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200, r.status

    def classes(expr: str) -> set[str]:
        return {s["metric"].get("slo_class", "") for s in query(a.prometheus, expr)}

    # A counter's series appears at its first request, already counting it: rate() sees an increase
    # only from a second round, once Prometheus has scraped the series.
    print("== requests, round 1: qlm-client (gRPC) per class, one OpenAI completion")
    send()
    wait("histogram series scraped", lambda: classes("qlm_ttft_seconds_count") >= set(CLASSES), 60)
    wait("qlm-openai series scraped", lambda: classes("qlm_openai_ttft_seconds_count") != set(), 60)
    time.sleep(2.0)
    print("== requests, round 2")
    send()

    print("== Prometheus: targets, rules, attainment series")
    wait(
        "both targets up",
        lambda: (
            {s["metric"]["job"] for s in query(a.prometheus, "up == 1")} >= {"triton", "qlm-openai"}
        ),
        60,
    )

    def series(expr: str, want: set[str]) -> bool:
        res = query(a.prometheus, expr)
        # NaN (0/0) until the window holds an increase: wait for finite ratios.
        got = {s["metric"].get("slo_class", "") for s in res if s["value"][1] != "NaN"}
        for s in res:
            v = float(s["value"][1])
            assert v != v or 0.0 <= v <= 1.0, (expr, s)
        return want <= got

    for expr, want in (
        ("slo_class:qlm_ttft_attainment:ratio_rate5m", set(CLASSES)),
        ("model_slo_class:qlm_ttft_attainment:ratio_rate5m", set(CLASSES)),
        ("slo_class:qlm_requests_attainment:ratio_rate5m", set(CLASSES)),
        ("slo_class:qlm_requests_goodput:ratio_rate5m", set(CLASSES)),
        ("slo_class:qlm_requests_shed:ratio_rate5m", set(CLASSES)),
        ("slo_class:qlm_ttft_attainment_target:ratio", {"interactive", "batch-1", "batch-2"}),
        ("slo_class:qlm_openai_ttft_attainment:ratio_rate5m", {"interactive"}),
        ("slo_class:qlm_openai_429:ratio_rate5m", {"interactive"}),
    ):
        wait(expr, lambda e=expr, w=want: series(e, w), 90)
    for s in query(a.prometheus, "{__name__=~'.*:qlm_.*(attainment|goodput|shed|429):ratio_rate5m'}"):
        print(f"   {s['metric']['__name__']}{{{s['metric'].get('model', '')}"
              f"{' ' if 'model' in s['metric'] else ''}{s['metric']['slo_class']}}}"
              f" = {float(s['value'][1]):.3f}")  # fmt: skip

    rules = json.loads(get(a.prometheus + "/api/v1/rules"))["data"]["groups"]
    bad = [
        (g["name"], r.get("name"), r.get("lastError"))
        for g in rules
        for r in g["rules"]
        if r.get("health") != "ok"
    ]
    n = sum(len(g["rules"]) for g in rules)
    if bad or n == 0:
        raise SystemExit(f"unhealthy rules: {bad}")
    print(f"   {n} rules in {len(rules)} groups, all health ok")
    firing = [
        r["name"] for g in rules for r in g["rules"] if r.get("type") == "alerting" and r["state"] != "inactive"
    ]  # fmt: skip
    print(f"   alerts pending or firing: {firing or 'none'}")

    print("== dashboard queries run on Prometheus")
    with open(a.dashboard) as f:
        dash = json.load(f)
    n = 0
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("${model}", ".*").replace("$model", ".*")
            query(a.prometheus, expr)
            n += 1
    print(f"   {n} queries ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
