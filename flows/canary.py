"""The canary stage as a Prefect flow: ``canary-check`` looks once at the running canary (or at the
release just promoted from one, while its holdback lasts) and exits.

One run = one look (serving.control.canary.run_check: the online rules of configs/online.yaml decide, the
gateway's release manager promotes the canary, ends it, or rolls a watched release back), published
as a markdown artifact with each rule's bound and the verdict. While undecided, a run that belongs to a
deployment schedules the deployment's next run ``canary.check_every_s`` later (a scheduled flow
run: no worker waits in between); the loop schedules the first one when it starts a canary
(:func:`schedule_check`). Register the deployment once with :func:`register_deployment`
(``alignloop canary deploy``); without one, run ``alignloop canary check`` from cron instead.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment

from flows.loop_config import admin_client, load_loop_config, resolve_path
from flows.work_pools import ensure_work_pool
from ground.config import load_config, repo_root

DEPLOYMENT = "canary-check/canary"


@task(name="check the canary", retries=2, retry_delay_seconds=5)
def check_canary(config: str, overrides: list[str], loop_config: str) -> dict[str, Any]:
    # lazy: evals.online loads numpy, scipy; ground.logstore loads sqlalchemy; serving.control.canary loads numpy, scipy
    from evals.online import OnlineConfig
    from ground.logstore import LogStore, default_url
    from serving.control.canary import run_check

    cfg = load_config(OnlineConfig, resolve_path(config), overrides)
    loop = load_loop_config(loop_config)
    store = LogStore(loop.data.get("logstore", {}).get("url") or default_url())
    try:
        with admin_client(loop) as admin:
            result = run_check(cfg, store, admin)
    finally:
        store.close()
    d = result.decision
    return {"canary": result.canary, "stage": result.stage, "action": result.action, "summary": result.summary(),
            "check_every_s": cfg.canary.check_every_s,
            "decision": d.to_dict() if d else None, "markdown": d.to_markdown() if d else None}


def artifact_key(stage: str, release_id: str) -> str:
    return f"{stage}-" + re.sub(r"[^a-z0-9-]+", "-", release_id.lower()).strip("-")[:80]


@flow(name="canary-check")
def canary_check(
    config: str = "configs/online.yaml", overrides: list[str] | None = None,
    loop_config: str = "configs/loop.yaml", follow_up: bool = True,
) -> dict[str, Any]:
    """One look at the running canary: promote, roll back, end it (live kept) or continue."""
    logger = get_run_logger()
    out = check_canary(config, overrides or [], loop_config)
    logger.info("canary check: %s", out["summary"])
    if out["canary"] is None:
        return out
    create_markdown_artifact(
        out["markdown"] + f"\naction: **{out['action']}**\n", key=artifact_key(out["stage"], out["canary"]),
        description=f"Online rules, {out['stage']} {out['canary']}: {out['action']}",
    )
    if out["action"] in ("continued", "watching") and follow_up:
        params = {"config": config, "overrides": overrides or [], "loop_config": loop_config}
        out["next_check"] = _follow_up(out["check_every_s"], params)
        logger.info("next check: %s", out["next_check"] or "none scheduled (not a deployment run)")
    return out


def _follow_up(delay_s: float, parameters: dict[str, Any]) -> str | None:
    """This run's deployment's next run, ``delay_s`` from now (None outside a deployment)."""
    if deployment.id is None:
        return None
    return schedule_check(delay_s, parameters, deployment.id)


def schedule_check(delay_s: float, parameters: dict[str, Any], name: Any = DEPLOYMENT) -> str | None:
    """Schedule a ``canary-check`` run of deployment ``name`` ``delay_s`` from now; returns the
    flow run id, None when the deployment is not registered."""
    try:
        run = run_deployment(name, parameters=parameters, timeout=0, as_subflow=False,
                             scheduled_time=datetime.now(UTC) + timedelta(seconds=delay_s))
    except ObjectNotFound:
        return None
    return str(run.id)


def register_deployment(config: str, loop_config: str, pool: str = "alignloop") -> str:
    """Create or update the ``canary-check/canary`` deployment in ``pool`` (no schedule of its
    own: runs are scheduled by the loop and by each run that continues)."""
    ensure_work_pool(pool)
    dep = canary_check.to_deployment(
        name=DEPLOYMENT.split("/")[1],
        parameters={"config": str(resolve_path(config).resolve()), "overrides": [],
                    "loop_config": str(resolve_path(loop_config).resolve())},
        description="alignloop: one look at the running canary; schedules the next while inconclusive.",
        tags=["alignloop"], job_variables={"working_dir": str(repo_root())},
    )
    return str(dep.apply(work_pool_name=pool))
