"""Seeded synthetic traces in the generic CSV format, for workloads no public trace covers.

The shipped Azure traces have short prompts (about 1k tokens); the workloads where prefill dominates
(RAG, long documents, code context: prompts of many thousand tokens) have none we may ship. This
module draws such a trace from a handful of summary figures a user can read off their own logs
(request rate, burstiness, mean and median prompt and output lengths, the model and SLO class mix),
so an evaluation can be rerun on the same figures anywhere, and the file it writes is byte-identical
for the same parameters and seed.

Model:

- Prompt and output lengths are lognormal, rounded to whole tokens (at least 1). The lognormal is
  fixed by its mean and either its median or its sigma. With a cap (`max_tokens`, a model's context
  window for instance) every draw above it is set to the cap, and the mean and median asked for are
  those of the capped lengths, i.e. of the file: the sigma (or mu) is solved for it. A real workload
  logged behind a context limit has exactly that pile-up at the limit.
- Arrivals are a renewal process with gamma-distributed inter-arrival times of the given mean rate
  and coefficient of variation (CV = std / mean of the gaps): CV 1 is a Poisson process, CV > 1
  bursty (gamma shape 1 / CV^2 < 1: many short gaps, clusters separated by long silences), CV < 1
  smoother than Poisson. The first request arrives at 0.
- Model and SLO class are independent categorical draws from the given shares (optional columns).

Each quantity has its own random stream derived from the seed, so adding a class mix does not move
the arrivals or lengths of the same seed.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from qlm_backend.eval.traces import CSV_REQUIRED, TraceRecord

_PHI = NormalDist()
# The capped-lognormal solvers scan sigma on [0, _SIGMA_MAX]: beyond ~6 the shape is degenerate.
_SIGMA_MAX = 6.0
_SIGMA_GRID = 6000


class GenerateError(ValueError):
    """A bad generator parameter; the message starts with the command-line option it came from."""

    def __init__(self, option: str, msg: str) -> None:
        super().__init__(f"--{option}: {msg}")
        self.option = option


@dataclass(frozen=True)
class LengthDist:
    """A lognormal token length exp(mu + sigma Z), rounded, at least 1, at most `max_tokens`."""

    mu: float
    sigma: float
    max_tokens: int | None

    def draw(self, rng: random.Random) -> int:
        tokens = max(1, round(math.exp(self.mu + self.sigma * rng.normalvariate(0.0, 1.0))))
        return tokens if self.max_tokens is None else min(tokens, self.max_tokens)

    @property
    def median_tokens(self) -> float:
        m = math.exp(self.mu)
        return m if self.max_tokens is None else min(m, float(self.max_tokens))

    @property
    def mean_tokens(self) -> float:
        return _capped_mean(self.mu, self.sigma, self.max_tokens)


@dataclass(frozen=True)
class GenSpec:
    requests: int
    prompt: LengthDist
    output: LengthDist
    rate_per_s: float
    arrival_cv: float
    models: tuple[tuple[str, float], ...] = ()
    classes: tuple[tuple[str, float], ...] = ()
    seed: int = 0


def _capped_mean(mu: float, sigma: float, cap: float | None) -> float:
    """E[min(exp(mu + sigma Z), cap)] in closed form."""
    if sigma == 0.0:
        return math.exp(mu) if cap is None else min(math.exp(mu), cap)
    full = math.exp(mu + sigma * sigma / 2)
    if cap is None:
        return full
    a = (math.log(cap) - mu) / sigma
    return full * _PHI.cdf(a - sigma) + cap * (1.0 - _PHI.cdf(a))


def _bisect(f_increasing: Callable[[float], float], lo: float, hi: float, target: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        if f_increasing(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def length_dist(
    what: str,
    mean_tokens: float,
    median_tokens: float | None = None,
    sigma: float | None = None,
    max_tokens: int | None = None,
) -> LengthDist:
    """The lognormal with this mean and median (or sigma), both of the capped lengths if capped.

    `what` is "prompt" or "output": errors name the option --<what>-mean etc.
    """
    if not (math.isfinite(mean_tokens) and mean_tokens >= 1):
        raise GenerateError(f"{what}-mean", f"expected a number >= 1, got {mean_tokens!r}")
    if median_tokens is not None and sigma is not None:
        raise GenerateError(f"{what}-sigma", f"give --{what}-median or --{what}-sigma, not both")
    if max_tokens is not None:
        if max_tokens < 1:
            raise GenerateError(f"{what}-max", f"expected an integer >= 1, got {max_tokens!r}")
        if mean_tokens > max_tokens:
            raise GenerateError(
                f"{what}-mean", f"{mean_tokens:g} is above --{what}-max {max_tokens}"
            )
    if median_tokens is None and sigma is None:
        sigma = 1.0
    if sigma is not None:
        if not (math.isfinite(sigma) and 0 <= sigma <= _SIGMA_MAX):
            raise GenerateError(
                f"{what}-sigma", f"expected a number in [0, {_SIGMA_MAX:g}], got {sigma!r}"
            )
        if max_tokens is None or sigma == 0.0:
            return LengthDist(math.log(mean_tokens) - sigma * sigma / 2, sigma, max_tokens)
        if mean_tokens >= max_tokens:
            raise GenerateError(
                f"{what}-mean", f"a mean equal to --{what}-max {max_tokens} needs sigma 0"
            )
        # The capped mean rises monotonically with mu from 0 to the cap.
        s = sigma
        mu = _bisect(
            lambda m: _capped_mean(m, s, max_tokens),
            -50.0,
            math.log(max_tokens) + 50.0,
            mean_tokens,
        )
        return LengthDist(mu, sigma, max_tokens)
    assert median_tokens is not None
    if not (math.isfinite(median_tokens) and median_tokens >= 1):
        raise GenerateError(f"{what}-median", f"expected a number >= 1, got {median_tokens!r}")
    if median_tokens > mean_tokens:
        raise GenerateError(
            f"{what}-median",
            f"{median_tokens:g} is above --{what}-mean {mean_tokens:g}; a lognormal's median is "
            "at most its mean",
        )
    mu = math.log(median_tokens)
    if max_tokens is None:
        return LengthDist(mu, math.sqrt(2 * math.log(mean_tokens / median_tokens)), None)
    if median_tokens >= max_tokens:
        raise GenerateError(
            f"{what}-median", f"{median_tokens:g} is not below --{what}-max {max_tokens}"
        )
    # With a cap the mean first rises with sigma, peaks, then falls towards cap / 2 (half the mass
    # piles up at the cap, half goes to 0): solve on the rising branch, below the peak.
    grid = [_SIGMA_MAX * k / _SIGMA_GRID for k in range(_SIGMA_GRID + 1)]
    means = [_capped_mean(mu, s, max_tokens) for s in grid]
    k_peak = max(range(len(grid)), key=means.__getitem__)
    if mean_tokens > means[k_peak]:
        raise GenerateError(
            f"{what}-mean",
            f"{mean_tokens:g} is out of reach with --{what}-median {median_tokens:g} and "
            f"--{what}-max {max_tokens}: a capped lognormal's mean is at most "
            f"{means[k_peak]:.0f} there",
        )
    sigma = _bisect(lambda s: _capped_mean(mu, s, max_tokens), 0.0, grid[k_peak], mean_tokens)
    return LengthDist(mu, sigma, max_tokens)


def parse_mix(text: str, option: str) -> tuple[tuple[str, float], ...]:
    """'a:0.5,b:0.5' -> (('a', 0.5), ('b', 0.5)); errors name --<option>."""
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, share_text = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise GenerateError(option, f"expected name:share items like a:0.6,b:0.4, got {part!r}")
        if any(c in name for c in "\"'\n\r"):
            raise GenerateError(option, f"name {name!r} has a quote or line break")
        try:
            share = float(share_text)
        except ValueError:
            raise GenerateError(
                option, f"share of {name!r} is not a number: {share_text!r}"
            ) from None
        if not (math.isfinite(share) and share >= 0):
            raise GenerateError(option, f"share of {name!r} must be >= 0, got {share_text!r}")
        if name in (n for n, _ in out):
            raise GenerateError(option, f"{name!r} is listed twice")
        out.append((name, share))
    if not out:
        raise GenerateError(option, f"no name:share item in {text!r}")
    if sum(s for _, s in out) <= 0:
        raise GenerateError(option, "the shares sum to 0")
    return tuple(out)


def make_spec(
    *,
    requests: int,
    prompt: LengthDist,
    output: LengthDist,
    rate_per_s: float,
    arrival_cv: float,
    models: tuple[tuple[str, float], ...] = (),
    classes: tuple[tuple[str, float], ...] = (),
    seed: int = 0,
) -> GenSpec:
    """A validated GenSpec; errors name the command-line option."""
    if requests < 1:
        raise GenerateError("requests", f"expected an integer >= 1, got {requests!r}")
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise GenerateError("rate", f"expected arrivals per second > 0, got {rate_per_s!r}")
    # CV far from 1 makes gamma shapes whose draws under- or overflow a float.
    if not (math.isfinite(arrival_cv) and 0.05 <= arrival_cv <= 20):
        raise GenerateError("arrival-cv", f"expected a number in [0.05, 20], got {arrival_cv!r}")
    return GenSpec(requests, prompt, output, rate_per_s, arrival_cv, models, classes, seed)


def _stream(seed: int, what: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"qlm-generate/{seed}/{what}")


def _draw_mix(rng: random.Random, mix: Sequence[tuple[str, float]], n: int) -> list[str]:
    names = [m for m, _ in mix]
    return rng.choices(names, weights=[w for _, w in mix], k=n)


def generate(spec: GenSpec) -> list[TraceRecord]:
    """The trace's requests, in arrival order."""
    n = spec.requests
    shape = 1.0 / (spec.arrival_cv * spec.arrival_cv)
    scale_s = 1.0 / (spec.rate_per_s * shape)  # mean gap = shape x scale = 1 / rate
    rng_gap = _stream(spec.seed, "arrivals")
    arrivals = [0.0]
    for _ in range(n - 1):
        arrivals.append(arrivals[-1] + rng_gap.gammavariate(shape, scale_s))
    rng_p, rng_o = _stream(spec.seed, "prompt"), _stream(spec.seed, "output")
    prompts = [spec.prompt.draw(rng_p) for _ in range(n)]
    outputs = [spec.output.draw(rng_o) for _ in range(n)]
    models: list[str | None] = [None] * n
    classes: list[str | None] = [None] * n
    if spec.models:
        models = list(_draw_mix(_stream(spec.seed, "models"), spec.models, n))
    if spec.classes:
        classes = list(_draw_mix(_stream(spec.seed, "classes"), spec.classes, n))
    return [
        TraceRecord(a, p, o, m, c)
        for a, p, o, m, c in zip(arrivals, prompts, outputs, models, classes, strict=True)
    ]


