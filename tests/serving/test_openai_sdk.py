"""The official `openai` SDK against the gateway in front of a real vLLM: streaming, n, tools
(enabled per release from the model's chat template, or refused with a clear 400), and every error
as the SDK's own exception type.

Two releases of the tiny random model: the shared ``tiny_vllm`` (SmolLM2's chat template, which
has no tool-call format: tools off) and one whose chat template writes Hermes-style
``<tool_call>`` blocks, staged through the release manager (tools on, parser ``hermes``). A random
model cannot finish a tool call's arguments, so the tool test checks what the gateway owns: the
parser is chosen and the call's name and id arrive as tool-call deltas, and are logged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_gateway_support import ADMIN, KEY_A, make_config, running_gateway  # noqa: E402

from ground.logstore import LogStore  # noqa: E402
from serving.engine.vllm_server import VLLMArgs  # noqa: E402
from serving.gateway.app import create_app, serve_in_thread  # noqa: E402
from serving.gateway.upstream import Upstream  # noqa: E402
from serving.releases.manager import ReleaseManager  # noqa: E402
from serving.releases.store import ReleaseStore  # noqa: E402

pytestmark = pytest.mark.integration

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def sdk(base: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def test_sdk_streaming_n_refused_tools_and_errors(tiny_vllm, tmp_path: Path) -> None:  # noqa: ANN001
    up = Upstream(tiny_vllm.base_url, "tiny-r1", "tiny", tool_parser=tiny_vllm.tool_parser)
    assert tiny_vllm.tool_parser is None  # SmolLM2's template has no tool-call format
    with running_gateway(tmp_path, up) as (base, _, store):
        c = sdk(base)
        common = {"model": "alignloop", "messages": ASK, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
        r = c.chat.completions.create(n=2, temperature=1.0, seed=3, **common)
        assert sorted(ch.index for ch in r.choices) == [0, 1] and r.usage.completion_tokens == 12
        chunks = list(c.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True},
                                                temperature=1.0, **common))
        text, finish = {0: "", 1: ""}, {}
        for ch in chunks:
            for choice in ch.choices:
                text[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        assert finish == {0: "length", 1: "length"} and chunks[-1].usage.completion_tokens == 12
        store.flush()
        logged = store.get_exchange(chunks[0].id)["choices"]
        assert [x["content"] for x in logged] == [text[0], text[1]]

        # tools: this release has no tool-call parser, and says so
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="alignloop", messages=ASK, tools=TOOLS)
        assert e.value.code == "tools_not_enabled" and e.value.param == "tools"

        # errors as the SDK's exception types, each naming what is wrong
        with pytest.raises(openai.AuthenticationError):
            sdk(base, "sk-not-a-key").chat.completions.create(**common)
        with pytest.raises(openai.AuthenticationError):  # the admin key is not a tenant key
            sdk(base, ADMIN).chat.completions.create(**common)
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(**{**common, "model": "gpt-9"})
        assert e.value.param == "model"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**common, temperature="hot")  # type: ignore[arg-type]
        assert e.value.param == "temperature"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="alignloop", messages=[{"role": "wizard", "content": "hi"}])
        assert e.value.param == "messages[0].role"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="alignloop", messages=ASK, extra_body={"frobnicate": 1})
        assert "Unrecognized request argument" in e.value.message
        with pytest.raises(openai.BadRequestError):  # what only vLLM checks passes through as a 400
            c.chat.completions.create(model="alignloop", messages=ASK, max_tokens=500,
                                      extra_body={"min_tokens": 2000})
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="alignloop", messages=[{"role": "user", "content": "x" * 1_100_000}])
        assert e.value.status_code == 413 and "max_body_bytes" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:  # streaming requests fail the same way
            c.chat.completions.create(model="alignloop", messages=ASK, stream=True, n=100)
        assert e.value.param == "n"


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template that writes tool calls as Hermes does."""
    out = tmp_path_factory.mktemp("tool-model")
    for f in tiny_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (out / f.name).symlink_to(f.resolve())
    (out / "chat_template.jinja").write_text((Path(__file__).parent / "hermes_tools.jinja").read_text())
    return out


def test_sdk_tool_calls_through_a_release_with_a_parser(tool_model_dir: Path, data_home: Path, tmp_path: Path) -> None:
    manager = ReleaseManager(ReleaseStore(), grace_s=0, default_args=VLLMArgs(max_model_len=1024))
    store = LogStore(f"sqlite:///{tmp_path / 'logs.db'}")
    try:
        rel = manager.stage(tool_model_dir, release_id="tools")
        assert rel.status == "staged" and "tool-call parser hermes" in rel.history[-1].reason
        manager.promote("tools", force=True, reason="test")
        assert manager.current().tool_parser == "hermes"
        with serve_in_thread(create_app(make_config(), manager, store)) as base:
            c = sdk(base)
            named = {"type": "function", "function": {"name": "get_weather"}}
            chunks = list(c.chat.completions.create(model="alignloop", messages=ASK, tools=TOOLS,
                                                    tool_choice=named, max_tokens=24, stream=True))
            calls = [tc for ch in chunks for choice in ch.choices for tc in (choice.delta.tool_calls or [])]
            assert calls and calls[0].function.name == "get_weather" and calls[0].id
            # a tool round trip is a valid request (the answer itself is the random model's)
            turn = [*ASK,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
            r = c.chat.completions.create(model="alignloop", messages=turn, tools=TOOLS, max_tokens=4)
            assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
            store.flush()
            logged = store.get_exchange(chunks[0].id)["choices"][0]["tool_calls"][0]
            assert logged["function"]["name"] == "get_weather" and logged["id"] == calls[0].id
            h = {"Authorization": f"Bearer {ADMIN}"}
            assert httpx.get(base + "/healthz", headers=h).json()["upstream"]["tool_parser"] == "hermes"
    finally:
        manager.shutdown()
        store.close()
