"""Gateway in front of a real vLLM server (tiny random Llama), real SQLite: SDK use and vLLM dying."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(
    0, str(Path(__file__).parent)
)  # --import-mode=importlib: make the support module importable
from test_gateway_support import ADMIN, KEY_A, make_config, running_gateway  # noqa: E402

from serving.gateway.upstream import Upstream  # noqa: E402

pytestmark = pytest.mark.integration


def test_sdk_through_gateway_to_real_vllm(tiny_vllm, tmp_path: Path) -> None:  # noqa: ANN001
    up = Upstream(base_url=tiny_vllm.base_url, release_id="tiny-r1", served_model="tiny")
    with running_gateway(tmp_path, up) as (base, _, store):
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
        r = c.chat.completions.create(
            model="alignloop",
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.id.startswith("chatcmpl-") and r.model == "alignloop"
        assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
        chunks = list(
            c.chat.completions.create(
                model="alignloop",
                messages=[{"role": "user", "content": "Hello!"}],
                max_completion_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert {ch.id for ch in chunks} == {chunks[0].id}
        assert chunks[-1].usage.completion_tokens == 8
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        # upstream 4xx (what only vLLM checks: min_tokens > max_tokens) passes through as an
        # OpenAI-shaped 400, and is logged
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(
                    model="alignloop",
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=4,
                    stream=stream,
                    extra_body={"min_tokens": 20},
                )
        store.flush()
        rows = {x["id"]: x for x in store.exchanges()}
        assert rows[r.id]["status"] == "ok" and rows[r.id]["release"] == "tiny-r1"
        assert (
            rows[chunks[0].id]["usage"]["completion_tokens"] == 8
            and rows[chunks[0].id]["ttft_ms"] > 0
        )
        health = httpx.get(base + "/healthz", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert health["upstream"]["ok"] is True and health["in_flight"] == 0  # no leaked slots
        assert [x["status"] for x in rows.values()].count("client_error") == 2


def test_killing_vllm_under_load_gives_503s_and_a_row_per_request(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Own server (not the shared fixture): we SIGKILL it while requests are in flight."""
    from serving.engine.vllm_server import VLLMArgs, VLLMServer

    server = VLLMServer(
        tiny_model_dir,
        args=VLLMArgs(max_model_len=1024, kv_cache_gib=1),
        log_path=tmp_path / "vllm.log",
        served_name="tiny",
    )
    server.start()
    try:
        up = Upstream(base_url=server.base_url, release_id="doomed", served_model="tiny")
        cfg = make_config(upstream={"connect_timeout_s": 1.0, "read_timeout_s": 30.0})
        with running_gateway(tmp_path, up, cfg) as (base, _, store):
            generating = threading.Event()

            def send(i: int) -> tuple[int, float]:
                t0, stream = time.perf_counter(), i % 2 == 1
                with httpx.stream(
                    "POST",
                    base + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEY_A}"},
                    timeout=60,
                    json={
                        "model": "alignloop",
                        "stream": stream,
                        "max_tokens": 400,
                        "ignore_eos": True,
                        "messages": [{"role": "user", "content": f"count {i}"}],
                    },
                ) as r:
                    for chunk in r.iter_raw():
                        if chunk and stream and r.status_code == 200:
                            generating.set()  # a stream's first tokens: vLLM is decoding
                return r.status_code, time.perf_counter() - t0

            n = 16
            with ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(send, i) for i in range(n)]
                # Kill on the first streamed tokens, not after a fixed sleep: on a fast machine
                # all 16 answers once finished inside the sleep and nothing was in flight.
                assert generating.wait(30), "no stream produced a token within 30 s"
                os.killpg(server.proc.pid, signal.SIGKILL)
                results = [f.result(timeout=45) for f in futures]
            after = [send(100 + i) for i in range(4)]  # upstream is gone: fast 503s
            statuses = [s for s, _ in results + after]
            # non-stream in flight -> 503; streams already answered 200 and end with an error event
            assert all(s in (200, 503) for s in statuses), statuses
            assert all(s == 503 for s, _ in after) and all(t < 3 for _, t in after)
            store.flush()
            rows = list(store.exchanges())
            assert len(rows) == n + len(after)
            assert sum(r["status"] == "upstream_error" for r in rows) >= len(after) + 1
    finally:
        server.stop()
