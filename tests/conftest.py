"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, and a real vLLM server for it.

The tiny model keeps tests fast (2 layers, hidden 128) while staying servable by vLLM's CPU
attention, which rejects small heads (head_dim 16 starts, reports healthy, then dies at the first
request; docs/PLATFORM.md): two heads of 64.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# -- hermetic: the suite never reads or writes the user's data dir -----------------------------
# Without ALIGNLOOP_HOME the data dir is ./.alignloop, the checkout's: a user's keys.yaml there
# (`alignloop keys new`) was loaded by every gateway a test built, and stages wrote their
# fingerprint cache into it. Set here, at the root conftest's import, before any test module or
# process the suite starts can read it; tests that want their own still set it (``data_home``).
USER_HOME = REPO / ".alignloop"
_USER_HOME_KEY = pytest.StashKey[dict]()  # its listing when the session started
SESSION_HOME = Path(tempfile.mkdtemp(prefix="alignloop-test-home-"))
os.environ["ALIGNLOOP_HOME"] = str(SESSION_HOME)
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)
# One key secret for the whole session and the processes it starts, so key hashes made by a test
# (serving.gateway.config.hash_key) match in every gateway it starts, whatever its data dir. Set,
# not defaulted: the user's own secret must not decide what the tests' key hashes are.
os.environ["ALIGNLOOP_KEY_SECRET"] = "test-key-secret-" + "0" * 32
# The user's keys and gateway in the environment are not the suite's (tests that need one set it).
for _var in ("ALIGNLOOP_ADMIN_KEY", "ALIGNLOOP_API_KEY", "ALIGNLOOP_GATEWAY_URL"):
    os.environ.pop(_var, None)
