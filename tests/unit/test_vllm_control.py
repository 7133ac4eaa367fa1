"""Control requests to the vLLM engine model (sleep / wake / state), parsed without Triton."""

from __future__ import annotations

import json

import pytest

from qlm_backend.contract import ContractError
from qlm_backend.vllm_engine.control import (
    Control,
    ControlReply,
    control_parameters,
    parse_control,
)


def test_a_generate_request_is_not_a_control_request() -> None:
    assert parse_control(None, None) is None
    assert parse_control("", "key") is None
    assert parse_control(json.dumps({"max_tokens": 8, "temperature": 0}), "key") is None


def test_each_operation_parses_and_the_router_builds_what_the_engine_reads() -> None:
    for op in ("sleep", "wake", "state"):
        params = json.dumps(control_parameters(op, None))  # type: ignore[arg-type]
        assert parse_control(params, None) == Control(op)  # type: ignore[arg-type]


def test_an_unknown_operation_is_refused_naming_the_parameter() -> None:
    with pytest.raises(ContractError, match="qlm_control.*one of sleep, wake, state.*'nap'"):
        parse_control(json.dumps({"qlm_control": "nap"}), None)


def test_a_restricted_server_wants_the_admin_key() -> None:
    with pytest.raises(ContractError, match="qlm_admin_key"):
        parse_control(json.dumps({"qlm_control": "sleep"}), "s3cret")
    with pytest.raises(ContractError, match="qlm_admin_key"):
        parse_control(json.dumps({"qlm_control": "sleep", "qlm_admin_key": "nope"}), "s3cret")
    ok = json.dumps(control_parameters("sleep", "s3cret"))
    assert parse_control(ok, "s3cret") == Control("sleep")


def test_the_reply_round_trips_through_its_json_text() -> None:
    r = ControlReply("wake", asleep=False, seconds=0.01234, aborted=2, in_flight=1)
    back = ControlReply.from_json(r.to_json())
    assert back == ControlReply("wake", False, 0.0123, 2, 1)
    assert json.loads(r.to_json())["state"] == "awake"
    # A reply without in_flight (an engine from before the field) still reads, as 0.
    old = '{"op": "state", "state": "asleep", "seconds": 0.0, "aborted": 0}'
    assert ControlReply.from_json(old) == ControlReply("state", True)
    with pytest.raises(ValueError, match="not a control reply"):
        ControlReply.from_json("hello")
