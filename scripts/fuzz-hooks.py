# Schemathesis hooks for scripts/fuzz-api.sh (loaded through SCHEMATHESIS_HOOKS).
#
# The hook `flatmap_body` names a served model in two thirds of the generated `POST /v1/jobs` and
# `POST /v1/embeddings` bodies (and gives half of those an input of its task), so
# that the validation behind the model lookup (input, metadata, deadline_s, webhook, …) and the
# routes of real jobs (GET, cancel, events, through the links Schemathesis infers) are reached.
#
# The check `kiln_error_shape`: every 4xx or 5xx answer of the gateway is JSON
# (`Content-Type: application/json`) shaped `{"error": {"code": <stable code>, "message": <string>}}`;
# on the predictions API also with the problem details Replicate's clients read (`title`, `status`
# equal to the answer's, `detail` equal to the message) and nothing else.
# The stable codes are read from `ErrorCode::as_str` in proto/src/error.rs, the one table of them,
# so a code added there is accepted here without an edit.

import json
import os
import re

import schemathesis
from hypothesis import strategies as st

_ERROR_RS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto", "src", "error.rs")


def _stable_codes() -> frozenset:
    with open(_ERROR_RS, encoding="utf-8") as f:
        source = f.read()
    body = re.search(r"fn as_str\(self\) -> &'static str \{(.*?)\n    \}", source, re.S)
    if body is None:
        raise RuntimeError(f"no `fn as_str` in {_ERROR_RS}")
    codes = frozenset(re.findall(r'Self::\w+ => "([a-z_]+)"', body.group(1)))
    if len(codes) < 10:
        raise RuntimeError(f"read only {sorted(codes)} from {_ERROR_RS}")
    return codes


STABLE_CODES = _stable_codes()

# Answers at an error status that are not errors of a request: `/readyz` says why it is not ready
# in its own status document (`{"status": "not_ready", "checks": …}`), for probes and operators.
NOT_ERRORS = {("GET", "/readyz")}


# The embedding model only: its jobs take milliseconds, where a fuzzed terrain job could hold the
# worker (and the CPU the fuzzer shares with it) for minutes.
SERVED_MODEL = "all-minilm-l6-v2"


@schemathesis.hook
def flatmap_body(ctx, body):
    if ctx.operation is not None and ctx.operation.label == "POST /v1/predictions" and isinstance(body, dict):
        return st.one_of(
            st.just(body),
            st.text(max_size=200).map(
                lambda text: {**body, "version": f"kiln/{SERVED_MODEL}", "input": {"text": text}}),
        )
    label = None if ctx.operation is None else ctx.operation.label
    if label not in ("POST /v1/jobs", "POST /v1/embeddings") or not isinstance(body, dict):
        return st.just(body)
    # Unchanged, with the served model, or with the served model and an input of its task.
    if label == "POST /v1/embeddings":
        inputs = st.one_of(st.text(max_size=200), st.lists(st.text(max_size=100), min_size=1, max_size=4))
    else:
        inputs = st.text(max_size=200).map(lambda text: {"text": text})
    return st.one_of(
        st.just(body),
        st.just({**body, "model": SERVED_MODEL}),
        inputs.map(lambda input: {**body, "model": SERVED_MODEL, "input": input}),
    )


def _is_prediction_path(path):
    return path == "/v1/predictions" or path.startswith("/v1/predictions/") or (
        path.startswith("/v1/models/") and path.endswith("/predictions"))


@schemathesis.check
def kiln_error_shape(ctx, response, case):
    """Every 4xx/5xx is `application/json` with `{"error": {"code": <stable>, "message": str}}`."""
    if response.status_code < 400:
        return None
    if (case.method.upper(), case.operation.path) in NOT_ERRORS:
        return None
    where = f"{case.method.upper()} {case.formatted_path} answered {response.status_code}"
    content_type = ";".join(response.headers.get("content-type", [])).split(";")[0].strip().lower()
    if content_type != "application/json":
        raise AssertionError(f"{where} with Content-Type {content_type or '(none)'!r}, not application/json")
    if case.method.upper() == "HEAD" and not response.content:
        return None  # a HEAD answer has no body; its headers are those of the GET's error
    try:
        body = json.loads(response.content)
    except ValueError as e:
        raise AssertionError(f"{where} with a body that is not JSON ({e}): {response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    shape = {"error"}
    if _is_prediction_path(case.operation.path):
        shape = {"error", "title", "status", "detail"}
    if not isinstance(error, dict) or set(body) != shape:
        raise AssertionError(f'{where} with a body not shaped {sorted(shape)}: {body!r:.300}')
    if "status" in shape and (body["status"] != response.status_code or body["detail"] != error.get("message")
                              or not isinstance(body["title"], str)):
        raise AssertionError(f"{where} with problem details that do not match it: {body!r:.300}")
    code, message = error.get("code"), error.get("message")
    if code not in STABLE_CODES:
        raise AssertionError(f"{where} with error code {code!r}, not one of ErrorCode::as_str")
    if not isinstance(message, str) or not message:
        raise AssertionError(f"{where} with error message {message!r}, not a non-empty string")
    return None
