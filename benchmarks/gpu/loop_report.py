"""What one `alignloop run` did, read from its data dir: stage times, releases, decision, kernel.

    .venv/bin/python benchmarks/gpu/loop_report.py ALIGNLOOP_HOME [--json OUT.json]

Reads the newest run folder (each stage's result.json), every release's release.json (variant,
kernel, placement, start-up time from its staging record), loop-result.json (decision, promotion,
what each variant serves) and the phase timings benchmarks/gpu/loop_gpu.sh recorded. Prints the
markdown BENCHMARKS.md shows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

STAGES = ("data", "sft", "dpo", "merge", "quantize")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(home: Path) -> dict:
    runs = sorted((p for p in (home / "runs").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    run = runs[-1] if runs else None
    out: dict = {"home": str(home), "run": str(run) if run else None, "stages": {}, "evals": {}, "releases": []}
    if run:
        for name in STAGES:
            r = _json(run / name / "result.json")
            if r:
                out["stages"][name] = {k: r.get(k) for k in ("wall_s", "train_s", "steps", "tokens_per_s",
                                                            "processes", "device", "scheme", "quantize_s",
                                                            "skipped", "counts") if k in r}
        for ev in sorted(run.glob("evals-*")):
            r = _json(ev / "result.json")
            if r:
                out["evals"][ev.name.removeprefix("evals-")] = {"seconds": r.get("seconds"),
                                                                "release_id": r.get("release_id")}
        out["result"] = _json(run / "loop-result.json")
    for rel_file in sorted((home / "releases").glob("*/release.json")):
        rel = _json(rel_file)
        staged = next((e for e in rel.get("history", []) if e["status"] in ("staged", "failed")), {})
        m = re.search(r"after (\d+)s", staged.get("reason", ""))
        out["releases"].append({
            "release_id": rel["release_id"], "status": rel.get("status"),
            "variant": rel.get("source", {}).get("variant") or rel.get("source", {}).get("kind"),
            "kernel": rel.get("source", {}).get("kernel", "default"),
            "env": rel.get("vllm_args", {}).get("env", {}), "placement": rel.get("placement"),
            "startup_s": int(m.group(1)) if m else None,
        })
    timings = home / "loop-gpu-timings.jsonl"
    if timings.is_file():
        out["phases"] = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    return out


def markdown(r: dict) -> str:
    lines = [f"Run folder: `{r.get('run')}`", "", "| phase / stage | seconds | notes |", "|---|---|---|"]
    for p in r.get("phases", []):
        lines.append(f"| {p['phase']} | {p['seconds']} | exit {p['exit']} |")
    for name, s in r["stages"].items():
        notes = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("wall_s",) and v is not None)
        lines.append(f"| {name} | {s.get('wall_s')} | {notes} |")
    for variant, e in r["evals"].items():
        secs = e.get("seconds")
        if isinstance(secs, dict):  # per suite (quality, safety, perf): their sum, and each
            total, per = round(sum(secs.values()), 1), ", ".join(f"{k} {v}" for k, v in secs.items())
        else:
            total, per = secs, ""
        lines.append(f"| evals: {variant} | {total} | release {e.get('release_id')}{'; ' + per if per else ''} |")
    lines += ["", "| release | variant | kernel | status | GPUs (share) | start-up s |", "|---|---|---|---|---|---|"]
    for rel in r["releases"]:
        p = rel.get("placement") or {}
        where = f"{p.get('devices')} ({p.get('share')})" if p.get("devices") else "CPU"
        lines.append(f"| {rel['release_id']} | {rel['variant']} | {rel['kernel']} | {rel['status']} | {where} | "
                     f"{rel['startup_s']} |")
    res = r.get("result") or {}
    if res:
        winner = res.get("winner")
        served = (res.get("served") or {}).get(winner or "", {})
        lines += ["", f"Decision: **{res.get('decision')}**",
                  f"Promoted: {res.get('promotion')}",
                  f"Applied: scheme {served.get('scheme')}, kernel {served.get('kernel')}" if winner else "Applied: nothing (live kept)",
                  f"Served per variant: {res.get('served')}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    r = collect(a.home)
    if a.json:
        a.json.write_text(json.dumps(r, indent=1, default=str))
    print(markdown(r))


if __name__ == "__main__":
    main()
