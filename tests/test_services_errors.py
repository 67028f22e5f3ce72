"""The service error hierarchy and the mapping of arbitrary exceptions onto it."""

from __future__ import annotations

import asyncio
import logging
import pickle

import pytest
from pydantic import BaseModel, ValidationError

from seedoss.engine import RequestError
from seedoss.services import errors
from seedoss.services.classification import ClassificationRequest
from seedoss.services.schemas import parse

EXPECTED = {  # class: (HTTP status, gRPC code, OpenAI type)
    errors.InvalidRequest: (400, "INVALID_ARGUMENT", "invalid_request_error"),
    errors.Unauthenticated: (401, "UNAUTHENTICATED", "authentication_error"),
    errors.NotFound: (404, "NOT_FOUND", "not_found_error"),
    errors.PayloadTooLarge: (413, "INVALID_ARGUMENT", "invalid_request_error"),
    errors.Unprocessable: (422, "INVALID_ARGUMENT", "invalid_request_error"),
    errors.Overloaded: (429, "RESOURCE_EXHAUSTED", "overloaded_error"),
    errors.Cancelled: (499, "CANCELLED", "cancelled_error"),
    errors.InternalError: (500, "INTERNAL", "internal_error"),
    errors.Unavailable: (503, "UNAVAILABLE", "service_unavailable_error"),
}
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}


@pytest.mark.parametrize("cls", EXPECTED)
def test_status_codes(cls):
    assert issubclass(cls, errors.ServiceError)
    assert (cls.http_status, cls.grpc_code, cls.error_type) == EXPECTED[cls]
    assert cls.grpc_code in GRPC_CODES


def test_openai_body():
    error = errors.InvalidRequest("top_k: must be at least 1", param="top_k", code="bad_top_k")
    assert error.to_openai_body() == {"error": {"message": "top_k: must be at least 1",
                                                "type": "invalid_request_error", "param": "top_k",
                                                "code": "bad_top_k"}}
    assert str(error) == error.message
    assert errors.NotFound("no such model").to_openai_body()["error"] == {
        "message": "no such model", "type": "not_found_error", "param": None, "code": None}


@pytest.mark.parametrize("error", [
    errors.InvalidRequest("bad top_k", param="top_k", code="x"),
    errors.Overloaded("queue full", retry_after=2.5),
    errors.InternalError(),
])
def test_errors_survive_pickling(error):
    """Ray carries errors between replicas by pickling them."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__ and copy.to_openai_body() == error.to_openai_body()


def test_retry_after():
    assert errors.Overloaded("busy", retry_after=1.2).http_headers() == {"Retry-After": "2"}
    assert errors.Overloaded("busy").http_headers() == {}
    unavailable = errors.Unavailable("busy", retry_after=1.2)
    assert unavailable.retry_after == 1.2
    assert unavailable.http_headers() == {"Retry-After": "2", "X-Error-Id": unavailable.error_id}
    assert errors.InvalidRequest("x").http_headers() == {}


def test_server_errors_carry_an_id_the_log_shares(caplog):
    """Every 5xx has an id in its body and headers; 4xx bodies keep OpenAI's four fields."""
    assert set(errors.InvalidRequest("x").to_openai_body()["error"]) == {"message", "type", "param", "code"}
    for error in (errors.InternalError(), errors.Unavailable("down")):
        body = error.to_openai_body()["error"]
        assert len(body["id"]) == 16 and body["id"] == error.error_id == error.http_headers()["X-Error-Id"]
    cause = RuntimeError("Actor ActorID(5f2a) on node 10.0.0.7 pid=4242 died: /srv/models/x.safetensors")
    with caplog.at_level(logging.ERROR, logger="seedoss.services.errors"):
        error = errors.server_error(errors.Unavailable("a replica is unavailable; retry shortly"), cause)
    assert "10.0.0.7" not in str(error.to_openai_body()) and error.error_id in caplog.text
    assert "10.0.0.7" in caplog.text  # the full detail is in the log under the id


def test_validation_error_names_the_field():
    class Inner(BaseModel):
        n: int

    class Outer(BaseModel):
        items: list[Inner]

    with pytest.raises(ValidationError) as exc:
        Outer.model_validate({"items": [{"n": 1}, {"n": "x"}]})
    error = errors.from_exception(exc.value)
    assert isinstance(error, errors.InvalidRequest) and error.param == "items.1.n"
    assert error.message.startswith("items.1.n: ")

    with pytest.raises(errors.InvalidRequest) as err:
        parse(ClassificationRequest, {"inputs": ["ok"], "top_k": -2})
    assert err.value.param == "top_k" and "greater than or equal to 1" in err.value.message


def test_engine_request_error_and_bad_utf8():
    error = errors.from_exception(RequestError("max_tokens exceeds the context", field="max_tokens"))
    assert isinstance(error, errors.InvalidRequest) and error.param == "max_tokens"
    assert error.message == "max_tokens exceeds the context"
    try:
        b"\xff\xfe".decode("utf-8")
    except UnicodeDecodeError as exc:
        error = errors.from_exception(exc)
    assert isinstance(error, errors.InvalidRequest) and "UTF-8" in error.message


def test_service_errors_and_cancellation_pass_through():
    original = errors.Overloaded("queue full", retry_after=3)
    assert errors.from_exception(original) is original
    assert isinstance(errors.from_exception(asyncio.CancelledError()), errors.Cancelled)


def test_unexpected_errors_leak_nothing(caplog):
    secret = "/srv/models/secret.safetensors: CUDA out of memory at 0xdeadbeef"
    try:
        raise RuntimeError(secret)
    except RuntimeError as exc:
        with caplog.at_level(logging.ERROR, logger="seedoss.services.errors"):
            error = errors.from_exception(exc)
    assert isinstance(error, errors.InternalError)
    body = error.to_openai_body()["error"]
    assert body["type"] == "internal_error" and body["message"] == f"internal error (id {error.error_id})"
    assert secret not in repr(error.to_openai_body()) and "Traceback" not in body["message"]
    # the details go to the log under the same id
    assert error.error_id in caplog.text and secret in caplog.text
    assert errors.from_exception(ValueError("x")).error_id != error.error_id
