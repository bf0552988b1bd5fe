"""The benchmark: what the service adds to a Groq call, measured against a fast fake Groq on 127.0.0.1.

    python bench/run.py                     # 3 runs, medians with min-max, writes bench/results/<date>.md
    python bench/run.py --quick --out -     # a tiny smoke run (what the tests do)
    python bench/run.py --only fallback     # one group of rows alone (here FALLBACK_MODELS's cost)
    python bench/run.py --only quota        # the quota rows: CPU in process and in Redis, the busy loop
    python bench/run.py --only fast-extra   # the default install vs the fast extra, side by side (fast_extra.py)

With 2+ cores the service runs alone on core 0 and the fake upstream and load generator on core 1.
Load comes from wrk when installed (apt-get install wrk), else from a lean asyncio client.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "gsk_fake_test_key_0123456789"
CHAT = {"prompt": "Say hello"}
TICKS = os.sysconf("SC_CLK_TCK")
TWO_CORES = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(core: str) -> list[str]:
    return ["taskset", "-c", core] if TWO_CORES else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def family(pid: int) -> list[int]:
    """The process and its descendants (uvicorn workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children")
        pids += [int(p) for p in children.read_text().split()] if children.exists() else []
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in family(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mb(pid: int) -> float:
    kb = 0
    for p in family(pid):
        kb += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))  # type: ignore[union-attr]
    return kb / 1024


def start_fake(python: str, chunks: int) -> tuple[subprocess.Popen[str], str]:
    command = [*pinned("1"), python, str(ROOT / "tests" / "fake_groq.py"), "--stream-chunks", str(chunks)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{proc.stdout.readline().strip()}"


def start_service(
    python: str, fake_url: str, workers: int, max_concurrency: int = 64, command: tuple[str, ...] = ("app.py",)
) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {**os.environ, "GROQ_API_KEY": KEY, "GROQ_BASE_URL": fake_url, "PORT": str(port), "WORKERS": str(workers)}
    env["MAX_CONCURRENCY"] = str(max_concurrency)
    cores = "0" if workers == 1 else "0,1"
    started = time.perf_counter()
    proc = subprocess.Popen([*pinned(cores), python, *command], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc, url, (time.perf_counter() - started) * 1000
        except OSError:
            assert proc.poll() is None, "service exited"
            time.sleep(0.002)


def load(
    url: str, path: str, body: dict[str, Any], concurrency: int, seconds: float, auth: bool = False, *, wrk: bool
) -> dict[str, float]:
    """Closed-loop load: requests/s, p50/p99/max latency in ms and the number of requests answered 200."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if auth else {})}
    if wrk:
        return _wrk(url + path, json.dumps(body), headers, concurrency, seconds)
    return asyncio.run(_asyncio_load(url, path, json.dumps(body).encode(), headers, concurrency, seconds))


def _wrk(url: str, body: str, headers: dict[str, str], concurrency: int, seconds: float) -> dict[str, float]:
    lua = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body) + "\n"
    lua += "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(lua)
        script.flush()
        command = [
            *pinned("1"),
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script.name,
            url,
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "max": _ms(re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "ok": requests - (int(bad.group(1)) if bad else 0),
        "bad": int(bad.group(1)) if bad else 0,
        "timeouts": int(timeouts.group(1)) if (timeouts := re.search(r"timeout (\d+)", out)) else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def _asyncio_load(
    url: str, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    request = (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body
    latencies: list[float] = []
    ok = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(host, int(port))
        while True:  # at least one request each, however late the client starts on a loaded machine
            started = time.perf_counter()
            writer.write(request)
            status_head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", status_head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            ok += status_head.startswith(b"HTTP/1.1 200")
            if time.perf_counter() >= deadline:
                break
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    # quantiles needs two points; a --quick phase on a busy machine may get only one
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    rps = len(latencies) / (time.perf_counter() - started)
    return {
        "rps": rps,
        "p50": cuts[49],
        "p99": cuts[98],
        "max": max(latencies),
        "ok": ok,
        "bad": len(latencies) - ok,
        "timeouts": 0,
    }


def upstream_connections(fake_url: str) -> int:
    """How many connections the fake Groq has accepted so far."""
    host, port = fake_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/fake/stats")
        return int(json.loads(connection.getresponse().read())["connections"])
    finally:
        connection.close()


def steady_connections(fake_url: str, seconds: float) -> Callable[[], int]:
    """Upstream connections opened from 20% to 80% into a load phase, away from its start and end."""
    samples: list[int] = []
    timers = [threading.Timer(seconds * f, lambda: samples.append(upstream_connections(fake_url))) for f in (0.2, 0.8)]
    for timer in timers:
        timer.start()

    def opened() -> int:
        for timer in timers:
            timer.join()
        if len(samples) < 2:
            raise RuntimeError("the fake Groq's connection count could not be read")
        return samples[1] - samples[0] - 1  # less the second sample's own connection

    return opened


async def _streams(url: str, count: int) -> int:
    """`count` concurrent streamed /chat calls read to the end; returns the content events received."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Count", "stream": True, "model": "bench/stream"}).encode()
    request = "POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
    request += f"Content-Length: {len(body)}\r\n\r\n"

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request.encode() + body)
        data = await reader.read()
        writer.close()
        assert b"data: [DONE]" in data, data[-200:]
        return data.count(b'data: {"content": "t')

    return sum(await asyncio.gather(*(one() for _ in range(count))))


