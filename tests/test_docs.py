"""Docs that match the code: the README's strategy is the shipped one, and the layout table in
docs/architecture.md names every module."""
from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "microserve"


def _without_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
    return node


def _shipped_classes() -> dict[str, ast.ClassDef]:
    classes = {}
    for f in sorted((PKG / "router").rglob("*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    return classes


def test_readme_strategy_is_the_shipped_code():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"A strategy is a few lines.*?```python\n(.*?)```", readme, re.S)
    assert m, "README.md lost its strategy example"
    shown = [n for n in ast.parse(m.group(1)).body]
    assert shown and all(isinstance(n, ast.ClassDef) for n in shown), "the example should be whole classes"
    shipped = _shipped_classes()
    for cls in shown:
        assert cls.name in shipped, f"README's {cls.name} is not a class under microserve/router"
        # Same code, trimmed at most of docstrings (comments and whitespace never reach the AST).
        assert ast.dump(_without_docstrings(cls)) == ast.dump(_without_docstrings(shipped[cls.name])), \
            f"README's {cls.name} differs from the shipped class"


def _layout_rows() -> list[tuple[list[str], list[str]]]:
    """(backticked names in the path cell, backticked names in the concept cell) per table row."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("| ---") and not line.startswith("| path"):
            cells = line.strip("|").split("|")
            rows.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", "|".join(cells[1:]))))
    return rows


def unlisted_modules() -> list[str]:
    rows = _layout_rows()
    missing = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        if rel.name == "__init__.py":
            continue
        if len(rel.parts) == 1:  # a top-level module has its own row (or shares one)
            listed = any(rel.name in paths for paths, _ in rows)
        else:  # a package's row names its files (globs allowed), subpackage files by their names too
            names = [n for paths, concept in rows if f"{rel.parts[0]}/" in paths for n in concept]
            inner = "/".join(rel.parts[1:])
            listed = any(fnmatch.fnmatch(inner, n) or fnmatch.fnmatch(rel.name, n) for n in names)
        if not listed:
            missing.append(str(rel))
    return missing


def test_layout_table_lists_every_module():
    assert _layout_rows(), "docs/architecture.md lost its layout table"
    assert unlisted_modules() == [], "add these to the layout table in docs/architecture.md"
