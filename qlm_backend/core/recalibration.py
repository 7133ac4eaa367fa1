"""Online recalibration of the RWT estimator: what it learns from observations beyond its EWMAs.

The estimator already learns online (estimator.py): the output-length mean and variance per
(model, class), an EWMA seeded with the configured prior, and the decode step's correction per
(model, GPU, TP), observed / predicted step time from the token cadence of finished requests, which
scales its prefills too. So output lengths 2x the prior, or engines 30% slower than their profile,
are learnt there (docs/estimator.md measures how fast). What those leave wrong is the batch.

The estimator's batch is min(pull bound, engine cap, KV fit), the KV fit counting every request at
its full context (prompt + mean output). Running requests hold about half their output, so where
outputs are long the KV fit says 33 while the engine runs the 40 its pull bound sends: every
forecast then has requests wait for slots that are free (a request pulled into a free slot was
forecast 2-4 s late with outputs 2x the prior, qlm-bench calibration). Here: where a request's first
token came promptly after its pull (within PROMPT_RATIO of the predicted prefill: the engine took it
at once), the number of requests its instance held is a concurrency the engine is known to run;
its EWMA is a floor on the KV fit. Where the KV fit is not binding (short outputs, a small pull
bound) nothing changes.

Tried and left out (docs/estimator.md):
- a learnt ratio on the pull-to-first-token delay ("prefill"): what the core sees there is mostly
  the engine's own queue (priority scheduling, a burst of pulls prefilled one after another; on wa
  the delay was 0.5x to 4.3x the prediction between p10 and p90), so its EWMA wandered between
  0.8 and 1.4, a noise on every forecast rather than a correction. Separating the prefill from
  the queue needs the time the engine scheduled the request, which the core is not told;
- a faster warm-up of the output-length prior (weighing it as 8 observations, not 1/alpha = 20): it
  corrected a wrong prior sooner, but where the prior was right the first finishes (the short
  ones: the long ones are still running) dragged the mean down.

Pure state, no clock. `enabled=False` (ManagerConfig.recalibrate) or alpha 0 (statistics frozen)
leave the estimator exactly as without it. Keys are (model, GPU, TP), the estimator's profile key.
"""

from __future__ import annotations

from dataclasses import dataclass

# A first token within this multiple of the predicted pull-to-first-token delay came without a
# wait in the engine: the engine ran the request at once beside the others.
PROMPT_RATIO = 2.0

ServiceKey = tuple[str, str, int]  # (model, GPU, TP): the estimator's profile key


@dataclass(frozen=True)
class ServiceRecal:
    """What is learnt for one (model, GPU, TP)."""

    concurrency: float  # EWMA of the request count at which first tokens came promptly
    observations: int


class _Running:
    """A mean that starts as a running mean and turns into an EWMA once 1/n falls to alpha."""

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
        self._concurrency: dict[ServiceKey, _Running] = {}

    def concurrency(self, key: ServiceKey) -> int:
        """Requests the instance was seen to run at once (0 until observed)."""
        s = self._concurrency.get(key)
        return int(round(s.mean)) if self.enabled and s is not None else 0

    def kv_fit(self, key: ServiceKey, kv_fit: int) -> int:
        """The estimator's KV fit (requests its KV cache holds), raised to the concurrency seen
        running promptly."""
        return max(kv_fit, self.concurrency(key))

    def observe_first_token(
        self, key: ServiceKey, delay_s: float, predicted_s: float, in_flight: int
    ) -> bool:
        """A request's pull-to-first-token delay, the estimator's prediction of it, and how many
        requests its instance held (it included). Returns whether the learnt concurrency changed
        (the caller then refreshes its profiles)."""
        if not self.enabled or in_flight <= 0 or predicted_s <= 0:
            return False
        if not 0.0 < delay_s <= PROMPT_RATIO * predicted_s:
            return False  # it waited in the engine: the count says nothing of what runs at once
        before = self.concurrency(key)
        self._concurrency.setdefault(key, _Running()).update(float(in_flight), self.alpha)
        return self.concurrency(key) != before

    def state(self) -> dict[ServiceKey, ServiceRecal]:
        return {k: ServiceRecal(s.mean, s.n) for k, s in sorted(self._concurrency.items())}


__all__ = ["PROMPT_RATIO", "Recalibrator", "ServiceKey", "ServiceRecal"]
