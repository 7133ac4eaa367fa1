"""The router's responses: a Triton response sender in the executor's ClientSink shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from qlm_backend.contract import output_arrays
from qlm_backend.router.flight import ErrorKind, Flight
from qlm_backend.router.request import RouterRequest
from qlm_backend.triton.glue import make_response, send_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """A request's Triton response sender, in the executor's ClientSink shape."""

    def __init__(self, sender: Any, rr: RouterRequest, time_scale: float) -> None:
        self.sender, self.rr, self.time_scale = sender, rr, time_scale

    def send(self, f: Flight, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        p, x = self.rr.params, f.extras
        if final and not f.stream and p.prepend_input:
            text = p.prompt + text
        logprob = float(np.asarray(x.get("cumulative_logprob", 0.0)).reshape(-1)[0])
        n_in = int(np.asarray(x.get("num_input_tokens", self.rr.prompt_tokens)).reshape(-1)[0])
        arrays = output_arrays(p.returns, text, reason, logprob, None, n_in, num_tokens)
        if "return_logprobs" in p.returns and "logprobs" in x:
            arrays["logprobs"] = x["logprobs"]
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
