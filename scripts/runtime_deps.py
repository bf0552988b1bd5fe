"""The installed runtime distributions: the four packages the service imports and everything they pull in.

Run with the venv's interpreter to list them (`--count` for the number). Requirements whose marker
leaves them uninstalled here (an extra, an older Python) are not part of the set.
"""

import importlib.metadata as metadata
import re
import sys

ROOTS = ("starlette", "uvicorn", "groq", "python-dotenv")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_runtime() -> dict[str, set[str]]:
    """Each installed runtime distribution, with the distributions that require it (empty for a root)."""
    pulled_by: dict[str, set[str]] = {name: set() for name in ROOTS}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        for requirement in metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            dependency = canonical(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
            try:
                metadata.distribution(dependency)
            except metadata.PackageNotFoundError:
                continue
            if dependency not in pulled_by:
                pulled_by[dependency] = set()
                todo.append(dependency)
            pulled_by[dependency].add(name)
    return pulled_by


if __name__ == "__main__":
    found = installed_runtime()
    if "--count" in sys.argv:
        print(len(found))
    else:
        for name, parents in sorted(found.items()):
            print(f"{name:20} {metadata.version(name):12} {', '.join(sorted(parents)) or '(imported by the service)'}")
