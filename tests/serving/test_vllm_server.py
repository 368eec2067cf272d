"""The vLLM process manager with a real server from the serving env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from openai import OpenAI

from serving.engine.vllm_server import VLLMArgs, VLLMServer, VLLMStartError

pytestmark = pytest.mark.integration


def test_tiny_model_answers_through_openai_client(tiny_vllm: VLLMServer) -> None:
    client = OpenAI(base_url=tiny_vllm.base_url, api_key="unused")
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert resp.choices[0].finish_reason in {"length", "stop"}
    assert resp.usage.completion_tokens >= 1
    assert tiny_vllm.startup_s is not None and tiny_vllm.log_path.stat().st_size > 0


def test_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VLLMStartError, match="model folder not found"):
        VLLMServer(tmp_path / "missing", log_path=tmp_path / "v.log").start()


def test_broken_model_fails_with_log_tail(tmp_path: Path) -> None:
    """A folder vLLM cannot load: start-up fails fast with the server's own words in the error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    server = VLLMServer(bad, log_path=tmp_path / "v.log", args=VLLMArgs(startup_timeout_s=240))
    with pytest.raises(VLLMStartError) as err:
        server.start()
    assert "log" in str(err.value) and len(str(err.value).splitlines()) > 2
    assert not server.alive()


def test_stop_leaves_no_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two servers at once on different ports; stopping kills the whole process group."""
    args = VLLMArgs(max_model_len=512, kv_cache_gib=1)
    server = VLLMServer(tiny_model_dir, args=args, log_path=tmp_path / "v.log", served_name="t").start()
    pid = server.proc.pid
    try:
        assert server.check_generation()
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # signal 0: does any process of the group exist?
