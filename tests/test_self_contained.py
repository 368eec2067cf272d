"""The repository stands on its own: tracked files point at no notes outside it.

Design, platform facts and conventions live in docs/ (docs/DESIGN.md, docs/PLATFORM.md,
docs/CONTRIBUTING.md); a note name without its docs/ folder, or a path into a "shared" folder
beside the checkout, sends a reader to a file their clone does not have.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from ground.config import repo_root

OUTSIDE = re.compile(r"\.\./shared|STYLE\.md|(?<![/\w])(?:DESIGN|PLATFORM)\.md")
THIS_FILE = "tests/test_self_contained.py"  # it spells out the patterns it looks for


def test_no_pointers_outside_the_repository() -> None:
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=repo_root(), capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    found = []
    for name in files:
        if name.startswith("docs/") or name == THIS_FILE:  # docs/ links its own pages
            continue
        try:
            text = (repo_root() / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files (screenshots, archives)
        found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                  if OUTSIDE.search(line)]
    assert not found, "pointers outside the repository (use docs/...):\n" + "\n".join(found)
