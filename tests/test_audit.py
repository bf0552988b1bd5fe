"""What an auditor relies on: pinned dependencies, a known runtime set, documented config, a working benchmark."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from fake_groq import API_KEY, FakeGroq
from runtime_deps import installed_runtime

from env_values import SECRET_VARIABLES

REQUIREMENT = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[a-z0-9,-]+\])?==([^ ;\\]+)(?: ; [^\\]+)? \\$")


def pins(path: Path) -> dict[str, str]:
    """name -> version for every requirement in a lock (extras, markers allowed), asserting each is exact and hashed."""
    found: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line or line.startswith(("#", " ")):
            continue
        match = REQUIREMENT.match(line)
        assert match, f"{path.name}: {line!r} is not pinned with == and hashes"
        assert lines[i + 1].strip().startswith("--hash=sha256:"), f"{path.name}: {line!r} has no hash"
        found[match.group(1).lower()] = match.group(2)
    return found


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt", "requirements-fast.txt"])
def test_every_requirement_is_pinned_with_hashes(name: str) -> None:
    assert pins(ROOT / name)


def test_security_floors_are_pinned() -> None:
    runtime = pins(ROOT / "requirements.txt")
    assert version_tuple(runtime["starlette"]) >= (1, 3, 1)
    assert version_tuple(runtime["h11"]) >= (0, 16)
    assert version_tuple(runtime["uvicorn"]) >= (0, 54)


def test_runtime_set_is_the_readme_table_and_the_lock_file() -> None:
    """A new transitive dependency cannot slip in: it would be installed but not in the README table."""
    section = (ROOT / "README.md").read_text().split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    table = {row.split("|")[1].strip(" `").lower() for row in section.splitlines() if row.startswith("| `")}
    installed = set(installed_runtime())
    assert installed == table, (
        f"installed but not documented: {installed - table}; documented only: {table - installed}"
    )
    assert set(pins(ROOT / "requirements.txt")) == table
    assert len(table) <= 18


def test_env_example_lists_exactly_the_variables_the_code_reads() -> None:
    source = (ROOT / "config.py").read_text()
    read = set(re.findall(r'(?:environ\.get|env\.\w+|check_model)\("([A-Z][A-Z0-9_]+)"', source))
    read |= {f"{name}_FILE" for name in SECRET_VARIABLES}  # each secret may come from a file instead
    example = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert read == example
    documented = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in documented for name in read)


def test_the_size_budget_holds() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "size_budget.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_benchmark_runs(tmp_path: Path) -> None:
    """The smoke run as docs/performance.md shows it (`--quick --no-wrk --out -`): the benchmark itself works,
    the table goes to stdout and no file is written; no timing is asserted."""
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no-wrk", "--out", "-"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    assert "written to" not in table
    for label in ("CPU per /chat", "throughput c=64, 50 ms upstream", "CPU per forwarded stream chunk", "cold start"):
        assert label in table
    assert re.search(r"\| installed runtime distributions \| 18 \|", table)


@pytest.mark.parametrize(
    ("group", "label"),
    [
        ("metrics", "METRICS=true"),
        ("fallback", "FALLBACK_MODELS"),
        ("quota", "quota"),
    ],
)
def test_each_group_of_rows_runs_alone(group: str, label: str) -> None:
    """`bench/run.py --only <group>` (docs/performance.md), bounded by --quick: that group's rows, and no others."""
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--only", group, "--quick", "--no-wrk", "--out", "-"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "median" not in line]
    assert rows[-1].startswith("| installed runtime distributions |")
    assert rows[:-1] and all(label.lower() in row.lower() for row in rows[:-1]), result.stdout
    assert "throughput c=64" not in result.stdout  # a row of the full run: not measured


def test_a_load_phase_too_short_for_two_answers_still_gives_its_figures(fake: FakeGroq) -> None:
    """On a loaded machine a --quick phase (0.1 s) can end before a second answer: one answer still makes a row."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    body = json.dumps({"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}).encode()
    path, headers = (
        "/openai/v1/chat/completions",
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    row = asyncio.run(bench._asyncio_load(fake.url, path, body, headers, 1, 0.0))  # over before it starts
    assert (row["ok"], row["bad"]) == (1, 0)
    assert row["p50"] == row["p99"] == row["max"] > 0
    assert len(fake.chat_requests()) == 1


OPTIONAL_IMPORTS = (
    "keys",
    "quota",
    "quota_local",
    "quota_deadline",
    "quota_redis",
    "redis",
    "metrics",
    "prometheus_client",
)
LOADED = """
import json, os, sys, server, app, config
app.create_app(config.load_settings(json.loads(sys.argv[1])))
print(json.dumps(sorted(m for m in sys.modules if os.path.exists(m + ".py") or m in {optional})))
"""


@pytest.mark.parametrize(
    ("env", "added"),
    [
        ({}, []),
        ({"QUOTA_REQUESTS_PER_MINUTE": "5"}, ["quota", "quota_local", "quota_types"]),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, []),  # no quota: Redis is not used
        (
            {"QUOTA_REQUESTS_PER_MINUTE": "5", "REDIS_URL": "redis://127.0.0.1:1/0"},
            ["quota", "quota_deadline", "quota_redis", "quota_types", "redis"],
        ),
        ({"METRICS": "true"}, ["metrics", "prometheus_client"]),
        ({"FALLBACK_MODELS": "a>b"}, ["fallback"]),
    ],
)
def test_a_feature_that_is_off_imports_nothing(env: dict[str, str], added: list[str]) -> None:
    """The default deployment loads exactly the modules the size budget and the audit guide list as default."""
    from size_budget import DEFAULT_MODULES

    code = LOADED.replace("{optional}", repr(set(OPTIONAL_IMPORTS)))
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps({"GROQ_API_KEY": "gsk_canary_0123456789", **env})],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == sorted([*DEFAULT_MODULES, *added])


def test_the_audit_guide_gives_each_file_s_lines_and_the_budgets_as_they_are() -> None:
    """docs/audit.md's table of lines per file, its row totals and the budgets, against the files themselves."""
    from size_budget import DEFAULT_BUDGET, DEFAULT_MODULES, TOTAL_BUDGET, _counts

    counts = _counts()
    guide = (ROOT / "docs" / "audit.md").read_text()
    table = guide.split("| runs | modules, with their lines | lines |", 1)[1].split("\n\n", 1)[0]
    wrong = []
    for row in table.splitlines()[2:]:
        what, modules, lines = row.strip("| ").split(" | ")
        shown = {name: int(count) for name, count in re.findall(r"`([\w/.]+)` (\d+)", modules)}
        wrong += [
            f"{name}: {count} shown, {counts[name]} in the file"
            for name, count in shown.items()
            if counts[name] != count
        ]
        total = sum(counts.values()) if what == "all" else sum(counts[name] for name in shown)
        if int(lines.split(" ")[0].replace(",", "")) != total:
            wrong.append(f"{what}: {lines} shown, {total:,} lines")
    default = sum(counts[name] for name in DEFAULT_MODULES)
    assert f"runs {len(DEFAULT_MODULES)} modules, {default:,} lines" in guide
    assert f"(budget {DEFAULT_BUDGET:,})" in table and f"(budget {TOTAL_BUDGET:,})" in table
    assert not wrong, wrong
