"""Online recalibration of the RWT estimator: it learns from what it observes how wrong its service
model is, and corrects its next forecasts.

The estimator already learns two things online (estimator.py): the output-length mean and variance
per (model, class), an EWMA seeded with the configured prior, and the decode step's correction per
(model, GPU, TP) from the token cadence of finished requests. This module adds what those leave out,
all from one observation per finished request that ran without eviction: how long it took from its
pull to its first token, and how many requests its instance held.

- Pull-to-first-token delay. The estimator predicts `prefill_first_s` (half a step in progress +
  one prefill of the mean prompt, scaled by the decode correction). A ratio observed / predicted
  per (model, GPU, TP) learns what the decode correction says nothing about: a prefill slower or
  faster than the roofline, chunked-prefill interleaving, the engine's admission latency. It is a
  geometric mean (an EWMA of the log ratio) so that a few slow admissions do not drag it; a delay
  over MAX_RATIO times the prediction (or under its inverse) is a wait in the engine's own queue, not
  a prefill, and is left out.
- Concurrency. The estimator's batch is min(pull bound, engine cap, KV fit), the KV fit counting
  every request at its full context (prompt + mean output); running requests hold about half their
  output, so an engine whose KV cache seems to fit 33 really runs the 40 its pull bound sends. Where
  the first token came promptly (within PROMPT_RATIO of the prediction: the engine took the request
  at once), the instance's request count at that moment is a concurrency the engine is known to
  run; its EWMA raises the KV fit to it. Without this, with outputs 2x the prior, a request the
  router pulls into a free slot was forecast to wait ~5 s for a slot (qlm-bench calibration).
- Output-length prior warm-up. The EWMA gives the prior the weight of 1/alpha observations for good
  (20 at alpha 0.05): a prior 2x off takes ~45 finished requests to be 90% corrected. Here the prior
  counts as PRIOR_WEIGHT observations, and an observation weighs 1/(PRIOR_WEIGHT + n + 1) until
  that falls to alpha: a running mean first, the EWMA after. (The first finishes are biased toward
  short outputs, so the prior keeps some weight.)

Pure state, no clock. `enabled=False` (ManagerConfig.recalibrate) or alpha 0 (statistics frozen)
leave the estimator exactly as without it: factor 1, no concurrency floor, the configured alpha.
Keys are (model, GPU, TP), the estimator's profile key: instances of one type share what is learnt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A pull-to-first-token delay beyond this multiple of the prediction (or below its inverse) is not
# a prefill: the request queued inside the engine, or the observation is broken.
MAX_RATIO = 4.0
# A first token within this multiple of the predicted delay came without a wait in the engine.
PROMPT_RATIO = 2.0
# Weight of the output-length prior, in observations, during the warm-up (see module doc): small
# enough that a 2x-off prior is mostly corrected after ~20 finishes, large enough that the first
# few (short) finishes do not swing the mean.
PRIOR_WEIGHT = 8.0

ServiceKey = tuple[str, str, int]  # (model, GPU, TP): the estimator's profile key


@dataclass(frozen=True)
class ServiceRecal:
    """What is learnt for one (model, GPU, TP)."""

    prefill_factor: float  # observed / predicted pull-to-first-token delay (geometric mean)
    prefill_observations: int
    concurrency: float  # EWMA of the request count at which first tokens came promptly (0: none)
    concurrency_observations: int


class _Running:
    """A mean that starts as a running mean and turns into an EWMA once 1/(n+1) falls to alpha."""

    __slots__ = ("mean", "n")

    def __init__(self) -> None:
        self.mean, self.n = 0.0, 0

    def update(self, x: float, alpha: float) -> None:
        self.n += 1
        self.mean += max(alpha, 1.0 / self.n) * (x - self.mean)


class Recalibrator:
    def __init__(self, alpha: float, *, enabled: bool = True) -> None:
        self.alpha = alpha
        # alpha 0 freezes the estimator's statistics: recalibration stays out too.
        self.enabled = enabled and alpha > 0
        self._log_prefill: dict[ServiceKey, _Running] = {}
        self._concurrency: dict[ServiceKey, _Running] = {}

    # ------------------------------------------------------------------ what the forecasts use
    def prefill_factor(self, key: ServiceKey) -> float:
        """Multiplier on the predicted pull-to-first-token delay (1 until observed)."""
        s = self._log_prefill.get(key)
        return math.exp(s.mean) if self.enabled and s is not None else 1.0

    def concurrency(self, key: ServiceKey) -> int:
        """Requests the instance is known to run at once (0 until observed): a floor on the KV fit."""
        s = self._concurrency.get(key)
        return int(round(s.mean)) if self.enabled and s is not None else 0

    def output_alpha(self, observations: int) -> float:
        """Weight of the next output-length observation after `observations` of them."""
        if not self.enabled:
            return self.alpha
        return max(self.alpha, 1.0 / (PRIOR_WEIGHT + observations + 1))

    # ------------------------------------------------------------------ observations
    def observe_first_token(
        self, key: ServiceKey, delay_s: float, predicted_s: float, in_flight: int
    ) -> bool:
        """A request's pull-to-first-token delay against the estimator's prediction without the
        learnt factor, and how many requests its instance held (it included). Returns whether
        anything the forecasts use changed (the caller then refreshes its profiles)."""
        if not self.enabled or delay_s <= 0 or predicted_s <= 0:
            return False
        ratio = delay_s / predicted_s
        changed = False
        if ratio <= PROMPT_RATIO and in_flight > 0:
            before = self.concurrency(key)
            self._concurrency.setdefault(key, _Running()).update(float(in_flight), self.alpha)
            changed = self.concurrency(key) != before
        if 1.0 / MAX_RATIO <= ratio <= MAX_RATIO:
            self._log_prefill.setdefault(key, _Running()).update(math.log(ratio), self.alpha)
            changed = True
        return changed

    # ------------------------------------------------------------------ view
    def state(self) -> dict[ServiceKey, ServiceRecal]:
        out = {}
        for key in sorted(set(self._log_prefill) | set(self._concurrency)):
            p = self._log_prefill.get(key)
            c = self._concurrency.get(key)
            out[key] = ServiceRecal(
                math.exp(p.mean) if p is not None else 1.0,
                p.n if p is not None else 0,
                c.mean if c is not None else 0.0,
                c.n if c is not None else 0,
            )
        return out


__all__ = [
    "MAX_RATIO",
    "PRIOR_WEIGHT",
    "PROMPT_RATIO",
    "Recalibrator",
    "ServiceKey",
    "ServiceRecal",
]
