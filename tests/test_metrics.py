"""METRICS=true: `/metrics` in the Prometheus text format, parsed with prometheus-client's own parser."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import groq
import httpx
import pytest
from conftest import CLIENT_TOKEN, ROOT, Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from prometheus_client.parser import text_string_to_metric_families
from test_audit import pins
from test_chat import assert_error
from uvicorn.protocols.http.auto import AutoHTTPProtocol

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODEL = "openai/gpt-oss-20b"  # GROQ_MODEL's default
STREAMED = "openai/gpt-oss-120b"
AUTH = {"authorization": f"Bearer {CLIENT_TOKEN}"}
SCRAPER_TOKEN = "prom_scraper_token_5a4b3c2d1e"
SCRAPER = {"authorization": f"Bearer {SCRAPER_TOKEN}"}
KEY_ID = hashlib.sha256(CLIENT_TOKEN.encode()).hexdigest()[:8]
GEN_AI = ("chat", "groq")
NOT_FOUND = {"message": "The model does not exist", "type": "invalid_request_error", "code": "model_not_found"}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """One scrape on a fresh connection, every sample by name and label set."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return found


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples of `name` keyed by the values of `labels`, which must be all their labels (but `le`)."""
    out: dict[tuple[str, ...], float] = {}
    for key, value in samples.get(name, {}).items():
        found = dict(key)
        found.pop("le", None)
        assert set(found) == set(labels), (name, found)
        out[tuple(found[label] for label in labels)] = value
    return out


def series(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """Distinct time series, counting a histogram's buckets, sum and count as one."""
    return {
        (
            name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum"),
            frozenset(k for k in key if k[0] != "le"),
        )
        for name, values in samples.items()
        for key in values
    }


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


HTTP = ("http_request_method", "http_route", "http_response_status_code")
OPERATION = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type")
USAGE = (*OPERATION, "gen_ai_token_type", "gen_ai_response_model")
FIRST_TOKEN = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")


