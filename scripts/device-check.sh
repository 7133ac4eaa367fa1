#!/usr/bin/env bash
# The device check (qlm_backend/bench/device_check.py): decode and prefill of a Llama-7B-shaped
# stack, pinned and disk host-to-device copies of 14 GB, beside engine/perf.py's step model.
# For a machine with an NVIDIA GPU and PyTorch, no vLLM and no network; never run by CI.
#   scripts/device-check.sh [OUT.json] [--copy-gb N]      (a dry run: --device cpu --small)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/results/device-check.json}"
shift || true
cd "$REPO"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" \
    -m qlm_backend.bench.device_check --out "$OUT" "$@"
