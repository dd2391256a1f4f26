"""Imports run one way (docs/architecture.md): listeners → mrrp_pacs ← exporters, model_store
below all but the error module, and only the wiring (daemon, CLI, demo) sees both ends."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIRING = {"mrrp_pacs/daemon.py", "mrrp_pacs/cli.py", "mrrp_pacs/demo.py", "mrrp_pacs/__main__.py"}


def _imports(path: Path) -> set[str]:
    """Top-level packages of this project that ``path`` imports (at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found
            if name.split(".")[0] in {"mrrp_pacs", "listeners", "exporters", "model_store"}}


def _violations(package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = (),
                root: Path = ROOT):
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in WIRING:
            continue
        for name in _imports(path):
            if name.split(".")[0] in forbidden and name not in allowed:
                yield f"{relative} imports {name}"


def test_exporters_never_import_listeners():
    assert list(_violations("exporters", ("listeners",))) == []


def test_listeners_never_import_exporters():
    assert list(_violations("listeners", ("exporters",))) == []


def test_the_domain_sees_listeners_and_exporters_only_in_the_wiring():
    assert list(_violations("mrrp_pacs", ("listeners", "exporters"))) == []


def test_model_store_imports_only_the_error_module():
    assert list(_violations("model_store", ("mrrp_pacs", "listeners", "exporters"),
                            allowed=("mrrp_pacs.errors",))) == []


def test_the_rule_sees_a_violation(tmp_path):
    """The check itself can fail: a planted import against the flow is found, also one made
    inside a function."""
    (tmp_path / "exporters").mkdir()
    (tmp_path / "exporters" / "planted.py").write_text(
        "def send():\n    from listeners.mllp import MllpServer\n")
    assert list(_violations("exporters", ("listeners",), root=tmp_path)) == [
        "exporters/planted.py imports listeners.mllp"]
