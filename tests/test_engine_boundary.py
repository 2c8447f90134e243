"""DeepSpeed stays inside ``pretrain/engine/``: no other module of the package imports it.

The check reads the source (nothing is imported): ``import deepspeed...``, ``from deepspeed...
import`` and imports by string (``importlib.import_module("deepspeed...")``, ``__import__``), at
any depth, function-level imports included, since a lazy import ties a module to DeepSpeed too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pretrain"
ENGINE = PACKAGE / "engine"
TOP = "deepspeed"
STRING_IMPORTERS = {"import_module", "__import__"}  # importlib.import_module, __import__, and aliases' last name


def _is_deepspeed(name: str) -> bool:
    return name == TOP or name.startswith(TOP + ".")


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _string_prefix(node: ast.expr) -> str:
    """The constant text a string argument starts with (a plain string, or an f-string's first part)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _string_prefix(node.values[0])
    return ""


def deepspeed_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for every import of DeepSpeed in ``source``, at any nesting level."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_deepspeed(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _is_deepspeed(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and _called_name(node.func) in STRING_IMPORTERS and node.args:
            name = _string_prefix(node.args[0])
            if _is_deepspeed(name.split(".")[0]):
                found.append((node.lineno, f"{_called_name(node.func)}({name!r})"))
    return sorted(found)


def violations(package: Path, allowed: Path) -> list[str]:
    """"path:line: what" for each DeepSpeed import in a .py file under ``package`` but not under ``allowed``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path.is_relative_to(allowed):
            continue
        for line, what in deepspeed_imports(path.read_text(), str(path)):
            out.append(f"{path.relative_to(package.parent)}:{line}: {what}")
    return out


def test_only_the_engine_package_imports_deepspeed():
    found = violations(PACKAGE, ENGINE)
    assert not found, (
        "DeepSpeed is imported outside pretrain/engine/ (move the code that needs it into the engine "
        "package and call it from there):\n  " + "\n  ".join(found)
    )


def test_the_check_finds_every_form_of_import_at_any_depth():
    source = '''
import os, deepspeed
import deepspeed.comm as comm
from deepspeed.pipe import LayerSpec
import importlib


def lazy():
    from deepspeed.utils import safe_set_full_fp32_param
    return importlib.import_module("deepspeed.runtime.zero")


class Holder:
    def method(self):
        if True:
            __import__("deepspeed")
            mod = f"deepspeed.{'pipe'}"
            return importlib.import_module(f"deepspeed.{mod}")
'''
    assert [line for line, _ in deepspeed_imports(source)] == [2, 3, 4, 9, 10, 16, 18]


def test_the_check_ignores_names_that_only_look_like_deepspeed():
    source = '''
import deepspeed_extras
from pretrain.engine.core import deepspeed_config
from . import deepspeed
import importlib
importlib.import_module("deepspeedish")
text = "import deepspeed"
'''
    assert deepspeed_imports(source) == []


def test_a_stray_import_in_a_copy_of_the_package_fails_the_check_naming_file_and_line(tmp_path):
    package = tmp_path / "pretrain"
    (package / "engine").mkdir(parents=True)
    (package / "model").mkdir()
    (package / "engine" / "core.py").write_text("import deepspeed\n")  # allowed: the engine package
    (package / "model" / "gpt.py").write_text('"""Model."""\n\n\ndef build():\n    from deepspeed.pipe import PipelineModule\n')
    assert violations(package, package / "engine") == ["pretrain/model/gpt.py:5: from deepspeed.pipe import ..."]
