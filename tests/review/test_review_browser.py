"""The review page in a real headless Chromium (Playwright driving the system's chromium):
sign in as a reviewer, rate, edit, compare and approve with the keyboard shortcuts, then check
that the feedback rows and the approval landed with the right tenant, reviewer and role.

The gateway, its SQLite log store and the release folder are real; the two model servers are
``FakeUpstream`` scripts (see review_support.py for why). Without a browser (``make setup
SKIP_BROWSER=1``) the tests skip and say how to install one; under ``CI=true`` (.ci/run) they
fail instead, so CI always runs them.

Set ``ALIGNLOOP_SCREENSHOTS=DIR`` to save the queue and release pages as PNGs (docs/ has them).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from review_support import (  # noqa: E402
    ALICE,
    CANDIDATE_REPLY,
    LIVE_REPLY,
    PROMPTS,
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
        page = browser.new_page(viewport={"width": 1280, "height": 900})
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
        _shot(page, "review-release.png")
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