FLOOR = """
import asyncio, sys, time, groq
async def main(url, key, model, concurrency, seconds):
    client = groq.AsyncGroq(api_key=key, base_url=url, max_retries=0)
    messages = [{"role": "user", "content": "Say hello"}]
    calls = 0
    async def worker(until):
        nonlocal calls
        while time.perf_counter() < until:
            await client.chat.completions.create(messages=messages, model=model)
            calls += 1
    await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
    calls, started = 0, time.process_time()
    await asyncio.gather(*(worker(time.perf_counter() + seconds) for _ in range(concurrency)))
    print((time.process_time() - started) / calls * 1e6)
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
"""


def sdk_floor_us(python: str, fake_url: str, model: str, concurrency: int, seconds: float) -> float:
    """CPU of one bare AsyncGroq.chat.completions.create against the same fake, in its own process on core 0."""
    command = [*pinned("0"), python, "-c", FLOOR, fake_url, KEY, model, str(concurrency), str(seconds)]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def runtime_distributions(python: str) -> int:
    command = [python, str(ROOT / "scripts" / "runtime_deps.py"), "--count"]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def one_run(
    python: str, fake_url: str, seconds: float, streams: int, chunks: int, workers: int, wrk: bool
) -> dict[str, float]:
    row: dict[str, float] = {}
    service, url, row["cold_start_ms"] = start_service(python, fake_url, workers)
    try:
        time.sleep(0.3)
        row["rss_idle_mb"] = rss_mb(service.pid)
        load(url, "/chat", CHAT, 1, 0.5, wrk=wrk)  # warm-up
        cpu = cpu_seconds(service.pid)
        c1 = load(url, "/chat", CHAT, 1, seconds, wrk=wrk)
        row["cpu_us_c1"] = (cpu_seconds(service.pid) - cpu) / c1["ok"] * 1e6
        direct = load(
            fake_url,
            "/openai/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Say hello"}], "model": "m"},
            1,
            seconds,
            auth=True,
            wrk=wrk,
        )
        row |= {
            "c1_p50_ms": c1["p50"],
            "c1_p99_ms": c1["p99"],
            "direct_p50_ms": direct["p50"],
            "direct_p99_ms": direct["p99"],
        }
        row["added_p50_ms"] = c1["p50"] - direct["p50"]
        row["c1_max_ms"] = c1["max"]
        load(url, "/chat", CHAT, 64, 0.5, wrk=wrk)  # warm-up: every upstream connection opened
        time.sleep(0.3)  # the calls the warm-up's end cut off free their slots
        cpu, opened = cpu_seconds(service.pid), steady_connections(fake_url, seconds)
        fast = load(url, "/chat", CHAT, 64, seconds, wrk=wrk)
        row["cpu_us_c64"] = (cpu_seconds(service.pid) - cpu) / fast["ok"] * 1e6
        row["c64_new_conns_per_1000"] = opened() / (fast["rps"] * seconds * 0.6) * 1000
        row |= {"c64_rps": fast["rps"], "c64_p99_ms": fast["p99"], "c64_max_ms": fast["max"]}
        time.sleep(0.3)
        cpu, opened = cpu_seconds(service.pid), steady_connections(fake_url, seconds)
        slow = load(url, "/chat", {**CHAT, "model": "bench/delay50"}, 64, seconds, wrk=wrk)
        row["cpu_us_c64_delay50"] = (cpu_seconds(service.pid) - cpu) / slow["ok"] * 1e6
        row["c64_delay50_new_conns_per_1000"] = opened() / (slow["rps"] * seconds * 0.6) * 1000
        row["timeouts"] = fast["timeouts"] + slow["timeouts"]
        row["not_ok"] = fast["bad"] + slow["bad"]
        row |= {"c64_delay50_rps": slow["rps"], "c64_delay50_p99_ms": slow["p99"], "c64_delay50_max_ms": slow["max"]}
        time.sleep(0.5)  # calls cut off at the end of the last phase still hold their slots for up to 50 ms
        cpu = cpu_seconds(service.pid)
        forwarded = asyncio.run(_streams(url, streams))
        assert forwarded == streams * chunks, (forwarded, streams * chunks)
        row["cpu_us_per_chunk"] = (cpu_seconds(service.pid) - cpu) / forwarded * 1e6
        row["chunks_per_cpu_s"] = 1e6 / row["cpu_us_per_chunk"]
        row["rss_after_mb"] = rss_mb(service.pid)
    finally:
        service.terminate()
        service.wait(30)
    row |= at_capacity(python, fake_url, seconds, wrk)
    row["timeouts"] += row.pop("cap16_timeouts")
    row["not_ok"] += row.pop("cap16_not_ok")
    row |= metrics_cost(python, fake_url, seconds, wrk)
    row["floor_us_c1"] = sdk_floor_us(python, fake_url, "openai/gpt-oss-20b", 1, seconds)
    row["floor_us_c64_delay50"] = sdk_floor_us(python, fake_url, "bench/delay50", 64, seconds)
    row |= quota_overhead(python, fake_url, seconds, wrk)
    row |= fallback_cost(python, fake_url, seconds, wrk)
    row |= busy_loop(python, fake_url)
    row["ratio_c1"] = row["cpu_us_c1"] / row["floor_us_c1"]
    row["ratio_c64_delay50"] = row["cpu_us_c64_delay50"] / row["floor_us_c64_delay50"]
    return row


