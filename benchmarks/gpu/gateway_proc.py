"""Run the project's gateway (serving.gateway.app.create_app) in its own process in front of one vLLM.

    python3 benchmarks/gpu/gateway_proc.py --upstream http://127.0.0.1:P/v1 --served NAME \
        --port 8000 --guardrails guardrails|noguard --db /tmp/gw.db

The config is configs/gateway.yaml (demo key ``sk-alignloop-demo``), with the in-flight limits
raised to 1024 so a concurrency-256 benchmark measures the proxy, not its 429 backpressure;
``noguard`` empties both guardrail chains to split the guardrails' cost from the proxy's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--served", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--guardrails", choices=["guardrails", "noguard"], default="guardrails")
    ap.add_argument("--db", required=True)
    a = ap.parse_args()

    import uvicorn

    from ground.logstore import LogStore
    from serving.gateway.app import create_app
    from serving.gateway.config import GatewayConfig
    from serving.gateway.upstream import StaticUpstream, Upstream

    raw = yaml.safe_load((ROOT / "configs" / "gateway.yaml").read_text())
    for t in raw["tenants"]:
        t["max_in_flight"] = 1024
    raw["limits"]["max_in_flight"] = 1024
    raw["upstream"]["max_connections"] = 1024
    if a.guardrails == "noguard":
        raw["guardrails"]["input"], raw["guardrails"]["output"] = [], []
    raw["log_store_url"] = f"sqlite:///{a.db}"
    cfg = GatewayConfig.model_validate(raw)
    up = StaticUpstream(
        Upstream(base_url=a.upstream, release_id="gpu-bench", served_model=a.served)
    )
    app = create_app(cfg, up, LogStore(cfg.log_store_url))
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