def to_csv(records: Sequence[TraceRecord]) -> str:
    """The generic CSV trace (traces.py): model / slo_class columns only when some row has one."""
    with_model = any(r.model is not None for r in records)
    with_class = any(r.slo_class is not None for r in records)
    header = list(CSV_REQUIRED) + (["model"] if with_model else [])
    header += ["slo_class"] if with_class else []
    lines = [",".join(header)]
    for r in records:
        # Fixed microsecond precision: the text, not float repr, is what must be reproducible.
        row = [f"{r.arrival_s:.6f}", str(r.input_tokens), str(r.output_tokens)]
        if with_model:
            row.append(r.model or "")
        if with_class:
            row.append(r.slo_class or "")
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def write_trace(path: str | Path, spec: GenSpec) -> list[TraceRecord]:
    records = generate(spec)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # newline="" and an explicit "\n": the same bytes on every platform.
    with p.open("w", newline="") as f:
        f.write(to_csv(records))
    return records


def describe(records: Sequence[TraceRecord]) -> dict[str, float | dict[str, float]]:
    """The realised figures of a trace, to set beside the parameters asked for."""
    prompts = [r.input_tokens for r in records]
    outputs = [r.output_tokens for r in records]
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(records, records[1:], strict=False)]
    out: dict[str, float | dict[str, float]] = {
        "requests": float(len(records)),
        "prompt_mean": statistics.fmean(prompts),
        "prompt_median": float(statistics.median(prompts)),
        "output_mean": statistics.fmean(outputs),
        "output_median": float(statistics.median(outputs)),
    }
    if len(gaps) >= 2 and statistics.fmean(gaps) > 0:
        out["rate_per_s"] = 1.0 / statistics.fmean(gaps)
        out["arrival_cv"] = statistics.pstdev(gaps) / statistics.fmean(gaps)
    for col in ("model", "slo_class"):
        names = [getattr(r, col) for r in records if getattr(r, col) is not None]
        if names:
            out[f"{col}_shares"] = {n: names.count(n) / len(records) for n in sorted(set(names))}
    return out


__all__ = [
    "GenSpec",
    "GenerateError",
    "LengthDist",
    "describe",
    "generate",
    "length_dist",
    "make_spec",
    "parse_mix",
    "to_csv",
    "write_trace",
]
