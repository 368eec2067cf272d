"""Fixtures of the trust-boundary tests: one gateway per module over a scripted fake upstream.

The upstream is ``FakeUpstream`` (tests/serving/test_gateway_support.py), a stand-in for vLLM:
what the model server does is outside the properties tested here (what reaches it, what the
client gets back), and the fake records every body it receives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# --import-mode=importlib: make the corpus and the gateway test support importable
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from test_gateway_support import FakeUpstream, make_config, running_fake, running_gateway  # noqa: E402

from serving.gateway.upstream import Upstream  # noqa: E402


@pytest.fixture(scope="module")
def fake_gateway(tmp_path_factory: pytest.TempPathFactory):
    """(base_url, fake upstream, log store) of a gateway whose release has tools enabled."""
    fake = FakeUpstream()
    with running_fake(fake) as up:
        tools_on = Upstream(up.base_url, up.release_id, up.served_model, tool_parser="hermes")
        with running_gateway(tmp_path_factory.mktemp("gw"), tools_on, make_config()) as (base, _, store):
            yield base, fake, store
