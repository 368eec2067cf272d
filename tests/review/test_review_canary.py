"""The review page's release page shows a canary (share, who sees it, what it is compared with),
a release watched after its promotion (the holdback), and an online decision's whole reason with
every rule's bound (other reasons are cut at 200 characters)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from review_support import ALICE, review_site  # noqa: E402
from test_review import signed_in  # noqa: E402


def test_release_page_shows_the_canary_and_its_online_decision(tmp_path: Path, data_home: Path) -> None:
    with review_site(tmp_path) as site:
        store = site.releases
        with store.locked():
            rel = store.get("rel-aligned")
            rel.canary = {"share": 0.25, "tenants": ["a"], "started_at": "2026-12-07T01:00:00.000+00:00",
                          "live": "rel-live"}
            rel.monitor = {"previous": "rel-live", "share": 0.2, "tenants": ["a"],
                           "started_at": "2026-12-07T03:00:00.000+00:00", "until": "2026-12-07T03:10:00.000+00:00"}
            store.save(rel)
        bounds = "; ".join(f"rule{i} not_harmful [-0.01, 0.02] (n 400/1200)" for i in range(12))
        store.set_status("rel-aligned", "canary", "canary: 25% of a's users, beside rel-live")
        store.set_status("rel-aligned", "retired", "canary rolled back: online rules vs rel-live: " + bounds)
        alice, _ = signed_in(site.base, ALICE)
        page = alice.get("/review/releases/rel-aligned").text
        assert "25% of a's users (sticky per user)" in page and "rel-live (online rules" in page
        assert "20% of a's users stay on rel-live" in page
        assert bounds in page  # whole, though over 200 characters
