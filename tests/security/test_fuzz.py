"""Every malformed chat or feedback body gets a 4xx in OpenAI's error shape within a second, and
nothing of it reaches the model server (the fake upstream records what it receives).

Three layers: the hand-written corpus (tests/security/corpus.py), a sweep that puts every wrong
JSON type at every path of a valid request, and Hypothesis (fixed seed, fixed example budget, so
`make test` spends seconds here) generating arbitrary JSON at arbitrary paths: whatever it makes,
the answer is a 200 that went upstream or a 4xx in OpenAI's shape that did not, never a 5xx.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from corpus import (
    CHAT_CORPUS,
    FEEDBACK_CORPUS,
    VALID_CHAT,
    VALID_FEEDBACK,
    _paths,
    _set,
    body,
    wrong_type_cases,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_support import KEY_A

HEADERS = {"Authorization": f"Bearer {KEY_A}", "content-type": "application/json"}
FUZZ = settings(
    max_examples=100, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _post(base: str, path: str, content: bytes, headers: dict[str, str] = HEADERS) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.post(base + path, content=content, headers=headers, timeout=10)
    return r, time.perf_counter() - t0


def _openai_error(r: httpx.Response, seconds: float, what: str) -> dict:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert seconds < 1.0, (what, seconds)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, (what, err)
    assert isinstance(err["message"], str) and err["message"], what
    return err


def test_valid_exemplar_is_accepted(fake_gateway) -> None:  # noqa: ANN001
    """The sweep's base request is valid: its mutations fail because of the mutation."""
    base, fake, _ = fake_gateway
    r, _ = _post(base, "/v1/chat/completions", body(VALID_CHAT))
    assert r.status_code == 200, r.text
    sent = fake.received[-1]
    assert "metadata" not in sent and sent["tools"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(("name", "raw", "param"), CHAT_CORPUS, ids=[c[0] for c in CHAT_CORPUS])
def test_chat_corpus(fake_gateway, name: str, raw: bytes, param: str | None) -> None:  # noqa: ANN001
    base, fake, _ = fake_gateway
    before = len(fake.received)
    r, seconds = _post(base, "/v1/chat/completions", raw)
    err = _openai_error(r, seconds, name)
    if param is not None:
        assert err["param"] == param, (name, err)
    assert len(fake.received) == before, f"{name}: reached the model server"


def test_every_wrong_type_at_every_path(fake_gateway) -> None:  # noqa: ANN001
    base, fake, _ = fake_gateway
    before = len(fake.received)
    cases = list(wrong_type_cases())
    assert len(cases) > 150  # the sweep covers the whole exemplar
    for name, raw, path in cases:
        r, seconds = _post(base, "/v1/chat/completions", raw)
        err = _openai_error(r, seconds, name)
        parent = path[: max(path.rfind("."), path.rfind("["))]  # a key left out: its object
        assert err["param"] and (
            path.startswith(err["param"]) or err["param"].startswith(path if "=" in name else parent)
        ), (name, err)
    assert len(fake.received) == before


def test_wrong_content_type_is_415(fake_gateway) -> None:  # noqa: ANN001
    base, fake, _ = fake_gateway
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        for path in ("/v1/chat/completions", "/v1/feedback"):
            r, seconds = _post(base, path, body(VALID_CHAT), {**HEADERS, "content-type": ctype})
            assert _openai_error(r, seconds, ctype)["code"] == "unsupported_media_type"
            assert r.status_code == 415


@pytest.fixture(scope="module")
def served_id(fake_gateway) -> str:  # noqa: ANN001
    base, _, _ = fake_gateway
    r = httpx.post(base + "/v1/chat/completions", headers=HEADERS,
                   json={"model": "alignloop", "messages": [{"role": "user", "content": "hi"}]})
    return r.json()["id"]


@pytest.mark.parametrize(("name", "doc", "param"), FEEDBACK_CORPUS, ids=[c[0] for c in FEEDBACK_CORPUS])
def test_feedback_corpus(fake_gateway, served_id: str, name: str, doc, param: str | None) -> None:  # noqa: ANN001
    base, _, store = fake_gateway
    if isinstance(doc, dict) and doc.get("request_id") == "r":
        doc = {**doc, "request_id": served_id}  # a real id: only the body's fault remains
        if (doc.get("preference") or {}).get("other_request_id") == "r":
            doc["preference"] = {**doc["preference"], "other_request_id": served_id}
    raw = doc if isinstance(doc, bytes) else body(doc)
    before = len(list(store.feedback_events()))
    r, seconds = _post(base, "/v1/feedback", raw)
    err = _openai_error(r, seconds, name)
    assert r.status_code == 400, (name, r.text)
    if param is not None:
        assert err["param"] == param, (name, err)
    assert len(list(store.feedback_events())) == before


def test_preference_between_two_identical_answers_is_refused(fake_gateway, served_id: str) -> None:  # noqa: ANN001
    """The fake upstream says the same words every time: preferring one of two equal answers
    carries no information (issue 23)."""
    base, _, store = fake_gateway
    r = httpx.post(base + "/v1/chat/completions", headers=HEADERS,
                   json={"model": "alignloop", "messages": [{"role": "user", "content": "again"}]})
    before = len(list(store.feedback_events()))
    doc = {"request_id": served_id, "preference": {"other_request_id": r.json()["id"], "preferred": "this"}}
    r, seconds = _post(base, "/v1/feedback", body(doc))
    err = _openai_error(r, seconds, "identical answers")
    assert r.status_code == 400 and err["param"] == "preference.other_request_id", err
    assert err["code"] == "no_information"
    assert len(list(store.feedback_events())) == before


# -- Hypothesis ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", "user", "assistant", "tool", "function", "auto", "text", "image_url", "x" * 3000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CHAT_PATHS = [p for p, _ in _paths(VALID_CHAT) if p]


@FUZZ
@given(path=st.sampled_from(CHAT_PATHS), value=json_values, extra_key=st.none() | st.text(max_size=8))
def test_any_value_anywhere_in_a_chat_request(fake_gateway, path: str, value, extra_key) -> None:  # noqa: ANN001
    base, fake, _ = fake_gateway
    doc = _set(VALID_CHAT, path, value)
    if extra_key is not None:
        doc[extra_key] = value
    raw = json.dumps(doc, allow_nan=True).encode()
    before = len(fake.received)
    r, seconds = _post(base, "/v1/chat/completions", raw)
    if r.status_code == 200:
        assert len(fake.received) == before + 1 and seconds < 1.0
        return
    _openai_error(r, seconds, f"{path}={value!r}")
    assert len(fake.received) == before, "a refused request reached the model server"


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_as_a_chat_request(fake_gateway, raw: bytes) -> None:  # noqa: ANN001
    base, fake, _ = fake_gateway
    before = len(fake.received)
    r, seconds = _post(base, "/v1/chat/completions", raw)
    _openai_error(r, seconds, repr(raw[:60]))
    assert len(fake.received) == before


@FUZZ
@given(
    kind=st.sampled_from(VALID_FEEDBACK),
    path=st.sampled_from(["request_id", "rating", "rating.score", "rating.thumbs", "edit", "edit.text",
                          "preference", "preference.better_text", "comment", "extra"]),
    value=json_values,
)
def test_any_value_anywhere_in_feedback(fake_gateway, served_id: str, kind, path: str, value) -> None:  # noqa: ANN001
    base, _, store = fake_gateway
    doc = {"request_id": served_id, **kind}
    head, _, leaf = path.partition(".")
    if leaf and isinstance(doc.get(head), dict):
        doc[head] = {**doc[head], leaf: value}
    else:
        doc[head] = value
    before = len(list(store.feedback_events()))
    r, seconds = _post(base, "/v1/feedback", json.dumps(doc, allow_nan=True).encode())
    if r.status_code == 200:
        assert r.json()["object"] == "feedback" and seconds < 1.0
        return
    _openai_error(r, seconds, f"{path}={value!r}")
    assert len(list(store.feedback_events())) == before
