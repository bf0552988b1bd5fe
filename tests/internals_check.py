"""Each row of docs/internals.md against the installed uvicorn and h11: standard library only, so that
tests/test_internals.py can run it here and, as `python internals_check.py docs/internals.md`, in a fresh venv of
the fast deployment (where httptools is installed); it then prints one JSON list of [row, verdict, message].

Verdicts: "present"; "missing" (the message names the package, its version, the attribute and its use);
"unimportable" (the object's module does not import here: the message says why).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ["package", "object", "attribute", "what the service uses it for", "module"]


@dataclass(frozen=True)
class Row:
    package: str
    object: str
    attribute: str
    use: str
    modules: tuple[str, ...]

    def key(self) -> str:
        return f"{self.object}.{self.attribute}"


def rows(text: str) -> list[Row]:
    """The table's rows, after its header row (the one whose cells are COLUMNS)."""
    table = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    if not cells or cells[0] != COLUMNS:
        raise ValueError(f"docs/internals.md needs one table with the columns {COLUMNS}")
    found = []
    for row in cells[2:]:  # after the header and its |---| line
        if len(row) != len(COLUMNS) or not all(row):
            raise ValueError(f"a row of docs/internals.md needs {len(COLUMNS)} filled cells: {row}")
        package, obj, attribute, use, modules = row
        modules_used = tuple(module.strip() for module in modules.split(","))
        found.append(Row(package, obj.strip("`"), attribute.strip("`"), use, modules_used))
    return found


def resolve(dotted: str) -> Any:
    """`a.b.C` as a module, or an attribute of the longest prefix that imports (ImportError if none does)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if cut == 1 or (exc.name and not dotted.startswith(exc.name)):  # a dependency is missing, not a prefix
                raise
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ImportError(dotted)  # not reached: the first part imports or raises


def assigned_on_self(cls: type) -> set[str]:
    """The names a class or its bases assign as `self.<name>` in any of their methods (instance attributes)."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # a class from C: no source to read
            continue
        names |= assigned_in(ast.parse(source))
    return names


def assigned_in(tree: ast.AST) -> set[str]:
    """The names assigned as `self.<name>` anywhere in a piece of source."""
    names: set[str] = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names


def check(row: Row) -> tuple[str, str]:
    try:
        obj = resolve(row.object)
    except (ImportError, AttributeError) as exc:
        if isinstance(exc, ImportError) and not row.object.startswith(exc.name or "\0"):
            return "unimportable", f"{row.object} does not import here ({exc})"
        return "missing", _missing(row, row.object.rsplit(".", 1)[-1] + " (the object itself)")
    present = hasattr(obj, row.attribute) or (inspect.isclass(obj) and row.attribute in assigned_on_self(obj))
    if present:
        return "present", ""
    return "missing", _missing(row, f"{row.object.rsplit('.', 1)[-1]}.{row.attribute}")


def _missing(row: Row, what: str) -> str:
    try:
        version = importlib.metadata.version(row.package)
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    return f"{row.package} {version} no longer has {what}, used by {', '.join(row.modules)} for: {row.use}"


def main() -> None:
    table = rows(Path(sys.argv[1]).read_text())
    print(json.dumps([[row.key(), *check(row)] for row in table]))


if __name__ == "__main__":
    main()
