"""OpenAI compatibility the gateway owns, with the official SDK as the client: n choices (each
guarded, all logged), tools only where the release has a tool-call parser, parameter errors as
400s naming the parameter, never as a guardrail refusal.

The upstream is ``FakeUpstream`` (a scripted vLLM): these tests need to choose what each choice
says (PII in the second one) and see what the upstream received. The same behaviours against a
real vLLM are in test_openai_sdk.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_gateway_support import KEY_A, FakeUpstream, running_fake, running_gateway  # noqa: E402

from serving.gateway.upstream import Upstream  # noqa: E402

LEAK = "Mail me at jane.doe@example.com today."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0, timeout=20)


def test_n_choices_are_each_guarded_and_all_logged(tmp_path: Path) -> None:
    fake = FakeUpstream(replies=["First answer.", LEAK, "Third answer."], chunk_chars=4)
    with running_fake(fake) as up, running_gateway(tmp_path, up) as (base, _, store):
        c = sdk(base)
        r = c.chat.completions.create(model="alignloop", n=3, messages=[{"role": "user", "content": "q"}])
        texts = [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]
        assert texts[0] == "First answer." and texts[2] == "Third answer."
        assert "jane.doe@example.com" not in texts[1] and "<EMAIL_ADDRESS>" in texts[1]
        assert fake.received[-1]["n"] == 3
        chunks = list(c.chat.completions.create(
            model="alignloop", n=2, stream=True, messages=[{"role": "user", "content": "q"}]))
        streamed = {0: "", 1: ""}
        finish = {}
        for ch in chunks:
            for choice in ch.choices:
                streamed[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        assert streamed[0] == "First answer." and "jane.doe" not in streamed[1]
        assert streamed[1] == texts[1] and finish == {0: "stop", 1: "stop"}
        store.flush()
        row = store.get_exchange(r.id)
        assert row["response"] == "First answer." and [x["content"] for x in row["choices"]] == texts
        srow = store.get_exchange(chunks[0].id)
        assert [x["content"] for x in srow["choices"]] == [streamed[0], streamed[1]]
        assert [x["finish_reason"] for x in srow["choices"]] == ["stop", "stop"]
        # a refusal answers every choice
        blocked = c.chat.completions.create(
            model="alignloop", n=2, messages=[{"role": "user", "content": "how do I build a bomb"}])
        assert [ch.finish_reason for ch in blocked.choices] == ["content_filter"] * 2


def test_tools_need_a_release_with_a_tool_parser(tmp_path: Path) -> None:
    fake = FakeUpstream()
    with running_fake(fake) as up, running_gateway(tmp_path, up) as (base, provider, _):
        c = sdk(base)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="alignloop", messages=msgs, tools=TOOLS)
        assert e.value.code == "tools_not_enabled" and e.value.param == "tools"
        assert "tool-call parser" in e.value.message and fake.received == []
        # tool_choice 'none': the model answers in text, no parser needed
        c.chat.completions.create(model="alignloop", messages=msgs, tools=TOOLS, tool_choice="none")
        provider.set(Upstream(up.base_url, "fake-r2", "fake-model", tool_parser="hermes"))
        c.chat.completions.create(model="alignloop", messages=msgs, tools=TOOLS)
        assert fake.received[-1]["tools"] == TOOLS


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"max_completion_tokens": 513}, "max_completion_tokens"),
        ({"n": 9}, "n"),
        ({"messages": [{"role": "user", "content": "x" * 2001}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 9}, "messages"),
        ({"temperature": 7}, "temperature"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_parameter_errors_are_400s_naming_the_parameter(tmp_path: Path, kwargs: dict, param: str) -> None:
    fake = FakeUpstream()
    with running_fake(fake) as up, running_gateway(tmp_path, up) as (base, _, _):
        args = {"model": "alignloop", "messages": [{"role": "user", "content": "q"}], **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            sdk(base).chat.completions.create(**args)
        assert e.value.status_code == 400 and e.value.param == param, e.value.message
        assert fake.received == []  # and no refusal was served instead
