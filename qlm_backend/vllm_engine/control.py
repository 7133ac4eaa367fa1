"""Engine control requests: sleep, wake and state of a running vLLM engine, without Triton.

Why a request and not Triton's model control API: a load of a model that is already loaded (with
or without a config override) replaces its instance, that is a new stub and a new engine, which is
a cold start; a wake has to reach the engine that is asleep. So the router sends the engine model
an ordinary generate request whose request parameters carry `qlm_control` ("sleep", "wake",
"state"); the engine answers once (FINAL) with a JSON object in `text_output`:
{"state": "asleep" | "awake", "op": ..., "seconds": ..., "aborted": n}. Over HTTP:

    curl localhost:8000/v2/models/<engine>/generate \
         -d '{"text_input": "-", "qlm_control": "state"}'

Sleep is vLLM's level 1 (weights kept in host memory, KV cache dropped, prefix cache reset); the
requests still running are ended with UNAVAILABLE. While asleep the engine refuses generation with
UNAVAILABLE. On the CPU build vLLM's worker ignores sleep (it logs "sleep mode is not supported on
CPU"): the engine's scheduler still pauses and its prefix cache is reset, but weights and KV memory
stay where they are (docs/engines.md).

When the server runs with a model-repository admin key ($QLM_ADMIN_KEY, set by qlm-serve), a
control request must carry it as the request parameter `qlm_admin_key`: sleeping an engine is as
strong as unloading it.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Literal, cast, get_args

from qlm_backend.contract import ContractError

ControlOp = Literal["sleep", "wake", "state"]
CONTROL_PARAMETER = "qlm_control"
KEY_PARAMETER = "qlm_admin_key"


@dataclass(frozen=True)
class Control:
    op: ControlOp


def parse_control(parameters_json: str | None, admin_key: str | None) -> Control | None:
    """The control request carried by these request parameters, or None for a generate request.
    Raises ContractError naming the parameter when it is malformed or the key does not match."""
    if not parameters_json or CONTROL_PARAMETER not in parameters_json:
        return None
    try:
        params = json.loads(parameters_json)
    except json.JSONDecodeError:
        return None  # not ours to judge: the generate path reports bad parameters
    if not isinstance(params, dict) or CONTROL_PARAMETER not in params:
        return None
    op = params[CONTROL_PARAMETER]
    if op not in get_args(ControlOp):
        raise ContractError(
            CONTROL_PARAMETER, f"must be one of {', '.join(get_args(ControlOp))}, got {op!r}"
        )
    if admin_key:
        given = params.get(KEY_PARAMETER)
        if not isinstance(given, str) or not hmac.compare_digest(given, admin_key):
            raise ContractError(KEY_PARAMETER, "is missing or wrong (the server restricts control)")
    return Control(cast(ControlOp, op))


def control_parameters(op: ControlOp, admin_key: str | None) -> dict[str, str]:
    """The request parameters of a control request (the router's side)."""
    params: dict[str, str] = {CONTROL_PARAMETER: op}
    if admin_key:
        params[KEY_PARAMETER] = admin_key
    return params


@dataclass(frozen=True)
class ControlReply:
    op: ControlOp
    asleep: bool
    seconds: float = 0.0
    aborted: int = 0
    # Generate requests the engine holds once the operation is done (0 after a sleep): a model
    # whose unload waits on them shows them here.
    in_flight: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "op": self.op,
                "state": "asleep" if self.asleep else "awake",
                "seconds": round(self.seconds, 4),
                "aborted": self.aborted,
                "in_flight": self.in_flight,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ControlReply:
        try:
            d = json.loads(text)
            return cls(
                d["op"],
                d["state"] == "asleep",
                float(d["seconds"]),
                int(d["aborted"]),
                int(d.get("in_flight", 0)),  # absent from an engine older than the field
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a control reply: {text[:200]!r} ({e})") from None


__all__ = [
    "CONTROL_PARAMETER",
    "KEY_PARAMETER",
    "Control",
    "ControlOp",
    "ControlReply",
    "control_parameters",
    "parse_control",
]
