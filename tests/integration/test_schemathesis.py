"""Property-based checks of the whole HTTP API against its own OpenAPI document (schemathesis).

Every operation in /openapi.json gets a bounded number of generated requests, valid (positive)
and invalid (negative); the server must never answer 5xx, and every answer must match the status
codes, content types and schemas the document declares. Generation is kept cheap: streaming is
switched off and token budgets are clamped, so each valid request costs a few decode steps.

The operations are driven with `operation.as_strategy()` under Hypothesis rather than
`schemathesis.pytest.from_fixture(...).parametrize()`: the lazy pytest integration of
schemathesis 4.32 touches `Function._nodeid`, which pytest 9 no longer has.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks

load_all_checks()  # the OpenAPI checks register themselves into `schemathesis.checks` when loaded
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 15
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Prometheus text format has no schema to check; /generate_stream is a stream by definition.
SKIPPED_PATHS = {"/metrics", "/generate_stream"}
# Token budgets and fan-out, wherever an API family puts them: clamped so each request stays cheap.
CLAMPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_new_tokens": 4, "num_predict": 4, "n": 2, "best_of": 2, "min_tokens": 2}


def clamp(value: Any) -> Any:
    """Recursively: `stream: true` -> false, token budgets and `n` capped (values of the wrong type are left for the server to refuse)."""
    if isinstance(value, dict):
        out = {k: clamp(v) for k, v in value.items()}
        for key, limit in CLAMPS.items():
            v = out.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and (v > limit or (key == "num_predict" and v < 0)):
                out[key] = limit  # Ollama's num_predict -1 means "until the context is full"
        if out.get("stream") is True:
            out["stream"] = False
        return out
    if isinstance(value, list):
        return [clamp(v) for v in value]
    return value


def _with_default(body: dict[str, Any], container: str | None, key: str) -> None:
    """Give the budget `key` (inside `body[container]` when given) a small value when the request leaves it out or null."""
    target = body
    if container is not None:
        if body.get(container) is None:
            body[container] = {}
        target = body[container]
    if isinstance(target, dict) and target.get(key) is None:
        target[key] = 4


def map_body(context: Any, body: Any) -> Any:
    body = clamp(body)
    path = context.operation.path if context.operation is not None else ""
    if not isinstance(body, dict):
        return body
    if path in ("/v1/chat/completions", "/v1/completions"):
        _with_default(body, None, "max_tokens")  # chat's default is "the rest of the context window"
    elif path in ("/generate", "/"):
        _with_default(body, "parameters", "max_new_tokens")  # TGI's default is 100
    elif path == "/predict":
        if body.get("max_new_tokens") is None:
            _with_default(body, None, "max_tokens")
    elif path in ("/api/chat", "/api/generate"):
        body.setdefault("stream", False)  # Ollama streams unless told otherwise
        _with_default(body, "options", "num_predict")
    return body


def map_query(context: Any, query: Any) -> Any:
    query = clamp(query)
    is_infer = context.operation is not None and context.operation.path == "/infer"
    if is_infer and isinstance(query, dict) and query.get("max_tokens") is None:
        query["max_tokens"] = 4  # the Ray Serve example's default is 512
    return query


def run_operation(operation: Any, hooks: Any, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, hooks=hooks))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
        phases=[Phase.explicit, Phase.generate], database=None, report_multiple_bugs=False,
    )
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=120)

    check()


def test_api_conforms_to_its_openapi_document(smollm2_server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{smollm2_server.url}/openapi.json")
    schema.hook(map_body)
    schema.hook(map_query)
    failures: list[str] = []
    timings: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6, "the document lists too few operations"
    for operation in operations:
        if operation.path in SKIPPED_PATHS:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            start = time.monotonic()
            try:
                run_operation(operation, schema.hooks, mode)
            except Unsatisfiable:
                continue  # nothing invalid can be made for it (no parameters, or only a free-form string)
            except Exception as e:  # collect every operation's failure, then report them together
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}):\n{e}")
            timings.append(f"{operation.method.upper()} {operation.path} {mode.value}: {time.monotonic() - start:.1f}s")
    print("\n".join(timings))
    assert not failures, "\n\n".join(failures)


def test_openapi_document_declares_the_statuses_served(smollm2_server: Server) -> None:
    import httpx

    doc = httpx.get(f"{smollm2_server.url}/openapi.json", timeout=30).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method.upper()} {path} documents a 422 the server never sends (it answers 400)"
            if "requestBody" in operation or operation.get("parameters"):
                assert "400" in responses, f"{method.upper()} {path} takes input but does not document 400"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
