"""No module of the package imports the CLI entry point ``prefcore.cli`` (it imports the commands,
so a command importing it back is a cycle): the shared flag/YAML parsing lives in
``prefcore._config``, below both. Checked on the source (AST), so a lazy import inside a function
counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import prefcore

PACKAGE = Path(prefcore.__file__).resolve().parent
FORBIDDEN = "prefcore.cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` (the code of ``module``) imports, relative imports
    resolved; ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _violates(names: set[str]) -> bool:
    return any(n == FORBIDDEN or n.startswith(FORBIDDEN + ".") for n in names)


def test_checker_sees_every_spelling():
    # the check must be able to fail: each spelling of importing prefcore.cli is caught
    for src, mod in (("import prefcore.cli", "prefcore.demo"),
                     ("def f():\n    from prefcore.cli import parse_config", "prefcore.demo.pipeline"),
                     ("from prefcore import cli", "prefcore.x"),
                     ("from .. import cli", "prefcore.train.cli_user"),
                     ("from ..cli import main", "prefcore.demo.pipeline")):
        assert _violates(imports_of(src, mod)), src
    for src, mod in (("from prefcore._config import parse_config", "prefcore.demo.pipeline"),
                     ("from prefcore.train.policy.cli import parse_train_policy", "prefcore.demo.pipeline"),
                     ("from . import cli", "prefcore.train.policy.trainer")):  # prefcore.train.policy.cli
        assert not _violates(imports_of(src, mod)), src


def test_no_module_imports_the_cli_entry_point():
    offenders = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    for path in files:
        if path == PACKAGE / "cli.py":
            continue
        names = imports_of(path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py")
        if _violates(names):
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert offenders == [], f"modules importing prefcore.cli (use prefcore._config instead): {offenders}"


def test_cli_keeps_its_public_names():
    from prefcore import _config, cli

    for name in ("UserError", "parse_config", "config_file_flags", "user_errors_from_argparse", "one_line"):
        assert getattr(cli, name) is getattr(_config, name), name
