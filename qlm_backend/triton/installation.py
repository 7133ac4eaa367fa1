"""Find a tritonserver to run: the system one (Triton's containers) or the one in the pytriton wheel.

The `nvidia-pytriton` wheel bundles a real tritonserver 2.51 with the Python backend and stubs for
CPython 3.8-3.13. Running it outside pytriton needs (docs/triton-vllm-facts.md section 2): the
stub for the running interpreter next to libtriton_python.so in a backend directory,
LD_LIBRARY_PATH with the wheel's bundled libraries and this interpreter's LIBDIR (else the stub may
load the system libpython and multiprocessing breaks), and this venv's bin first on PATH so
model.py imports the venv's packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SYSTEM_TRITON = Path("/opt/tritonserver")


class TritonNotFound(RuntimeError):
    """No usable tritonserver; the message says what to install."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_dir: Path
    env: dict[str, str]
    kind: str  # "system" | "pytriton"
    version: str


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound(
            "the nvidia-pytriton wheel is not installed (it carries the CPU tritonserver); "
            "run `make serve` (it installs it) or `pip install -e '.[dev]'`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def find_system() -> TritonInstallation | None:
    binary = SYSTEM_TRITON / "bin" / "tritonserver"
    if not binary.is_file():
        found = shutil.which("tritonserver")
        if not found:
            return None
        binary = Path(found)
    backends = binary.parent.parent / "backends"
    return TritonInstallation(binary, backends, _python_env(), "system", "system")


def find_pytriton(cache_dir: Path) -> TritonInstallation:
    root = _pytriton_root() / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotFound(f"the pytriton wheel has no tritonserver binary at {binary}")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFound(
            f"the pytriton wheel has no Python-backend stub for Python {pyver} (looked at {stub}); "
            "use CPython 3.8-3.13"
        )
    src_backend = root / "backends" / "python"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    # The stub must sit beside libtriton_python.so; copy into a cache dir keyed by Python version so
    # that the installed wheel stays untouched.
    backend_dir = cache_dir / f"backends-py{pyver}"
    dst = backend_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (
        src_backend / "libtriton_python.so",
        src_backend / "triton_python_backend_utils.py",
        stub,
    ):
        target = dst / f.name
        if not target.exists() or target.stat().st_size != f.stat().st_size:
            shutil.copy2(f, target)
    env = _python_env()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [str(libs), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    return TritonInstallation(
        binary, backend_dir, env, "pytriton", "2.51.0 (nvidia-pytriton 0.7.0)"
    )


def find_triton(cache_dir: Path, prefer: str = "auto") -> TritonInstallation:
    """`prefer`: auto (system if present, else pytriton), system, pytriton."""
    if prefer not in ("auto", "system", "pytriton"):
        raise ValueError(f"triton: must be auto, system or pytriton, got {prefer!r}")
    if prefer in ("auto", "system"):
        sys_inst = find_system()
        if sys_inst is not None:
            return sys_inst
        if prefer == "system":
            raise TritonNotFound("no system tritonserver (looked in /opt/tritonserver and PATH)")
    return find_pytriton(cache_dir)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QLM_CACHE_DIR", Path.cwd() / ".qlm"))