def at_capacity(python: str, fake_url: str, seconds: float, wrk: bool, capacity: int = 16) -> dict[str, float]:
    """A service with a smaller MAX_CONCURRENCY, loaded at exactly that many connections: its tail latency."""
    service, url, _ = start_service(python, fake_url, 1, max_concurrency=capacity)
    try:
        load(url, "/chat", CHAT, capacity, 0.5, wrk=wrk)  # warm-up
        time.sleep(0.3)
        full = load(url, "/chat", CHAT, capacity, seconds, wrk=wrk)
    finally:
        service.terminate()
        service.wait(30)
    return {
        "cap16_rps": full["rps"],
        "cap16_p99_ms": full["p99"],
        "cap16_max_ms": full["max"],
        "cap16_timeouts": full["timeouts"],
        "cap16_not_ok": full["bad"],
    }


def metrics_cost(python: str, fake_url: str, seconds: float, wrk: bool) -> dict[str, float]:
    """CPU per /chat (c=1) with METRICS=true as a ratio to without, and the idle RSS with it.

    Both services run at once and are loaded in turns, so the drift of a shared machine hits both alike.
    """
    if subprocess.run([python, "-c", "import prometheus_client"], capture_output=True).returncode:
        return dict.fromkeys(("metrics_cpu_ratio", "metrics_cpu_us_c1", "metrics_rss_idle_mb"), float("nan"))
    services: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for metrics in ("false", "true"):
            os.environ["METRICS"] = metrics  # start_service passes the environment on
            services.append(start_service(python, fake_url, 1)[:2])
        time.sleep(0.3)
        row = {"metrics_rss_idle_mb": rss_mb(services[1][0].pid)}
        for _, url in services:
            load(url, "/chat", CHAT, 1, 1.0, wrk=False)  # warm-up
        cpu, answered = in_turns(services, seconds, wrk)
    finally:
        os.environ.pop("METRICS", None)
        for proc, _ in services:
            proc.terminate()
            proc.wait(30)
    row["metrics_cpu_us_c1"] = cpu[1] / answered[1] * 1e6
    row["metrics_cpu_ratio"] = row["metrics_cpu_us_c1"] / (cpu[0] / answered[0] * 1e6)
    return row


