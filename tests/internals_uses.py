"""What the service's modules take from uvicorn and h11, read from their source with ast, for tests/test_internals.py.

Found: in our subclasses of uvicorn's classes, every name used on `self` (`self.x`, `getattr(self, "x", ...)`)
and the methods they define; every attribute used on what a `self` attribute holds, directly (`self.cycle.scope`,
`getattr(self, "conn", None).x`) or through a local name bound to it (`conn = getattr(self, "conn", None)`;
`for process in self.processes`, keyed `processes[]`); in any function of ours, every attribute used on a local
name bound to a call of a uvicorn or h11 class, or of a function of ours annotated to return one
(`config = uvicorn_config(...)`). Not traced: a uvicorn object kept under a name of ours (`self._armed_cycle`),
passed to another function, or reached through a chain of locals.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from internals_check import assigned_in, assigned_on_self, resolve

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class Taken:
    on_self: set[str]
    held: dict[str, set[str]]  # a `self` attribute (`x`, or `x[]` for its items) -> the attributes used on it


def self_attribute(node: ast.AST) -> str | None:
    """`self.x` or `getattr(self, "x", ...)` (hasattr, setattr too): "x"."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr", "setattr")
        and len(node.args) >= 2
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == "self"
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None


def used_on(function: ast.AST, local: str) -> set[str]:
    """The attributes used on a local name inside a function."""
    return {
        node.attr
        for node in ast.walk(function)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == local
    }


def taken(node: ast.ClassDef) -> Taken:
    on_self = {item.name for item in node.body if isinstance(item, FUNCTIONS)}
    held: dict[str, set[str]] = defaultdict(set)
    for child in ast.walk(node):
        if (name := self_attribute(child)) is not None:
            on_self.add(name)
        if isinstance(child, ast.Attribute) and (name := self_attribute(child.value)) is not None:
            held[name].add(child.attr)
        if isinstance(child, FUNCTIONS):
            for local, source in _bound_from_self(child).items():
                held[source] |= used_on(child, local)
    return Taken({name for name in on_self if not name.startswith("__")}, dict(held))


def _bound_from_self(function: ast.AST) -> dict[str, str]:
    bound = {}
    for node in ast.walk(function):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            if (name := self_attribute(node.iter)) is not None:
                bound[node.target.id] = f"{name}[]"
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and (name := self_attribute(node.value)) is not None
        ):
            bound[node.targets[0].id] = name
    return bound


def typed_locals(tree: ast.Module, returns: dict[str, str]) -> list[tuple[str, str, set[str]]]:
    """(local, uvicorn or h11 object, attributes used on it) for each local bound to a call of such a class or of
    a function of ours in `returns` (name -> the object its annotation names)."""
    found = []
    for function in (node for node in ast.walk(tree) if isinstance(node, FUNCTIONS)):
        for node in ast.walk(function):
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
                continue
            callee = ast.unparse(node.value.func)
            made = returns.get(callee) or (callee if callee.startswith(("uvicorn.", "h11.")) else None)
            for target in node.targets:
                if made is not None and isinstance(target, ast.Name):
                    found.append((target.id, made, used_on(function, target.id)))
    return found


def returning(trees: list[ast.Module]) -> dict[str, str]:
    """Our functions annotated to return a uvicorn or h11 object: name -> that object."""
    return {
        node.name: ast.unparse(node.returns)
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, FUNCTIONS)
        and node.returns is not None
        and ast.unparse(node.returns).startswith(("uvicorn.", "h11."))
    }


def provided(dotted: str) -> set[str]:
    """The names a uvicorn class provides (class attributes, methods, what it assigns on `self`); where it does not
    import (httptools' protocol without httptools), read from uvicorn's source instead."""
    try:
        cls = resolve(dotted)
    except ImportError:
        return provided_by_source(dotted)
    return set(dir(cls)) | assigned_on_self(cls)


def provided_by_source(dotted: str) -> set[str]:
    module, _, name = dotted.rpartition(".")
    spec = importlib.util.find_spec(module)  # imports the packages above it, not the module (nor httptools)
    assert spec is not None and spec.origin is not None, f"{module}: no source"
    tree = ast.parse(Path(spec.origin).read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    assert classes, f"{module} has no class {name} any more"
    names = assigned_in(classes[0])
    for item in classes[0].body:
        if isinstance(item, FUNCTIONS):
            names.add(item.name)
        elif isinstance(item, ast.Assign | ast.AnnAssign):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    for base in classes[0].bases:
        names |= provided(ast.unparse(base))  # asyncio.Protocol
    return names


def uses(source: str) -> set[str]:
    """The names a module uses as an attribute, by getattr, defines as a method or imports: what a row's module
    must show for its attribute (a whole name, not a substring of another)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, FUNCTIONS):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Call) and (name := self_attribute(node)) is not None:
            names.add(name)
    return names
