"""The package layout follows the data path: no stage imports the admin layer (watch/) or the service, and
imports between stages point down the path receive → decide → infer → encode → deliver."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dicom_node"
STAGES = ["receive", "decide", "infer", "encode", "deliver"]
ORCHESTRATION = {"service", "scheduler", "pipeline", "__main__"}


def _imports(path: Path) -> set[str]:
    """Absolute names of the dicom_node modules ``path`` imports (relative imports resolved)."""
    pkg = list(path.relative_to(ROOT.parent).with_suffix("").parts)[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
    return {n for n in out if n.startswith("dicom_node")}


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


def test_readme_layout_names_every_sub_package():
    readme = (ROOT.parent / "docs" / "architecture.md").read_text()
    layout = readme[readme.index("## Layout"):]
    subs = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert subs == sorted(STAGES + ["watch"]), subs
    for sub in subs:
        assert f"  {sub}/" in layout, f"README layout lacks dicom_node/{sub}/"
        for f in (ROOT / sub).glob("*.py"):
            if f.stem != "__init__":
                assert f.stem in layout, f"README layout lacks {sub}/{f.stem}"