def in_turns(services: list[tuple[Any, str]], seconds: float, wrk: bool) -> tuple[list[float], list[int]]:
    """CPU seconds and answered /chat (c=1) of each service, loaded one after the other six times over, so the
    drift of a shared machine hits them alike."""
    cpu, answered = [0.0] * len(services), [0] * len(services)
    for _ in range(6):
        for i, (proc, url) in enumerate(services):
            before = cpu_seconds(proc.pid)
            answered[i] += int(load(url, "/chat", CHAT, 1, seconds / 5, wrk=wrk)["ok"])
            cpu[i] += cpu_seconds(proc.pid) - before
    return cpu, answered


FALLBACK = {"FALLBACK_MODELS": "openai/gpt-oss-20b>openai/gpt-oss-120b"}  # the benchmark's model has a fallback


def fallback_cost(python: str, fake_url: str, seconds: float, wrk: bool) -> dict[str, float]:
    """CPU per /chat (c=1) with FALLBACK_MODELS giving the asked-for model a fallback that is never taken (the fake
    always answers), as a ratio to the same service without it; both run at once and are loaded in turns."""
    services = [start_with(python, fake_url, env) for env in ({}, FALLBACK)]
    try:
        for _, url in services:
            load(url, "/chat", CHAT, 1, 0.5, wrk=wrk)  # warm-up
        cpu, answered = in_turns(services, seconds, wrk)
    finally:
        for proc, _ in services:
            proc.terminate()
            proc.wait(30)
    with_fallback = cpu[1] / answered[1] * 1e6
    return {"fallback_cpu_us_c1": with_fallback, "fallback_cpu_ratio": with_fallback / (cpu[0] / answered[0] * 1e6)}


