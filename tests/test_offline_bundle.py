"""The offline bundle builder's pieces that decide what travels (offline/build_bundle.py)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_bundle", REPO / "offline" / "build_bundle.py")
bb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bb)


def test_what_the_box_has_is_read_from_pip_freeze_or_names(tmp_path: Path) -> None:
    box = tmp_path / "box.txt"
    box.write_text("torch==2.11.0+cu130\nPyYAML==6.0.4\n# comment\nsome_pkg @ file:///x\nnumpy\ntyping-extensions>=4\n")
    assert bb.read_box(box) == {"torch", "pyyaml", "some-pkg", "numpy", "typing-extensions"}
    assert bb.canonical("Typing_Extensions") == "typing-extensions"


def test_requirements_must_be_pinned(tmp_path: Path) -> None:
    req = tmp_path / "r.txt"
    req.write_text("a==1.0  # why\n\nb==2\n")
    assert bb.read_pins(req) == ["a==1.0", "b==2"]
    req.write_text("a>=1\n")
    try:
        bb.read_pins(req)
    except SystemExit as exc:
        assert "not pinned" in str(exc)
    else:
        raise AssertionError("an unpinned requirement must be refused")
    # The shipped sets are pinned.
    assert bb.read_pins(REPO / "requirements" / "serve-gpu-box.txt")[0] == "vllm==0.26.0"
    assert any(p.startswith("prefect==") for p in bb.read_pins(REPO / "requirements" / "pipeline.lock"))


def test_platform_tags_stop_at_the_box_glibc() -> None:
    args = bb.platform_args("3.12", "2_28")
    tags = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert "manylinux_2_28_x86_64" in tags and "manylinux_2_31_x86_64" not in tags
    assert args[args.index("--python-version") + 1] == "3.12"


def test_dropping_files_rewrites_the_wheel_and_its_record(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/big/kernel.so", b"x" * 100)
        z.writestr("pkg/big/other.so", b"y")
        z.writestr("pkg/keep.so", b"z")
        z.writestr("pkg-1.0.dist-info/RECORD",
                   "pkg/__init__.py,,\npkg/big/kernel.so,,\npkg/big/other.so,,\npkg/keep.so,,\n")
    assert bb.drop_files(wheel, ["pkg/big"]) == 2
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/keep.so"]
        assert "big" not in z.read("pkg-1.0.dist-info/RECORD").decode()


def test_dev_only_packages_are_pinned_and_never_imported_by_the_product() -> None:
    """What a box bundle leaves out by default is in the lock, and only tests and the eval-set
    generator import it (the loop, gateway and evals on a GPU box run without it)."""
    import re
    import subprocess

    pins = {bb.canonical(p.split("==")[0]) for p in bb.read_pins(REPO / "requirements" / "pipeline.lock")}
    assert set(bb.DEV_ONLY_SKIP) <= pins
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    allowed = ("tests/", "evals/tasks/generate.py")
    for name in bb.DEV_ONLY_SKIP:
        module = name.replace("-", "_")
        users = [f for f in files if not f.startswith(allowed)
                 and re.search(rf"^\s*(import|from)\s+{module}\b", (REPO / f).read_text(), re.M)]
        assert not users, (name, users)
