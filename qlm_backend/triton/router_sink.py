"""The router's responses: a Triton response sender in the executor's ClientSink shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from qlm_backend.contract import Responder, join_logprobs, logprobs_text
from qlm_backend.router.flight import ErrorKind, Flight
from qlm_backend.router.request import RouterRequest
from qlm_backend.triton.glue import make_response, send_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _first(arr: Any) -> Any:
    # An engine's one-value outputs come as [1] or, num_input_tokens from vllm_backend, 0-d.
    return None if arr is None else np.asarray(arr).reshape(-1)[0]


class TritonSink:
    """A request's Triton response sender, in the executor's ClientSink shape."""

    def __init__(self, sender: Any, rr: RouterRequest, time_scale: float) -> None:
        self.sender, self.rr, self.time_scale = sender, rr, time_scale
        self.responder = Responder(rr.params)

    def send(self, f: Flight, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        # The executor hands a request that is not streamed over once, whole, at its end.
        x, returns = f.extras, self.rr.params.returns
        logprobs = None
        if "return_logprobs" in returns:
            if f.stream:
                logprobs = logprobs_text(x.get("logprobs"))
            else:
                logprobs = join_logprobs(logprobs_text(a) for a in f.logprob_parts)
        cumulative = _first(x.get("cumulative_logprob"))
        n_in = _first(x.get("num_input_tokens"))
        arrays = self.responder.step(
            text,
            num_tokens,
            final=final,
            finish_reason=reason,
            logprobs=logprobs,
            cumulative_logprob=None if cumulative is None else float(cumulative),
            num_input_tokens=self.rr.prompt_tokens if n_in is None else int(n_in),
        )
        if arrays is None:
            return True
        if final:  # router-side queueing before the first dispatch, in wall seconds
            queue_s = ((f.pulled_s or f.arrival_s) - f.arrival_s) * self.time_scale
            arrays["qlm_queue_s"] = np.asarray([queue_s], dtype=np.float64)
            arrays["qlm_instance"] = np.asarray([(f.instance or "").encode()], dtype=np.object_)
        try:
            self.sender.send(make_response(arrays), flags=FINAL if final else 0)
            return True
        except Exception:  # noqa: BLE001 - the client is gone; the executor cancels
            return False

    def error(self, message: str, kind: ErrorKind) -> None:
        send_error(self.sender, message, kind)

    def is_cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())