FIGURES = [  # key, label, target, format
    ("ratio_c1", "CPU per /chat ÷ CPU of one bare AsyncGroq call, one at a time", "≤ 1.25", "{:.2f}"),
    ("cpu_us_c1", "service CPU per non-streamed /chat, c=1 (µs)", "", "{:.0f}"),
    ("floor_us_c1", "SDK floor: one AsyncGroq.chat.completions.create, c=1 (µs CPU)", "", "{:.0f}"),
    ("ratio_c64_delay50", "the same ratio at c=64 with 50 ms upstream (SDK floor also at c=64)", "", "{:.2f}"),
    ("cpu_us_c64_delay50", "service CPU per /chat, c=64, 50 ms upstream (µs)", "", "{:.0f}"),
    ("floor_us_c64_delay50", "SDK floor at c=64, 50 ms upstream (µs CPU)", "", "{:.0f}"),
    ("cpu_us_c64", "service CPU per /chat, c=64, no upstream delay (µs)", "", "{:.0f}"),
    ("c64_delay50_rps", "throughput c=64, 50 ms upstream (req/s)", "≥ 480", "{:.0f}"),
    ("c64_delay50_p99_ms", "p99 c=64, 50 ms upstream (ms)", "", "{:.1f}"),
    ("c64_delay50_max_ms", "max c=64, 50 ms upstream (ms)", "", "{:.1f}"),
    ("c64_delay50_new_conns_per_1000", "new upstream connections per 1,000 calls, c=64, 50 ms delay", "≤ 1", "{:.2f}"),
    ("c64_rps", "throughput c=64 = MAX_CONCURRENCY, no upstream delay (req/s)", "", "{:.0f}"),
    ("c64_p99_ms", "p99 c=64 = MAX_CONCURRENCY, no upstream delay (ms)", "", "{:.1f}"),
    ("c64_max_ms", "max c=64 = MAX_CONCURRENCY, no upstream delay (ms)", "< 1000", "{:.1f}"),
    ("c64_new_conns_per_1000", "new upstream connections per 1,000 requests, c=64, no delay", "≤ 1", "{:.2f}"),
    ("cap16_rps", "throughput c=16 = MAX_CONCURRENCY=16, no upstream delay (req/s)", "", "{:.0f}"),
    ("cap16_p99_ms", "p99 c=16 = MAX_CONCURRENCY=16, no upstream delay (ms)", "", "{:.1f}"),
    ("cap16_max_ms", "max c=16 = MAX_CONCURRENCY=16, no upstream delay (ms)", "< 1000", "{:.1f}"),
    ("timeouts", "requests with no answer within 10 s, c=16 and c=64 phases (not in p99 or max)", "0", "{:.0f}"),
    ("not_ok", "answers other than 200 in the c=16 and c=64 phases", "0", "{:.0f}"),
    ("c1_p50_ms", "p50 c=1 through the service (ms)", "", "{:.2f}"),
    ("c1_p99_ms", "p99 c=1 through the service (ms)", "", "{:.2f}"),
    ("c1_max_ms", "max c=1 through the service (ms)", "", "{:.2f}"),
    ("direct_p50_ms", "p50 c=1 straight to the fake (ms)", "", "{:.2f}"),
    ("added_p50_ms", "p50 added latency c=1 (ms)", "≤ 2.0", "{:.2f}"),
    ("cpu_us_per_chunk", "CPU per forwarded stream chunk (µs)", "≤ 50", "{:.1f}"),
    ("chunks_per_cpu_s", "forwarded chunks per CPU-second", "≥ 20,000", "{:,.0f}"),
    ("cold_start_ms", "cold start: process start → first 200 on / (ms)", "≤ 450", "{:.0f}"),
    ("rss_idle_mb", "RSS idle (MB)", "≤ 45", "{:.1f}"),
    ("rss_after_mb", "RSS after load (MB)", "≤ 55", "{:.1f}"),
    ("quota_local_ratio", "CPU per /chat with an in-process quota ÷ without, c=1", "≤ 1.05", "{:.2f}"),
    ("quota_redis_ratio", "CPU per /chat with the quota in Redis on 127.0.0.1 ÷ without, c=1", "≤ 1.40", "{:.2f}"),
    ("busy_unavailable", "busy loop, quota in Redis: quota_unavailable answers, c=40, ~850 KB bodies", "0", "{:.0f}"),
    ("busy_over_limit", "busy loop, QUOTA_FAIL_MODE=open: Groq calls past a limit of 10, c=40, ~850 KB", "0", "{:.0f}"),
    ("metrics_cpu_ratio", "CPU per /chat with METRICS=true ÷ without, c=1, in turns", "≤ 1.05", "{:.3f}"),
    ("metrics_cpu_us_c1", "service CPU per /chat with METRICS=true, c=1 (µs)", "", "{:.0f}"),
    ("metrics_rss_idle_mb", "RSS idle with METRICS=true (MB)", "", "{:.1f}"),
    (
        "fallback_cpu_ratio",
        "CPU per /chat with FALLBACK_MODELS set, no fallback taken ÷ without, c=1, in turns",
        "≤ 1.05",
        "{:.3f}",
    ),
    ("fallback_cpu_us_c1", "service CPU per /chat with FALLBACK_MODELS set, c=1 (µs)", "", "{:.0f}"),
]


