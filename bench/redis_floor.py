"""What one Redis round trip per request costs the service, whatever the quota code does around it.

    python bench/redis_floor.py             # 8 turns of 2 s per service, c=1, medians

Four services side by side on core 0, measured in turns (the same fake Groq, wrk and redis-server on core 1):
no quota; the quota in Redis as built; the same without its settlements (what a settlement costs); and the
floor: each admission replaced by one bare `PING` over a raw asyncio socket and no settlement (no Lua, no
redis-py in the request path). Each is printed as CPU per /chat and as a ratio to the first. The floor is what
any quota that asks Redis once per request pays on this machine: it bounds bench/run.py's quota row from below.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the fake, the load generator, the CPU counters

NO_SETTLEMENT = """
import asyncio, os, runpy, sys
import quota_redis
from quota_types import Raw

async def settle(self, ticket, tokens, refund_request):
    return True

quota_redis.Shared.settle = settle
"""
RUN_APP = """
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
"""
FLOOR = """
class Ping(asyncio.Protocol):
    waiter = None
    def data_received(self, data):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)

async def admit(self, client, limits, cost, commit):
    if not hasattr(self, "ping"):
        port = int(os.environ["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        self.ping = await asyncio.get_running_loop().create_connection(Ping, "127.0.0.1", port)
    transport, protocol = self.ping
    protocol.waiter = asyncio.get_running_loop().create_future()
    transport.write(b"PING\\r\\n")
    await protocol.waiter
    return Raw(0, 0.0, 10**6, 0.0, 0, 0.0, 0, 0.0, 0, 0)

quota_redis.Shared.admit = admit
"""


def main() -> None:
    python, turns, seconds = sys.executable, 8, 2
    wrk = shutil.which("wrk") is not None
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is missing: apt-get install -y redis-server"
    redis_port = run.free_port()
    quota = {**run.QUOTAS, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    launchers = {
        "no quota": ({}, ("app.py",)),
        "quota in Redis": (quota, ("app.py",)),
        "without settlements": (quota, ("-c", NO_SETTLEMENT + RUN_APP)),
        "floor: one raw PING": (quota, ("-c", NO_SETTLEMENT + FLOOR + RUN_APP)),
    }
    command = [*run.pinned("1"), redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    fake, fake_url = run.start_fake(python, 50)
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    per_call: dict[str, list[float]] = {name: [] for name in launchers}
    try:
        _wait_for_redis(redis_port)
        for name, (env, args) in launchers.items():
            services[name] = run.start_with(python, fake_url, env, args)
            run.load(services[name][1], "/chat", run.CHAT, 1, 1, wrk=wrk)  # warm-up
        for _ in range(turns):
            for name, (proc, url) in services.items():
                cpu = run.cpu_seconds(proc.pid)
                done = run.load(url, "/chat", run.CHAT, 1, seconds, wrk=wrk)["ok"]
                assert done, f"{name}: no request answered 200"
                per_call[name].append((run.cpu_seconds(proc.pid) - cpu) / done * 1e6)
    finally:
        processes: list[subprocess.Popen[Any]] = [*(service for service, _ in services.values()), redis, fake]
        for proc in processes:
            proc.terminate()
            proc.wait(30)
    base = statistics.median(per_call["no quota"])
    for name, values in per_call.items():
        median = statistics.median(values)
        print(f"{name:22s} {median:6.0f} µs CPU per /chat   ÷ no quota {median / base:.3f}")


def _wait_for_redis(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)


if __name__ == "__main__":
    main()
