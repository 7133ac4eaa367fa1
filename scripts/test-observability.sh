#!/usr/bin/env bash
# make test-observability: the Prometheus rules and a real scrape (issue 17, item 4).
#   1. promtool (Debian's `prometheus` package, installed with apt-get when missing and root):
#      check config, check rules, test rules (docker/prometheus/tests/qlm-rules.test.yml).
#   2. Where the `prometheus` binary exists: start qlm-serve (loopback ports, own process group) and
#      a real Prometheus loading docker/prometheus/rules, send requests with qlm-client, and check
#      through Prometheus's HTTP API that every rule is healthy, the attainment rules produce series
#      and every dashboard query parses (scripts/observability_check.py).
# Not part of `make test` (it needs promtool and starts servers). OBS_SKIP_SCRAPE=1 skips step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
PROMDIR=$ROOT/docker/prometheus

if ! command -v promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing Debian's prometheus package (promtool, prometheus)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }
    elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null
    else
        echo "promtool not found and apt-get not usable: install Debian's 'prometheus' package" >&2
        exit 1
    fi
fi
echo "== $(promtool --version 2>&1 | head -1)"
echo "== promtool check config"
promtool check config "$PROMDIR/prometheus.yml"
echo "== promtool check rules"
promtool check rules "$PROMDIR"/rules/*.yml
echo "== promtool test rules"
promtool test rules "$PROMDIR"/tests/*.test.yml

if [ "${OBS_SKIP_SCRAPE:-0}" = 1 ]; then
    echo "== scrape check skipped (OBS_SKIP_SCRAPE=1)"; exit 0
fi
PROM=$(command -v prometheus || true)
if [ -z "$PROM" ]; then
    echo "== no prometheus binary: scrape check skipped"; exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/qlm-obs.XXXXXX")
SERVE_PID=""; PROM_PID=""
cleanup() {
    # Each started with setsid: its process group id is its pid; stop the group, then wait.
    for pid in $PROM_PID $SERVE_PID; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in $PROM_PID $SERVE_PID; do
        for _ in $(seq 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

read -r HTTP GRPC METRICS OPENAI PROMPORT < <("$PY" - <<'PYEOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
PYEOF
)

echo "== qlm-serve on 127.0.0.1 (grpc $GRPC, metrics $METRICS, openai $OPENAI)"
setsid "$BIN/qlm-serve" --host 127.0.0.1 --http-port "$HTTP" --grpc-port "$GRPC" \
    --metrics-port "$METRICS" --openai-port "$OPENAI" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!

cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PROMDIR/rules/qlm-recording.yml
  - $PROMDIR/rules/qlm-alerts.yml
scrape_configs:
  - job_name: triton
    static_configs:
      - targets: ["127.0.0.1:$METRICS"]
        labels: {server: triton}
  - job_name: qlm-openai
    static_configs:
      - targets: ["127.0.0.1:$OPENAI"]
YAML
promtool check config "$WORK/prometheus.yml" >/dev/null
echo "== prometheus on 127.0.0.1:$PROMPORT ($("$PROM" --version 2>&1 | head -1))"
setsid "$PROM" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
    --web.listen-address="127.0.0.1:$PROMPORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

if ! "$PY" scripts/observability_check.py --grpc "127.0.0.1:$GRPC" \
        --metrics "http://127.0.0.1:$METRICS/metrics" --openai "http://127.0.0.1:$OPENAI" \
        --prometheus "http://127.0.0.1:$PROMPORT" --client "$BIN/qlm-client" \
        --dashboard docker/grafana/dashboards/qlm.json; then
    echo "--- qlm-serve log (tail)"; tail -40 "$WORK/serve.log" || true
    echo "--- prometheus log (tail)"; tail -20 "$WORK/prometheus.log" || true
    exit 1
fi
echo "== test-observability passed"
