"""The package layout follows the data path: no stage imports the admin layer (watch/) or the service, and
imports between stages point down the path receive → decide → infer → gate → encode → deliver. The storage
layer knows nothing of the node, no module imports itself back through a cycle, and the configuration loads
without the model's libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "dicom_node"
STAGES = ["receive", "decide", "infer", "gate", "encode", "deliver", "learn"]
ORCHESTRATION = {"service", "scheduler", "pipeline", "__main__"}
#: sub-packages that are not stages: the admin layer and the settings
OTHER_PACKAGES = ["watch", "config"]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _all_imports(path: Path) -> set[str]:
    """Absolute names ``path`` imports, relative imports resolved, each ``from X import Y`` as X and X.Y."""
    pkg = list(path.relative_to(REPO).with_suffix("").parts)[:-1]
    out = set()
    tree = ast.parse(path.read_text())
    # imports under ``if TYPE_CHECKING:`` never run: a type annotation naming its caller is no cycle
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _imports(path: Path) -> set[str]:
    """Absolute names of the dicom_node modules ``path`` imports (relative imports resolved)."""
    return {n for n in _all_imports(path) if n.startswith("dicom_node")}


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_stages_do_not_import_watch_or_orchestration():
    problems = []
    for stage in STAGES:
        for f in (ROOT / stage).rglob("*.py"):
            for name in _imports(f):
                target = _stage_of(name)
                if target == "watch" or target in ORCHESTRATION:
                    problems.append(f"{f.relative_to(ROOT)} imports {name}")
                elif target in STAGES and STAGES.index(target) > STAGES.index(stage):
                    problems.append(f"{f.relative_to(ROOT)} imports a later stage: {name}")
    assert not problems, "\n".join(problems)


def test_storage_never_imports_the_node():
    problems = [f"{f.relative_to(REPO)} imports {name}" for f in (REPO / "storage").rglob("*.py")
                for name in _all_imports(f) if name == "dicom_node" or name.startswith("dicom_node.")]
    assert not problems, "\n".join(problems)


def test_no_import_cycle_among_node_modules():
    """Every import, lazy ones in functions included: a cycle hidden in a function is still two modules that
    cannot be understood (or moved) apart."""
    files = {_module_name(f): f for f in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        targets = set()
        for name in _imports(f):
            if name in files and name != mod:
                targets.add(name)
        graph[mod] = targets
    cycles = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for nxt in sorted(graph[mod]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert not cycles, "\n".join(cycles)


def test_config_needs_no_model_libraries():
    for f in (ROOT / "config").rglob("*.py"):
        names = _all_imports(f)
        assert "inference.model" not in names and "torch" not in names, f"{f.relative_to(REPO)} imports the model"
    code = "import sys, dicom_node.config as c; c.Settings().model_path; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "importing dicom_node.config loads torch"


def test_no_node_module_is_longer_than_its_limit():
    long = []
    for f in ROOT.rglob("*.py"):
        rel = str(f.relative_to(ROOT))
        n = len(f.read_text().splitlines())
        if n > MAX_LINES:
            long.append(f"{rel}: {n} lines")
    assert not long, "\n".join(long)


def test_readme_layout_names_every_sub_package():
    readme = (ROOT.parent / "docs" / "architecture.md").read_text()
    layout = readme[readme.index("## Layout"):]
    subs = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert subs == sorted(STAGES + OTHER_PACKAGES), subs
    for sub in subs:
        assert f"  {sub}/" in layout, f"README layout lacks dicom_node/{sub}/"
        for f in (ROOT / sub).glob("*.py"):
            if f.stem != "__init__":
                assert f.stem in layout, f"README layout lacks {sub}/{f.stem}"
