"""The default install and the fast extra (requirements-fast.txt: httptools and the SDK's aiohttp transport)
side by side, in one run: `python bench/run.py --only fast-extra` (and part of every full `bench/run.py`).

The interpreter measured (`--python`) must hold the fast extra; the default install is a venv beside it holding
the same packages but the extra's (links, nothing downloaded). Both services run at once on core 0 and every
load phase is run in turns, one install then the other, so the drift of a shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py: the fake, the service, the load generators and the /proc readings

ROOT = Path(__file__).resolve().parent.parent
INSTALLS = ("default", "fast")
PHASES = [  # name, concurrency, model (bench/delay50: the fake answers after 50 ms)
    ("c1", 1, None),
    ("c16", 16, None),
    ("c64", 64, None),
    ("c64_delay50", 64, "bench/delay50"),
]
ROWS = [  # key, label, target (on the fast extra), format
    ("cpu_us_c1", "service CPU per /chat, c=1 (µs)", "", "{:.0f}"),
    ("cpu_us_c16", "service CPU per /chat, c=16, no upstream delay (µs)", "", "{:.0f}"),
    ("cpu_us_c64", "service CPU per /chat, c=64, no upstream delay (µs)", "≤ 0.8× default", "{:.0f}"),
    ("cpu_us_c64_delay50", "service CPU per /chat, c=64, 50 ms upstream (µs)", "", "{:.0f}"),
    ("rps_c64", "throughput c=64 = MAX_CONCURRENCY, no upstream delay (req/s)", "", "{:.0f}"),
    ("rps_c64_delay50", "throughput c=64, 50 ms upstream (req/s)", "", "{:.0f}"),
    ("p99_c64", "p99 c=64 = MAX_CONCURRENCY, no upstream delay (ms)", "no worse", "{:.1f}"),
    ("max_c64", "max c=64 = MAX_CONCURRENCY, no upstream delay (ms)", "", "{:.1f}"),
    ("p99_c64_delay50", "p99 c=64, 50 ms upstream (ms)", "no worse", "{:.1f}"),
    ("max_c64_delay50", "max c=64, 50 ms upstream (ms)", "", "{:.1f}"),
    ("cpu_us_per_chunk", "CPU per forwarded stream chunk (µs)", "", "{:.1f}"),
    ("cold_start_ms", "cold start: process start → first 200 on / (ms)", "", "{:.0f}"),
    ("rss_idle_mb", "RSS idle (MB)", "", "{:.1f}"),
    ("rss_after_mb", "RSS after load (MB)", "≤ 70", "{:.1f}"),
    ("not_ok", "answers other than 200, and requests with no answer within 10 s", "0", "{:.0f}"),
    ("distributions", "installed runtime distributions", "", "{:.0f}"),
]
_PACKAGE = re.compile(r"^([A-Za-z0-9._-]+)==", re.M)


def default_install(python: str, directory: Path) -> str:
    """A venv holding `python`'s packages but the fast extra's (symlinks): the default install's interpreter."""
    base, extra = (
        set(_PACKAGE.findall((ROOT / lock).read_text())) for lock in ("requirements.txt", "requirements-fast.txt")
    )
    fast = {_canonical(name) for name in extra - base}
    where = "import groq, pathlib; print(pathlib.Path(groq.__file__).parent.parent)"
    source = Path(subprocess.run([python, "-c", where], capture_output=True, text=True, check=True).stdout.strip())
    venv = directory / "default"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    [target] = (venv / "lib").glob("python3*/site-packages")
    for entry in source.iterdir():
        if _canonical(re.split(r"-\d", entry.name, maxsplit=1)[0].removesuffix(".py")) not in fast:
            (target / entry.name).symlink_to(entry)
    return str(venv / "bin" / "python")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def distributions(python: str) -> int:
    """The runtime set of scripts/runtime_deps.py, plus the fast extra's distributions when installed."""
    code = (
        "import importlib.metadata as m, re, sys\n"
        "sys.path.insert(0, 'scripts')\n"
        "from runtime_deps import installed_runtime\n"
        "names = set(installed_runtime())\n"
        "for name in re.findall(r'^([A-Za-z0-9._-]+)==', open('requirements-fast.txt').read(), re.M):\n"
        "    try: m.distribution(name); names.add(name.lower())\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(len(names))"
    )
    return int(subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def side_by_side(python: str, fake_url: str, rounds: int, seconds: float, streams: int, wrk: bool) -> str:
    has_extra = subprocess.run(
        [python, "-c", "import aiohttp, httpx_aiohttp, httptools"], capture_output=True
    ).returncode
    if has_extra:
        return "The fast extra is not installed in the interpreter measured: no side-by-side table.\n"
    with tempfile.TemporaryDirectory() as directory:
        pythons = {"default": default_install(python, Path(directory)), "fast": python}
        return _table(_measure(pythons, fake_url, rounds, seconds, streams, wrk))


def _measure(
    pythons: dict[str, str], fake_url: str, rounds: int, seconds: float, streams: int, wrk: bool
) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, Any]] = {name: {"not_ok": 0} for name in INSTALLS}
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    spent = {(name, phase): [0.0, 0] for name in INSTALLS for phase, _, _ in PHASES}
    tails: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in spent}
    try:
        for name in INSTALLS:
            service, url, rows[name]["cold_start_ms"] = run.start_service(pythons[name], fake_url, 1)
            services[name] = (service, url)
            rows[name]["distributions"] = distributions(pythons[name])
        time.sleep(0.3)
        for name, (service, url) in services.items():
            rows[name]["rss_idle_mb"] = run.rss_mb(service.pid)
            run.load(url, "/chat", run.CHAT, 64, 0.5, wrk=wrk)  # warm-up: every upstream connection opened
        for _ in range(rounds):
            for phase, concurrency, model in PHASES:
                body = {**run.CHAT, **({"model": model} if model else {})}
                for name, (service, url) in services.items():
                    time.sleep(0.3)  # the calls the last phase's end cut off free their slots
                    cpu = run.cpu_seconds(service.pid)
                    result = run.load(url, "/chat", body, concurrency, seconds, wrk=wrk)
                    spent[name, phase][0] += run.cpu_seconds(service.pid) - cpu
                    spent[name, phase][1] += int(result["ok"])
                    tails[name, phase].append(result)
                    rows[name]["not_ok"] += result["bad"] + result["timeouts"]
        for name, (service, url) in services.items():
            time.sleep(0.5)
            cpu = run.cpu_seconds(service.pid)
            forwarded = asyncio.run(run._streams(url, streams))
            rows[name]["cpu_us_per_chunk"] = (run.cpu_seconds(service.pid) - cpu) / forwarded * 1e6
            rows[name]["rss_after_mb"] = run.rss_mb(service.pid)
    finally:
        for service, _ in services.values():
            service.terminate()
            service.wait(30)
    for (name, phase), (cpu, answered) in spent.items():
        rows[name][f"cpu_us_{phase}"] = cpu / answered * 1e6
        for figure in ("rps", "p99", "max"):
            rows[name][f"{figure}_{phase}"] = statistics.median(r[figure] for r in tails[name, phase])
    return rows


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "The default install vs the fast extra (requirements-fast.txt), one worker each, measured in turns:",
        "",
        "| figure | default | fast extra | fast ÷ default | target |",
        "|---|---|---|---|---|",
    ]
    for key, label, target, fmt in ROWS:
        default, fast = rows["default"][key], rows["fast"][key]
        ratio = f"{fast / default:.2f}" if default else ""
        lines.append(f"| {label} | {fmt.format(default)} | {fmt.format(fast)} | {ratio} | {target} |")
    return "\n".join(lines) + "\n"