# Test artifacts that are expensive to rebuild (the embedded model) persist across runs here.
TEST_HOME = Path(os.environ.get("ALIGNLOOP_TEST_HOME", REPO / ".alignloop-test"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, materialized once per checkout (about 25 s the first time)."""
    from training.base_model import materialize

    return Path(materialize(TEST_HOME / "models" / "base").path)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 128, 2 heads of 64) with SmolLM2's tokenizer + chat template."""
    out = TEST_HOME / "models" / "tiny-llama-v2"  # v2: eos/pad <|im_end|> (base_model.FORMAT 2)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def tiny_vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM server (serving env) for the tiny model, shared by a test session."""
    from serving.engine.vllm_server import VLLMArgs, VLLMServer

    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    args = VLLMArgs(max_model_len=1024, kv_cache_gib=1)
    with VLLMServer(tiny_model_dir, args=args, log_path=log_path, served_name="tiny") as server:
        yield server


@pytest.fixture
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data dir for one test (``ALIGNLOOP_HOME``)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ALIGNLOOP_HOME", str(home))
    return home


@pytest.fixture
def write_decision_files():
    """Write what the loop's eval stages leave in a run folder (result.json + per-item outcomes
    for a candidate and the baseline copy of live), so the release manager can recompute a
    decision from them. ``better`` items where only the candidate succeeds make it pass a
    superiority rule; ``worse`` items where only live succeeds make it fail one."""
    import json as _json

    def write(data_home: Path, run: str, variant: str, release_id: str, live_model_dir: str | Path,
              better: int = 30, worse: int = 0, n: int = 60) -> dict:
        run_dir = data_home / "runs" / run
        for name, rid, model, gain in (("baseline", "copy-of-live", live_model_dir, 0),
                                       (variant, release_id, "candidate-model", 1)):
            stage = run_dir / f"evals-{name}"
            (stage / "output").mkdir(parents=True, exist_ok=True)
            rows = []
            for i in range(n):
                live_ok = 1.0 if i >= better else 0.0
                value = (1.0 if i < better else (0.0 if i >= n - worse else live_ok)) if gain else live_ok
                rows.append({"metric": "quality.policy.compliance", "id": f"p{i}", "cluster": f"p{i}",
                             "value": value})
            (stage / "output" / "outcomes-quality.jsonl").write_text(
                "".join(_json.dumps(r) + "\n" for r in rows))
            (stage / "result.json").write_text(_json.dumps({
                "metrics": {"perf.failed": 0.0}, "release_id": rid, "model_dir": str(model), "variant": name}))
        return {"run_dir": str(run_dir), "variant": variant, "gate": {"passed": True}}

    return write


@pytest.fixture
def simple_gate(tmp_path: Path) -> Path:
    """A gate policy with one paired rule and one threshold rule (what write_decision_files feeds)."""
    path = tmp_path / "gate-simple.yaml"
    path.write_text(
        "# test gate\nrules:\n"
        "  - {metric: quality.policy.compliance, test: superiority, margin: 0.0}\n"
        "  - {metric: perf.failed, op: '==', value: 0}\n"
    )
    return path
def tagged_pids(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``ALIGNLOOP_TEST_TAG=tag``: everything a
    command started, whoever its parent is now (a process reparented to init keeps its env)."""
    needle = f"ALIGNLOOP_TEST_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


class ProcTag:
    """The processes of one test, found by the ``ALIGNLOOP_TEST_TAG`` in their environment."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def pids(self) -> list[int]:
        return tagged_pids(self.tag)

    def cmdlines(self) -> list[str]:
        out = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        return out

    def __call__(self, timeout_s: float) -> list[int]:
        """Wait until no tagged process is left; return the pids still alive after ``timeout_s``."""
        import time

        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.25)
        return pids


@pytest.fixture
def proc_tag(monkeypatch: pytest.MonkeyPatch):
    """A fresh ALIGNLOOP_TEST_TAG in this test's environment, inherited by every child; calling
    the fixture's value waits until no tagged process is left. Strays are killed at teardown."""
    import uuid

    tag = ProcTag(uuid.uuid4().hex)
    monkeypatch.setenv("ALIGNLOOP_TEST_TAG", tag.tag)
    yield tag
    for pid in tag.pids():  # never leave a stray behind, whatever the test did
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# Fixtures that materialize the embedded model (a package download and a conversion on a fresh
# machine), train, or start vLLM/gateway processes. A test that uses one must say so with a marker,
# so that `make test-fast` (-m "not integration and not slow") stays fast; collection fails
# otherwise, naming the test.
HEAVY_FIXTURES = frozenset({
    "embedded_model_dir", "tiny_model_dir", "tiny_vllm", "sft_result", "dpo_result",
    "running_gateway", "prefect_harness",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(HEAVY_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
        and not any(item.iter_markers("integration")) and not any(item.iter_markers("slow"))
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that materialize the embedded model, train or start servers need "
            "@pytest.mark.slow or @pytest.mark.integration:\n  " + "\n  ".join(unmarked)
        )


# -- the check that the suite left the user's data dir alone -------------------------------------
class DataDirGuard:
    """Snapshots of a folder's listing: every path under it -> (mtime_ns, size). A file written,
    added or removed changes it, so does a file rewritten in place or the folder being created."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def snapshot(self) -> dict[str, tuple[int, int]]:
        if not self.root.exists():
            return {}
        out = {".": (self.root.stat().st_mtime_ns, 0)}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    st = p.lstat()
                    out[str(p.relative_to(self.root))] = (st.st_mtime_ns, st.st_size)
        return out

    def changes(self, before: dict[str, tuple[int, int]]) -> list[str]:
        """What differs now from ``before`` (sorted, one line each)."""
        after = self.snapshot()
        added = [f"added {p}" for p in after.keys() - before.keys()]
        removed = [f"removed {p}" for p in before.keys() - after.keys()]
        changed = [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
        return sorted(added + removed + changed)


@pytest.fixture
def data_dir_guard():
    """``DataDirGuard`` (the class the session-end check of ``<checkout>/.alignloop`` uses)."""
    return DataDirGuard


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_USER_HOME_KEY] = DataDirGuard(USER_HOME).snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything in it touched ``<checkout>/.alignloop`` (the user's data dir)."""
    before = session.config.stash.get(_USER_HOME_KEY, None)
    if before is None:
        return
    changes = DataDirGuard(USER_HOME).changes(before)
    if changes:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = (f"the test suite touched the user's data dir {USER_HOME} (tests must use their own "
               "ALIGNLOOP_HOME):\n  " + "\n  ".join(changes[:50]))
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(msg, red=True)
        else:
            print(msg)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