def http_series(method: str, route: str, status: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return "http_server_request_duration_seconds", frozenset(zip(HTTP, (method, route, status), strict=True))


def test_a_known_set_of_requests_gives_exact_counts(fake: FakeGroq, start_service: Any) -> None:
    env = groq_env(
        fake, METRICS="true", METRICS_TOKEN=SCRAPER_TOKEN, SERVICE_API_KEYS=CLIENT_TOKEN, MAX_CONCURRENCY="1"
    )
    service: Service = start_service(env)
    fake.behaviours[STREAMED] = Behaviour(chunks=5)
    fake.behaviours["stall/model"] = Behaviour(chunks=20, stall_after=1)
    fake.behaviours["gone/model"] = Behaviour(status=404, error=NOT_FOUND)
    fake.behaviours["qwen/qwen3.6-27b"] = Behaviour(status=500)
    post = service.client.post

    # A stream holds the only slot: in flight, and the next call is refused as overloaded.
    held = {"prompt": "x", "model": "stall/model", "stream": True}
    with service.client.stream("POST", "/chat", json=held, headers=AUTH) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        during = scrape(service.url, SCRAPER)
        assert_error(post("/chat", json={"prompt": "Say hello"}, headers=AUTH), 503, "overloaded")
    wait_for(lambda: any(line.get("disconnected") for line in service.access_lines()), "the held stream's line")
    assert by(during, "groq_proxy_upstream_in_flight") == {(): 1}
    assert by(during, "groq_proxy_max_concurrency") == {(): 1}
    assert by(during, "http_server_active_requests", "http_route") == {("/chat",): 1, ("/metrics",): 1}

    assert post("/chat", json={"prompt": "Say hello"}, headers=AUTH).status_code == 200
    assert (
        post("/chat", json={"prompt": "Count to five", "stream": True, "model": STREAMED}, headers=AUTH).status_code
        == 200
    )
    assert_error(post("/chat", json={"prompt": "x", "model": "gone/model"}, headers=AUTH), 404, "upstream_rejected")
    assert_error(post("/chat", json={"prompt": "x", "model": "qwen/qwen3.6-27b"}, headers=AUTH), 502, "upstream_error")
    assert_error(post("/chat", json={"prompt": "Say hello"}), 401, "unauthorized")
    assert_error(post("/chat", json={"prompt": 1}, headers=AUTH), 422, "validation_error")
    assert_error(service.client.get("/metrics", headers=AUTH), 401, "unauthorized")  # the scraper's token only
    assert_error(service.client.get("/nope", headers=AUTH), 404, "not_found")
    with groq.Groq(base_url=service.url, api_key=CLIENT_TOKEN, max_retries=0) as client:
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi there"}], model=MODEL)
    relayed = {"model": STREAMED, "messages": [{"role": "user", "content": "Hi there"}], "stream": True}
    assert post("/v1/chat/completions", json=relayed, headers=AUTH).status_code == 200
    assert service.client.get("/v1/models", headers=AUTH).status_code == 200
    service.access_lines(14)

    after = scrape(service.url, SCRAPER)
    assert by(after, "http_server_request_duration_seconds_count", *HTTP) == {
        ("POST", "/chat", "200"): 3,
        ("POST", "/chat", "503"): 1,
        ("POST", "/chat", "404"): 1,
        ("POST", "/chat", "502"): 1,
        ("POST", "/chat", "401"): 1,
        ("POST", "/chat", "422"): 1,
        ("GET", "/metrics", "200"): 1,
        ("GET", "/metrics", "401"): 1,
        ("GET", "other", "404"): 1,
        ("POST", "/openai/v1/chat/completions", "200"): 1,
        ("POST", "/v1/chat/completions", "200"): 1,
        ("GET", "/v1/models", "200"): 1,
    }
    assert by(after, "groq_proxy_refused_total", "reason") == {
        ("overloaded",): 1,
        ("unauthorized",): 2,
        ("validation_error",): 1,
        ("not_found",): 1,
    }
    assert by(after, "gen_ai_client_operation_duration_seconds_count", *OPERATION) == {
        (*GEN_AI, MODEL, ""): 2,
        (*GEN_AI, STREAMED, ""): 2,
        (*GEN_AI, "stall/model", ""): 1,
        (*GEN_AI, "other", "upstream_rejected"): 1,
        (*GEN_AI, "other", "upstream_error"): 1,
    }
    assert by(after, "gen_ai_client_token_usage_count", *USAGE) == {
        (*GEN_AI, MODEL, "", "input", MODEL): 2,
        (*GEN_AI, MODEL, "", "output", MODEL): 2,
        (*GEN_AI, STREAMED, "", "input", STREAMED): 2,
        (*GEN_AI, STREAMED, "", "output", STREAMED): 2,
    }
    # The fake counts words + 9 prompt tokens, and one output token per piece.
    assert by(after, "gen_ai_client_token_usage_sum", *USAGE) == {
        (*GEN_AI, MODEL, "", "input", MODEL): 11 + 11,
        (*GEN_AI, MODEL, "", "output", MODEL): 6 + 6,
        (*GEN_AI, STREAMED, "", "input", STREAMED): 12 + 11,
        (*GEN_AI, STREAMED, "", "output", STREAMED): 5 + 5,
    }
    buckets = {
        float(dict(key)["le"]): value
        for key, value in after["gen_ai_client_token_usage_bucket"].items()
        if ("gen_ai_token_type", "input") in key and ("gen_ai_request_model", MODEL) in key
    }
    assert sorted(buckets) == [*(4.0**i for i in range(14)), float("inf")]  # OTel's 1, 4, 16 ... 67108864
    assert (buckets[1], buckets[4], buckets[16], buckets[4**13], buckets[float("inf")]) == (0, 0, 2, 2, 2)
    assert by(after, "gen_ai_server_time_to_first_token_seconds_count", *FIRST_TOKEN) == {
        (*GEN_AI, STREAMED, STREAMED): 2,
        (*GEN_AI, "stall/model", "stall/model"): 1,
    }
    assert by(after, "groq_proxy_tokens_total", "key", "gen_ai_token_type", "gen_ai_response_model") == {
        (KEY_ID, "input", MODEL): 22,
        (KEY_ID, "output", MODEL): 12,
        (KEY_ID, "input", STREAMED): 23,
        (KEY_ID, "output", STREAMED): 10,
    }
    assert by(after, "groq_proxy_upstream_in_flight") == {(): 0}
    assert by(after, "http_server_active_requests", "http_route") == {
        ("/chat",): 0,
        ("/metrics",): 1,
        ("other",): 0,
        ("/openai/v1/chat/completions",): 0,
        ("/v1/chat/completions",): 0,
        ("/v1/models",): 0,
    }
    http_buckets = after["http_server_request_duration_seconds_bucket"]
    assert sorted({float(dict(k)["le"]) for k in http_buckets}) == [
        *(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
        float("inf"),
    ]
    assert CLIENT_TOKEN not in str(after) and API_KEY not in str(after) and SCRAPER_TOKEN not in str(after)


def test_loopback_only_mode_serves_metrics_to_loopback_peers_only(fake: FakeGroq, start_service: Any) -> None:
    service: Service = start_service(groq_env(fake, METRICS="true", FORWARDED_ALLOW_IPS="127.0.0.1"))
    assert scrape(service.url)["groq_proxy_max_concurrency"]
    remote = service.client.get("/metrics", headers={"x-forwarded-for": "203.0.113.9"})
    assert_error(remote, 401, "unauthorized")


def requests(proc: Any) -> list[dict[str, Any]]:
    """The access lines of a service process, but the start-up probes' (GET /)."""
    return [line for line in proc.json_lines() if line["msg"] == "request" and line["path"] != "/"]


def test_random_models_and_paths_add_a_handful_of_series(fake: FakeGroq, start_process: Any) -> None:
    """Like Groq, the fake answers 404 model_not_found to a model it does not serve. (A process: it is faster.)"""
    fake.default = Behaviour(status=404, error=NOT_FOUND)
    fake.behaviours[MODEL] = Behaviour()
    proc = start_process(groq_env(fake, METRICS="true"))
    client = httpx.Client(base_url=proc.url, timeout=30)
    assert client.post("/chat", json={"prompt": "Say hello"}).status_code == 200
    before = scrape(proc.url)
    sent: list[str] = []
    for i in range(500):
        model, path = f"rnd/{secrets.token_hex(8)}", f"/{secrets.token_hex(8)}"
        sent += [model, path]
        assert client.post("/chat", json={"prompt": "x", "model": model}).status_code == 404
        # h11 passes any method on; httptools (the fast extra) refuses one it does not know with 400
        other = f"X{secrets.token_hex(4).upper()}" if AutoHTTPProtocol.__name__ == "H11Protocol" else "PROPFIND"
        method = ("GET", "POST", other)[i % 3]
        assert client.request(method, path).status_code == 404
    client.close()
    wait_for(lambda: len(requests(proc)) == 1002, "the access lines")
    after = scrape(proc.url)
    text = str(after)
    assert not [value for value in sent if value.strip("/") in text]
    assert series(after) - series(before) == {
        http_series("GET", "/metrics", "200"),  # the first scrape
        http_series("POST", "/chat", "404"),
        http_series("GET", "other", "404"),
        http_series("POST", "other", "404"),
        http_series("_OTHER", "other", "404"),
        ("http_server_active_requests", frozenset({("http_route", "other")})),
        ("groq_proxy_refused_total", frozenset({("reason", "not_found")})),
        (
            "gen_ai_client_operation_duration_seconds",
            frozenset(zip(OPERATION, (*GEN_AI, "other", "upstream_rejected"), strict=True)),
        ),
    }
    operations = by(after, "gen_ai_client_operation_duration_seconds_count", *OPERATION)
    assert operations == {(*GEN_AI, MODEL, ""): 1, (*GEN_AI, "other", "upstream_rejected"): 500}


def test_models_groq_answers_with_are_labelled_only_up_to_a_bound(fake: FakeGroq, start_service: Any) -> None:
    """An upstream that echoes any model name cannot make a client's names into labels beyond the first 16."""
    service: Service = start_service(groq_env(fake, METRICS="true"))
    models = [f"echo/{i:02d}" for i in range(24)]
    for model in models:
        assert service.client.post("/chat", json={"prompt": "x", "model": model}).status_code == 200
    service.access_lines(24)
    counts = by(scrape(service.url), "gen_ai_client_operation_duration_seconds_count", *OPERATION)
    assert counts == {**{(*GEN_AI, m, ""): 1 for m in models[:16]}, (*GEN_AI, "other", ""): 8}


def test_allowed_models_are_the_only_model_labels(fake: FakeGroq, start_service: Any) -> None:
    """Groq answering with a model the operator did not name counts as `other`; nothing is learned."""
    service: Service = start_service(groq_env(fake, METRICS="true", ALLOWED_MODELS=f"{MODEL},{STREAMED}"))
    message = {"role": "assistant", "content": "Hi"}
    renamed = {
        "model": "renamed/by-groq",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    fake.behaviours[STREAMED] = Behaviour(raw_body=json.dumps(renamed).encode())
    assert service.client.post("/chat", json={"prompt": "x", "model": STREAMED}).json()["model"] == "renamed/by-groq"
    assert service.client.post("/chat", json={"prompt": "x", "model": "renamed/by-groq"}).status_code == 422
    assert service.client.post("/chat", json={"prompt": "x"}).status_code == 200
    service.access_lines(3)
    samples = scrape(service.url)
    assert by(samples, "gen_ai_client_token_usage_sum", *USAGE) == {
        (*GEN_AI, STREAMED, "", "input", "other"): 3,
        (*GEN_AI, STREAMED, "", "output", "other"): 1,
        (*GEN_AI, MODEL, "", "input", MODEL): 10,
        (*GEN_AI, MODEL, "", "output", MODEL): 6,
    }
    assert "renamed/by-groq" not in str(samples)


def test_off_by_default_the_route_does_not_exist(service: Service) -> None:
    assert_error(service.client.get("/metrics"), 404, "not_found")
    assert service.app.state.service.metrics is None


def test_missing_package_is_one_start_up_line_naming_the_install_command(tmp_path: Path, start_process: Any) -> None:
    """A venv holding every installed package but prometheus-client (links to this one's)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [target] = (venv / "lib").glob("python3*/site-packages")
    source = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "groq").exists()))
    for entry in source.iterdir():
        if not entry.name.startswith("prometheus_client"):
            (target / entry.name).symlink_to(entry)
    python = str(venv / "bin" / "python")
    probe = "import groq, starlette, uvicorn, importlib.util; print(importlib.util.find_spec('prometheus_client'))"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60).stdout == "None\n"
    proc = start_process({"GROQ_API_KEY": API_KEY, "METRICS": "true"}, [python, "app.py"], wait=False)
    assert proc.wait(60) == 1
    [line] = proc.json_lines()
    assert (line["level"], line["msg"]) == (
        "CRITICAL",
        "configuration error: METRICS=true needs prometheus-client: "
        "pip install --require-hashes --no-deps -r requirements-metrics.txt",
    )


def test_the_optional_requirements_are_pinned_with_hashes_and_installed_for_the_tests() -> None:
    assert set(pins(ROOT / "requirements-metrics.txt")) == {"prometheus-client"}
    assert "-r requirements-metrics.txt" in (ROOT / "scripts" / "test.sh").read_text()


def _workers(supervisor: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing may add a resource tracker beside them)."""
    found = []
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        with contextlib.suppress(OSError):  # a child that just ended
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def _directory_of(worker: int) -> Path:
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    return Path(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())


def _chat_count(samples: Samples) -> float:
    return by(samples, "http_server_request_duration_seconds_count", *HTTP).get(("POST", "/chat", "200"), 0)


@pytest.mark.slow
def test_every_scrape_shows_the_total_of_all_workers(fake: FakeGroq, start_process: Any) -> None:
    env = groq_env(fake, METRICS="true", WORKERS="2", MAX_CONCURRENCY="5")
    proc = start_process(env)
    pid = proc.proc.pid
    workers = wait_for(lambda: len(_workers(pid)) == 2 and _workers(pid), "two workers")
    directory = _directory_of(workers[0])
    assert directory == _directory_of(workers[1]) and stat.S_IMODE(directory.stat().st_mode) == 0o700

    sent = 0
    while sent < 20 or not all((directory / f"histogram_{w}.db").exists() for w in workers):  # both served some
        assert sent < 400, "one worker answered every request"
        response = httpx.post(proc.url + "/chat", json={"prompt": "Say hello"}, headers={"connection": "close"})
        assert response.status_code == 200
        sent += 1
    wait_for(lambda: len(requests(proc)) == sent, "the access lines")
    for _ in range(6):
        assert _chat_count(scrape(proc.url)) == sent

    # A worker that dies is restarted; its requests still count, its live gauges go.
    os.kill(workers[0], signal.SIGKILL)
    fresh = wait_for(lambda: [w for w in _workers(pid) if w not in workers], "the restarted worker")[0]
    wait_for(lambda: (directory / f"gauge_livesum_{fresh}.db").exists(), "the new worker's metrics")
    wait_for(lambda: by(scrape(proc.url), "groq_proxy_max_concurrency") == {(): 10}, "two workers' MAX_CONCURRENCY")
    for _ in range(4):
        samples = scrape(proc.url)
        assert (_chat_count(samples), by(samples, "groq_proxy_max_concurrency")) == (sent, {(): 10})
    assert not (directory / f"gauge_livesum_{workers[0]}.db").exists()

    assert proc.stop() == 0
    assert not directory.exists()


@pytest.mark.slow
def test_processes_sharing_a_directory_keep_an_exited_ones_counts_but_not_its_gauges(
    fake: FakeGroq, start_process: Any, tmp_path: Path
) -> None:
    """What `uvicorn --workers` gives with PROMETHEUS_MULTIPROC_DIR set by hand: the processes meet there."""
    env = groq_env(fake, METRICS="true", PROMETHEUS_MULTIPROC_DIR=str(tmp_path), MAX_CONCURRENCY="5")
    first = start_process(env)
    assert httpx.post(first.url + "/chat", json={"prompt": "Say hello"}).status_code == 200
    wait_for(lambda: len(requests(first)) == 1, "the access line")
    assert first.stop() == 0
    gauges = tmp_path / f"gauge_livesum_{first.proc.pid}.db"
    assert gauges.exists()
    second = start_process(env)
    for _ in range(2):
        samples = scrape(second.url)
        assert (_chat_count(samples), by(samples, "groq_proxy_max_concurrency")) == (1, {(): 5})
    assert not gauges.exists()
    assert second.stop() == 0