QUOTAS = {"QUOTA_REQUESTS_PER_MINUTE": "1000000000", "QUOTA_TOKENS_PER_MINUTE": "1000000000000"}


def quota_overhead(python: str, fake_url: str, seconds: float, wrk: bool) -> dict[str, float]:
    """Service CPU per /chat, c=1, with quotas in process and in a local redis-server, each as a ratio to the
    same service without quotas; the three run side by side and are measured in turns, so drift hits all alike.
    Redis's own CPU is not counted; NaN when redis-server or the redis package is missing."""
    redis_server, port = shutil.which("redis-server"), free_port()
    has_redis = redis_server and subprocess.run([python, "-c", "import redis"], capture_output=True).returncode == 0
    redis = None
    if has_redis:
        command = [*pinned("1"), redis_server or "", "--port", str(port), "--save", "", "--appendonly", "no"]
        redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    configs = {
        "base": {},
        "local": QUOTAS,
        **({"redis": {**QUOTAS, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}} if redis else {}),
    }
    services = {name: start_with(python, fake_url, env) for name, env in configs.items()}
    spent = dict.fromkeys(services, 0.0)
    done = dict.fromkeys(services, 0.0)
    try:
        for _, url in services.values():
            load(url, "/chat", CHAT, 1, 0.5, wrk=wrk)  # warm-up
        for _ in range(5):
            for name, (service, url) in services.items():
                cpu = cpu_seconds(service.pid)
                done[name] += load(url, "/chat", CHAT, 1, seconds / 5, wrk=wrk)["ok"]
                spent[name] += cpu_seconds(service.pid) - cpu
    finally:
        for service, _ in services.values():
            service.terminate()
            service.wait(30)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    per_call = {name: spent[name] / done[name] for name in services}
    redis_ratio = per_call["redis"] / per_call["base"] if "redis" in per_call else math.nan
    return {"quota_local_ratio": per_call["local"] / per_call["base"], "quota_redis_ratio": redis_ratio}


BUSY_BODY = json.dumps({"prompt": "x" * 850_000}).encode()  # parsing 40 of these keeps the loop busy


