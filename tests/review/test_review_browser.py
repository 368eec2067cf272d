"""The review page in a real headless Chromium (Playwright driving the system's chromium):
sign in as a reviewer, rate, edit, compare and approve with the keyboard shortcuts, then check
that the feedback rows and the approval landed with the right tenant, reviewer and role.

The gateway, its SQLite log store and the release folder are real; the two model servers are
``FakeUpstream`` scripts (see review_support.py for why). Without a browser (``make setup
SKIP_BROWSER=1``) the tests skip and say how to install one; under ``CI=true`` (.ci/run) they
fail instead, so CI always runs them.

The release page and the Prefect artifacts are also opened for a run shaped like `make demo`'s
(built by the real eval-outcome, gate, decide and report code, with scripted answers instead of a
trained model) at a laptop's 1400-px window: what a person sees there must be what was decided.

Set ``ALIGNLOOP_SCREENSHOTS=DIR`` to save the pages as PNGs (docs/ has them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from review_support import (  # noqa: E402
    ALICE,
    CANDIDATE_REPLY,
    LIVE_REPLY,
    PROMPTS,
    demo_review_site,
    review_site,
)

pytestmark = pytest.mark.integration

# This machine's closed network refuses Chromium's background connections: switch them off.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EDITED = "Refunds: within 30 days of delivery, for unused items."
LAPTOP = {"width": 1400, "height": 900}  # a laptop's browser window: pages must fit it


def chromium_path() -> str:
    path = (
        os.environ.get("ALIGNLOOP_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        why = (
            "no Chromium for the review-page browser tests: `make setup` installs Debian's "
            "chromium (unless SKIP_BROWSER=1), or set ALIGNLOOP_CHROMIUM=/path/to/chromium"
        )
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{why} (CI=true: CI runs every browser test)")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives every run a fresh, temporary user-data-dir.
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> None:  # noqa: ANN001
    out = os.environ.get("ALIGNLOOP_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)


def test_reviewer_rates_edits_compares_and_approves(
    tmp_path: Path, data_home: Path, browser
) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    with review_site(tmp_path) as site:
        page = browser.new_page(viewport=LAPTOP)
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # Sign in: the queue sends us to the login form; a wrong key is refused.
        page.goto(site.base + "/review")
        assert "/review/login" in page.url
        page.fill("input[name=key]", "rk-not-a-key")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("unknown reviewer key")
        page.fill("input[name=key]", ALICE)
        page.click("button[type=submit]")
        expect(page.locator("#reviewer")).to_have_text("alice")

        # Alice reviews tenant a only: three exchanges, none of tenant b's.
        cards = page.locator("article.card")
        expect(cards).to_have_count(len(PROMPTS))
        ids = [cards.nth(i).get_attribute("data-id") for i in range(len(PROMPTS))]
        assert set(ids) == set(site.live_ids["a"])
        expect(page.locator("#queue")).to_contain_text("<EMAIL_ADDRESS>")  # PII shown redacted
        expect(page.locator("#queue")).not_to_contain_text("jane.doe@example.com")
        expect(page.locator("#queue .chip.warn", has_text="guardrail: block")).to_have_count(1)
        _shot(page, "review-queue.png")

        # Rate: the first card is selected; "u" is thumbs up.
        page.keyboard.press("u")
        expect(page.locator(f"#card-{ids[0]} .chip.fb")).to_contain_text(
            "rating up · reviewer alice"
        )

        # Edit: "j" moves to the next card, "e" opens its editor, Ctrl+Enter saves.
        page.keyboard.press("j")
        page.keyboard.press("e")
        area = page.locator(f"#card-{ids[1]} textarea")
        expect(area).to_be_focused()
        area.fill(EDITED)
        page.keyboard.press("Control+Enter")
        expect(page.locator(f"#card-{ids[1]} .chip.fb")).to_contain_text("edit · reviewer alice")

        # Compare: "c" asks the staged candidate; the served answer is hidden while A/B is open.
        page.keyboard.press("j")
        page.keyboard.press("c")
        pair = page.locator(f"#card-{ids[2]} .pair")
        expect(pair).to_be_visible()
        expect(page.locator(f"#card-{ids[2]} .turn.answer")).to_be_hidden()
        texts = [pair.locator(".option pre").nth(i).inner_text() for i in range(2)]
        assert sorted(texts) == sorted([LIVE_REPLY, CANDIDATE_REPLY])
        _shot(page, "review-compare.png")
        page.keyboard.press("1")  # A is better
        expect(page.locator(f"#card-{ids[2]} .chip.fb")).to_contain_text(
            "preference · reviewer alice"
        )

        # Release view: lineage, the report's plots, held-out answers side by side; "a" approves.
        page.goto(site.base + "/review/releases/rel-aligned")
        expect(page.locator("table.sbs tbody tr")).to_have_count(2)
        expect(page.locator(".lineage")).to_contain_text("2026-11-29")
        plots = page.locator(".plots img")
        expect(plots).to_have_count(2)
        for i in range(2):
            plots.nth(i).scroll_into_view_if_needed()
            assert plots.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
        expect(page.locator("#approvals")).to_contain_text("No approvals yet")
        page.fill("#approvals input[name=note]", "held-out answers follow the policy")
        page.locator("#approvals input[name=note]").blur()
        page.keyboard.press("a")
        expect(page.locator("#approvals")).to_contain_text("approved by alice")
        assert errors == []

        # What landed in the store: one row per action, tenant a, by alice as a reviewer.
        rows = {fb["request_id"]: fb for fb in site.store.feedback_events()}
        assert set(rows) == set(ids[:3])
        for fb in rows.values():
            assert (fb["tenant"], fb["actor"], fb["actor_role"]) == ("a", "alice", "reviewer")
        assert rows[ids[0]]["kind"] == "rating" and rows[ids[0]]["payload"]["thumbs"] == "up"
        assert rows[ids[1]]["kind"] == "edit" and rows[ids[1]]["payload"] == {"text": EDITED}
        pref = rows[ids[2]]
        assert pref["kind"] == "preference"
        other = site.store.get_exchange(pref["payload"]["other_request_id"], tenant="a")
        served = site.store.get_exchange(ids[2], tenant="a")
        assert other["release"] == "rel-aligned" and other["response"] == CANDIDATE_REPLY
        assert other["messages"] == served["messages"]  # the same prompt: a usable DPO pair
        assert pref["payload"]["preferred"] == ("this" if texts[0] == LIVE_REPLY else "other")

        rel = site.releases.get("rel-aligned")
        assert [(a.by, a.role, a.note) for a in rel.approvals] == [
            ("alice", "reviewer", "held-out answers follow the policy")
        ]


def _login(page, base: str) -> None:  # noqa: ANN001
    page.goto(base + "/review/login")
    page.fill("input[name=key]", ALICE)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/review")


def _images_loaded(page, selector: str) -> list[bool]:  # noqa: ANN001
    imgs = page.locator(selector)
    out = []
    for i in range(imgs.count()):
        imgs.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete", arg=imgs.nth(i).element_handle())
        out.append(imgs.nth(i).evaluate("img => img.naturalWidth > 0"))
    return out


def test_release_pages_of_a_demo_run_show_what_was_decided(
    tmp_path: Path, data_home: Path, browser
) -> None:  # noqa: ANN001
    """The kept candidates of a demo-shaped run: the decision's words and every rule's row as the
    report renders them (inconclusive never a fail), the held-out answers side by side from the
    eval stage's output folder, plots that load, no approval offered on a retired release, and
    a page that fits a 1400-px window."""
    from playwright.sync_api import expect

    from evals.render import decision_word, rule_rows
    from serving.review.data import read_eval_samples

    with demo_review_site(tmp_path) as site:
        page = browser.new_page(viewport=LAPTOP)
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _login(page, site.base)
        for variant, word in (("quantized", "keep: failed"), ("aligned", "keep: inconclusive")):
            gate = site.gate[variant]
            assert decision_word(gate) == word  # the scripted run decides as the demo did
            page.goto(f"{site.base}/review/releases/rel-{variant}")
            expect(page.locator("h3.decision")).to_have_text(f"Gate decision: {word}")
            rows = page.locator("table.rules tbody.rule")
            expect(rows).to_have_count(len(gate["rules"]))
            for i, r in enumerate(rule_rows(gate)):
                cells = rows.nth(i).locator("tr").first.locator("td")
                got = [cells.nth(k).inner_text().strip() for k in range(7)]
                assert got == [r.title, r.verdict, r.candidate, r.live, r.difference_and_bounds, r.needs, r.n]
                expect(rows.nth(i).locator(".verdict")).to_have_class(f"verdict {r.verdict}")
            expect(page.locator("table.rules")).not_to_contain_text("FAIL")
            # Held-out answers side by side: every sample both eval stages answered.
            shared = read_eval_samples(site.run_dir, "baseline").keys() & read_eval_samples(site.run_dir, variant).keys()
            assert len(shared) == 120
            expect(page.locator("table.sbs tbody tr")).to_have_count(len(shared))
            first = page.locator("table.sbs tbody tr").first
            expect(first.locator("td")).to_have_count(4)
            assert all(_images_loaded(page, ".plots img")) and page.locator(".plots img").count() == 2
            # Retired: nothing to approve (the page says why instead of offering the button).
            expect(page.locator("#approvals button")).to_have_count(0)
            expect(page.locator("#approvals")).to_contain_text("Approval is not offered")
            # Fits the laptop window: nothing wider than the viewport.
            assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP["width"]
        # The release list: the same words, from the verdict the release store stored.
        page.goto(f"{site.base}/review/releases")
        for variant, word in (("quantized", "keep: failed"), ("aligned", "keep: inconclusive")):
            expect(page.locator(f"tr:has(a[href$='/rel-{variant}']) td").nth(4)).to_have_text(word)
        page.goto(f"{site.base}/review/releases/rel-aligned")
        page.evaluate("document.getElementById('only-diff').click()")
        page.evaluate("window.scrollTo(0, 0)")
        _shot(page, "review-release.png")
        assert errors == []


# -- the Prefect UI ------------------------------------------------------------------------------
@contextlib.contextmanager
def prefect_server(home: Path):  # noqa: ANN201
    """``prefect server start`` with its UI, on a free port over a fresh database in ``home``
    (Prefect's test harness switches the UI off). Yields (api_url, ui_url)."""
    import httpx

    from serving.engine.vllm_server import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a fresh database migrates first (minutes on 2 cores)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(api + "/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prefect server did not start"
            time.sleep(1)
        yield api, ui
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prefect_artifacts_of_a_demo_run_show_the_decision_and_their_plots(
    tmp_path: Path, data_home: Path, browser
) -> None:  # noqa: ANN001
    """The loop's artifacts (flows/loop.publish_artifacts) in the real Prefect UI at 1400 px:
    the gate artifact says each candidate's decision in the report's words and its rule table
    fits the window; the report's plots and the plots artifact's images load."""
    from playwright.sync_api import expect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from review_support import make_demo_run

    from flows.loop import publish_artifacts
    from flows.window import artifact_key

    run_dir = tmp_path / "runs" / "align-20261206-demo"
    decision = make_demo_run(run_dir)
    home = tmp_path / "prefect"
    home.mkdir()
    with prefect_server(home) as (api, ui):
        key = artifact_key(run_dir.name)

        def publish() -> dict[str, str]:
            """In a thread of its own: Playwright's sync API runs an event loop in this one, and
            Prefect's sync functions would then hand back coroutines instead of running."""
            with temporary_settings({PREFECT_API_URL: api}):
                publish_artifacts(run_dir, {"counts": {"sft_rows": 42, "dpo_pairs": 44}}, decision, None)
                ids = {}
                with get_client(sync_client=True) as client:
                    for kind in ("report", "gate", "plots"):
                        found = client.read_artifacts(
                            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{kind}-{key}"])))
                        assert found, f"no {kind} artifact"
                        ids[kind] = str(found[0].id)
                return ids

        with ThreadPoolExecutor(1) as pool:
            ids = pool.submit(publish).result()
        page = browser.new_page(viewport=LAPTOP)
        page.set_default_timeout(60_000)

        page.goto(f"{ui}/artifacts/artifact/{ids['gate']}")
        body = page.locator("body")
        expect(body).to_contain_text("Gate decision: keep: inconclusive")  # aligned
        expect(body).to_contain_text("Gate decision: keep: failed")  # quantized
        expect(body).to_contain_text("capability per task (arithmetic)")
        expect(body).not_to_contain_text("FAIL")
        expect(page.locator("table")).to_have_count(2)  # one per candidate
        # Every column in view: no table wider than the pane that holds it (the UI scrolls a
        # wide table sideways inside the pane, hiding its right-hand columns).
        overflow = page.evaluate("""() => [...document.querySelectorAll('table')].map(t => {
            const pane = t.parentElement.getBoundingClientRect(), box = t.getBoundingClientRect();
            return Math.max(box.right - Math.min(pane.right, window.innerWidth), 0); })""")
        assert overflow == [0, 0], overflow
        _shot(page, "prefect-ui-gate-artifact.png")

        for kind, least in (("report", 2), ("plots", 2)):
            page.goto(f"{ui}/artifacts/artifact/{ids[kind]}")
            page.locator("article img").first.wait_for()
            loaded = _images_loaded(page, "article img")
            assert len(loaded) >= least and all(loaded), (kind, loaded)
            # Back to the top (the UI scrolls a pane of its own, not the window).
            page.evaluate("document.querySelector('article').scrollIntoView({block: 'end'})")
            page.evaluate("document.querySelector('header, [role=banner], nav').scrollIntoView()")
            _shot(page, f"prefect-ui-{kind}-artifact.png")
