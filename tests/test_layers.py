"""The service's modules form layers that only point down: no import circle, and no import of a higher layer.

Every import counts: at the top of a module, inside a function (the optional features' lazy imports), and under
`if TYPE_CHECKING:` (a type named from above is still a dependency on what is above). An import string such as
uvicorn's "app:app" is not an import. A module new to the repository fails `test_every_module_has_a_layer` until
it is added to LAYERS below, in the lowest layer above everything it imports, and to the same layer of the list in
docs/architecture.md ("Layers"), which must equal LAYERS.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. A module may import only modules of the layers before its own (not its own layer's).
LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaves: nothing of ours",
        {
            "disconnect",
            "env_values",
            "errors",
            "logging_config",
            "pacing",
            "quota_types",
            "quota_deadline",
            "record",
            "upstream_aiohttp",
            "workers",
        },
    ),
    ("on the request's record: the error envelope, the write deadline", {"envelope", "write_deadline"}),
    ("readers of one input, on errors or env_values", {"body", "groq_wire", "keys"}),
    ("the settings", {"config"}),
    ("on the settings", {"access", "middleware", "validation", "upstream_clients", "quota_local", "quota_redis"}),
    ("the request's parts and features", {"fallback", "metrics", "quota", "sdk_validation", "shutdown"}),
    ("Groq, and the stream relayed to the client", {"llm", "streaming"}),
    ("the script API", {"chat_api"}),
    ("the connection under the app, and the reload", {"framing", "reloading"}),
    ("the process: uvicorn, signals, workers", {"server"}),
    ("the app: routes, middleware, handlers", {"app"}),
]


def imports_of(path: Path, ours: Iterable[str]) -> set[str]:
    """The modules of ours that `path` imports anywhere in its text (functions and TYPE_CHECKING included)."""
    names = set(ours)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & names) - {path.stem}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = {path.stem: path for path in sorted(root.glob("*.py"))}
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None: a depth-first walk that meets a module still on its path."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(sorted(graph[start]))]
        while pending:
            following = next(pending[-1], None)
            if following is None:  # every import of path[-1] walked: it is on no circle
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if following in on_path:
                return [*path[path.index(following) :], following]
            if following not in done:
                path.append(following)
                on_path.add(following)
                pending.append(iter(sorted(graph[following])))
    return None


def layer_problems(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    level = {module: i for i, (_, modules) in enumerate(layers) for module in modules}
    problems = []
    for module, imported in sorted(graph.items()):
        if module not in level:
            lowest = max((level[name] for name in imported if name in level), default=-1) + 1
            where = layers[lowest][0] if lowest < len(layers) else "a new layer above the last"
            problems.append(
                f"{module}.py is in no layer of tests/test_layers.py: add it to LAYERS, in the lowest layer above"
                f" every module it imports ({', '.join(sorted(imported)) or 'none'}): layer {lowest}, {where!r}"
            )
            continue
        for name in sorted(imported):
            if name in level and level[name] >= level[module]:
                problems.append(
                    f"{module}.py (layer {level[module]}, {layers[level[module]][0]!r}) imports {name}"
                    f" (layer {level[name]}, {layers[level[name]][0]!r}): imports must point to a lower layer"
                )
    for module in sorted(set(level) - set(graph)):
        problems.append(f"LAYERS names {module}, which is no module of the repository any more: remove it")
    return problems


def test_no_import_circle() -> None:
    circle = find_circle(import_graph(ROOT))
    assert circle is None, f"import circle: {' -> '.join(circle or ())}"


def test_every_module_has_a_layer_and_imports_only_lower_layers() -> None:
    problems = layer_problems(import_graph(ROOT), LAYERS)
    assert not problems, "\n".join(problems)


def documented_layers(text: str) -> list[set[str]]:
    """The numbered list under "## Layers" in docs/architecture.md: each item's modules, the names in backticks
    before its first ": " (its description follows), checked to be numbered 0, 1, 2, ... in order."""
    section = text.partition("\n## Layers\n")[2].partition("\n## ")[0]
    items = re.findall(r"^(\d+)\. (.*(?:\n   .*)*)", section, flags=re.MULTILINE)
    assert [int(number) for number, _ in items] == list(range(len(items))), "the layers are not numbered 0, 1, 2, ..."
    return [set(re.findall(r"`(\w+)`", item.partition(": ")[0])) for _, item in items]


def test_the_architecture_page_lists_these_layers() -> None:
    documented = documented_layers((ROOT / "docs" / "architecture.md").read_text())
    layers = [modules for _, modules in LAYERS]
    differ = [
        f"layer {i}: {sorted(d)} in the page, {sorted(m)} in LAYERS"
        for i, (d, m) in enumerate(zip(documented, layers, strict=False))
        if d != m
    ]
    assert documented == layers, (
        f"docs/architecture.md's Layers list ({len(documented)} layers) is not LAYERS ({len(layers)}): {differ}"
    )


def test_each_module_is_in_one_layer() -> None:
    seen: dict[str, str] = {}
    for name, modules in LAYERS:
        for module in modules:
            assert module not in seen, f"{module} is in two layers: {seen[module]!r} and {name!r}"
            seen[module] = name


# The checks themselves, on small made-up trees: each finds what it is for.


def _tree(tmp_path: Path, modules: dict[str, str]) -> Path:
    for name, text in modules.items():
        (tmp_path / f"{name}.py").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("modules", "circle"),
    [
        ({"a": "import b\n", "b": "import a\n"}, ["a", "b", "a"]),
        (
            {"a": "from b import x\n", "b": "def f():\n    import c\n", "c": "if TYPE_CHECKING:\n    import a\n"},
            ["a", "b", "c", "a"],
        ),
        ({"a": "import b\n", "b": "import c\n", "c": "import json\n"}, None),
        ({"a": "import b, c\n", "b": "import c\n", "c": "'app:app'\n"}, None),  # a diamond, and a string
    ],
)
def test_find_circle_names_the_circle(tmp_path: Path, modules: dict[str, str], circle: list[str] | None) -> None:
    assert find_circle(import_graph(_tree(tmp_path, modules))) == circle


def test_documented_layers_reads_the_modules_before_each_description() -> None:
    text = (
        "# Page\n\n## Layers\n\nThe rule.\n\n0. `a` `b`: on `c`,\n   and `d`.\n1. `e`: top.\n\n## Next\n\n0. `f`: no.\n"
    )
    assert documented_layers(text) == [{"a", "b"}, {"e"}]
    with pytest.raises(AssertionError, match="numbered"):
        documented_layers(text.replace("1. `e`", "2. `e`"))


def test_layer_problems_name_an_upward_import_and_an_unknown_module(tmp_path: Path) -> None:
    graph = import_graph(_tree(tmp_path, {"low": "import high\n", "high": "import low\n", "new": "import high\n"}))
    layers = [("bottom", {"low"}), ("top", {"high"}), ("gone", {"old"})]
    assert layer_problems(graph, layers) == [
        "low.py (layer 0, 'bottom') imports high (layer 1, 'top'): imports must point to a lower layer",
        "new.py is in no layer of tests/test_layers.py: add it to LAYERS, in the lowest layer above every module it"
        " imports (high): layer 2, 'gone'",
        "LAYERS names old, which is no module of the repository any more: remove it",
    ]