def busy_loop(python: str, fake_url: str) -> dict[str, float]:
    """40 requests of ~850 KB at once against a limit of 10 a minute in a healthy local Redis (issue 22): with
    QUOTA_FAIL_MODE=closed, the quota_unavailable answers; with open, the calls that reached Groq past the 10.
    Both should be 0: a loop busy parsing bodies is no Redis outage. NaN without redis-server or redis-py."""
    redis_server, port = shutil.which("redis-server"), free_port()
    if not redis_server or subprocess.run([python, "-c", "import redis"], capture_output=True).returncode:
        return {"busy_unavailable": math.nan, "busy_over_limit": math.nan}
    command = [*pinned("1"), redis_server, "--port", str(port), "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    row: dict[str, float] = {}
    try:
        for mode in ("closed", "open"):
            env = {
                "QUOTA_REQUESTS_PER_MINUTE": "10",
                "QUOTA_FAIL_MODE": mode,
                "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            }
            service, url = start_with(python, fake_url, env)
            try:
                answers = asyncio.run(asyncio.wait_for(_posts(url, BUSY_BODY, 40), 60))
            finally:
                service.terminate()
                service.wait(30)
            if mode == "closed":
                row["busy_unavailable"] = sum(b'"quota_unavailable"' in answer for answer in answers)
            else:
                row["busy_over_limit"] = max(0, sum(answer.startswith(b"HTTP/1.1 200") for answer in answers) - 10)
    finally:
        redis.terminate()
        redis.wait(10)
    return row


async def _posts(url: str, body: bytes, count: int) -> list[bytes]:
    """`count` POST /chat at once, each on its own connection; their whole answers."""
    host, port = url.removeprefix("http://").split(":")
    head = "POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        answer = await reader.read()
        writer.close()
        return answer

    return await asyncio.gather(*(one() for _ in range(count)))


def quota_rows(python: str, fake_url: str, seconds: float, wrk: bool) -> dict[str, float]:
    """The quota rows: CPU in process and in Redis against none, and the busy loop."""
    return quota_overhead(python, fake_url, seconds, wrk) | busy_loop(python, fake_url)


ONLY = {  # --only: one group of rows, without the rest
    "metrics": metrics_cost,
    "fallback": fallback_cost,
    "quota": quota_rows,
}


def start_with(
    python: str, fake_url: str, env: dict[str, str], command: tuple[str, ...] = ("app.py",)
) -> tuple[subprocess.Popen[bytes], str]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        service, url, _ = start_service(python, fake_url, 1, command=command)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return service, url


def report(rows: list[dict[str, float]], distributions: int, meta: str) -> str:
    lines = [meta, "", "| figure | median | min–max | target |", "|---|---|---|---|"]
    for key, label, target, fmt in FIGURES:
        if key not in rows[0]:  # --only: the other rows were not measured
            continue
        values = [r[key] for r in rows]
        spread = f"{fmt.format(min(values))}–{fmt.format(max(values))}"
        lines.append(f"| {label} | {fmt.format(statistics.median(values))} | {spread} | {target} |")
    lines.append(f"| installed runtime distributions | {distributions} | | ≤ 18 |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load phase")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the venv to measure")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 1 run, short phases")
    parser.add_argument("--only", choices=sorted([*ONLY, "fast-extra"]), help="measure only this group of rows")
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio load generator even if wrk is installed")
    parser.add_argument("--out", help="Markdown file to write ('-' for none); default bench/results/<date>.md")
    args = parser.parse_args()
    wrk = shutil.which("wrk") is not None and not args.no_wrk
    if args.quick:
        args.runs, args.seconds, args.streams, args.chunks = 1, 0.5, 4, 50
    if wrk:  # wrk runs whole seconds; the connection-count window is a share of the phase
        args.seconds = max(1, round(args.seconds))
    fake, fake_url = start_fake(args.python, args.chunks)
    try:
        if args.only == "fast-extra":
            rows = []
        elif args.only:
            rows = [ONLY[args.only](args.python, fake_url, args.seconds, wrk) for _ in range(args.runs)]
        else:
            rows = [
                one_run(args.python, fake_url, args.seconds, args.streams, args.chunks, args.workers, wrk)
                for _ in range(args.runs)
            ]
        side_by_side = ""
        if args.only in (None, "fast-extra"):
            import fast_extra  # bench/fast_extra.py, beside this script

            side_by_side = "\n" + fast_extra.side_by_side(
                args.python, fake_url, args.runs, args.seconds, args.streams, wrk
            )
    finally:
        fake.terminate()
        fake.wait(10)
    loader = "wrk" if wrk else "asyncio client"
    meta = (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()} · {args.runs} runs × {args.seconds:g} s phases, load by {loader}, "
        f"workers={args.workers}, {'service pinned to core 0' if TWO_CORES else 'no pinning'} · "
        f"`python bench/run.py {' '.join(sys.argv[1:])}`"
    )
    table = report(rows, runtime_distributions(args.python), meta) if rows else meta + "\n"
    table += side_by_side
    print(table)
    if args.out != "-":
        name = f"{datetime.date.today()}{'-' + args.only if args.only else ''}.md"
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
