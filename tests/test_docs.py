"""Every shell command and Python snippet shown in README.md and docs/*.md, run against a real service.

Each ```sh / ```bash / ```console block is run a command at a time with bash, in order, against `python app.py`
started as the docs say and talking to the fake Groq on 127.0.0.1 (the test's own, or `tests/fake_groq.py` run
standalone where a block starts it). A command that runs `python app.py` starts the service itself, with the
variables on its line; a block after an `<!-- docs-test: env VAR=value ... -->` marker gets a service started
with those variables; any other block uses the service running (the default one if none). Ports 8000 and 9000
are rewritten to free ones, `.venv/bin/` to this interpreter's, `/tmp/` to the test's own folder, `curl` gets
`--fail-with-body` (so a 4xx is a failure, not a printed error body) and `/path/to/checkout` becomes the
checkout. What a doc shows as output must match: a `# {...}` line under a command (the same keys, nested; the
same strings unless the doc's holds `...`), a `# → text` line (the text is in the output), and a ```text block
right after a block (the same sequence of server-sent event shapes). ```python blocks run from another folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Process, free_port, groq_env
from fake_groq import Behaviour, FakeGroq

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("sh", "bash", "console")

# The two fresh-machine commands: they build a venv and run the whole suite (tests/test_process.py checks both).
FRESH_MACHINE = (
    "python3 -m venv .venv && .venv/bin/pip install --require-hashes --no-deps -r requirements.txt &&",
    "bash scripts/test.sh",
)
# A command holding one of these is not run here; each says why and what covers it instead.
EXEMPT = {
    "pip install --require-hashes": "installs into the venv running this test; tests/test_locks.py installs each lock",
    "bash scripts/lock.sh": "re-resolves the locks against PyPI and rewrites them; tests/test_locks.py checks them",
    "bench/run.py --quick": "runs for a minute; tests/test_audit.py::test_the_benchmark_runs runs it",
    "bench/run.py --only": "a load benchmark of minutes; the coordinator runs it on a quiet machine",
    "docker ": "a container engine, images and ports 8000/8080; tests/test_container.py, tests/test_compose.py",
    "sudo ": "root on a systemd host; tests/test_container.py installs as shown, tests/test_deploy_files.py verifies",
    "sudoedit ": "an editor on a systemd host; tests/test_container.py writes the same files",
    "deploy/secrets": "the compose recipe's Docker secrets; tests/test_compose.py writes them as shown",
    "groq-proxy.env": "writes a file holding a secret into the checkout; tests/test_container.py, test_compose.py",
    "bash scripts/wheelhouse.sh": "downloads every lock's wheels from PyPI; tests/test_container.py runs it",
    "Bearer tok_ops_2026_4f1c9a7e": "calls the container of the `docker run` above it; tests/test_container.py",
}


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)  # the `# {...}` / `# → ...` lines under it


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    env: dict[str, str] | None  # from a docs-test marker
    output: str | None  # a ```text block right after it

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[Command]:
        commands: list[Command] = []
        for line in self.text.replace("\\\n", " ").splitlines():
            stripped = line.strip()
            if stripped.startswith(("# {", "# → ")) and commands:
                commands[-1].expected.append(stripped[2:].removeprefix("→ "))
            elif stripped and not stripped.startswith("#"):
                commands.append(Command(stripped))
        return commands


def blocks(doc: Path) -> list[Block]:
    found: list[Block] = []
    env: dict[str, str] | None = None
    lines = doc.read_text().splitlines()
    index, last_end = 0, -10
    while index < len(lines):
        line = lines[index]
        marker = re.fullmatch(r"<!-- docs-test: env (.+) -->", line)
        fence = re.fullmatch(r"```(\w+)", line)
        if marker:
            env = dict(item.split("=", 1) for item in marker.group(1).split())
        elif fence:
            end = lines.index("```", index + 1)
            block = Block(doc, index + 1, fence.group(1), "\n".join(lines[index + 1 : end]) + "\n", env, None)
            if block.lang == "text" and found and found[-1].lang in SHELL and index == last_end + 2:
                found[-1].output = block.text  # a ```text block right after a command block: its output
            else:
                found.append(block)
            env, index, last_end = None, end, end
        elif line.strip() and not line.startswith("<!--"):
            env = None
        index += 1
    return found


class Session:
    """The service (and a standalone fake) the blocks of one document run against."""

    def __init__(self, fake: FakeGroq, folder: Path) -> None:
        self.fake = fake
        self.folder = folder
        self.port = free_port()
        self.fake_port = free_port()
        self.service: Process | None = None
        self.background: list[subprocess.Popen[str]] = []
        self.exempted: set[str] = set()

    def rewrite(self, text: str) -> str:
        text = re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\1:{self.port}", text)
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{self.fake_port}")
        text = text.replace("--port 9000", f"--port {self.fake_port}")
        text = text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        text = text.replace("/tmp/", f"{self.folder}/")  # noqa: S108 (the docs' scratch files, moved here)
        text = text.replace("/path/to/checkout", str(ROOT))
        return re.sub(r"\bcurl ", "curl --fail-with-body ", text)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GROQ_", "SERVICE_", "LOG_", "METRICS"))}
        return {**env, **groq_env(self.fake), "PORT": str(self.port)}

    def start(self, command: str, extra: dict[str, str] | None = None) -> None:
        self.stop()
        env = {**groq_env(self.fake), **(extra or {}), "PORT": str(self.port)}
        self.service = Process(command, env)

    def ensure_service(self) -> None:
        if self.service is None:
            self.start(f"{sys.executable} app.py")

    def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            code = service.stop()
            assert code == 0, "\n".join(service.lines)

    def run_block(self, block: Block) -> None:
        if block.env is not None:
            self.start(f"{sys.executable} app.py", block.env)
        output = ""
        for command in block.commands():
            if any(command.text.startswith(fresh) for fresh in FRESH_MACHINE):
                continue
            exempt = [key for key in EXEMPT if key in command.text]
            if exempt:
                self.exempted.update(exempt)
                continue
            text = self.rewrite(command.text)
            if re.search(r"python app\.py(\s|$)", text):
                self.start(text)
            elif text.endswith("&") or re.search(r"&\s+#", text):
                self.background_start(text, block)
            else:
                self.ensure_service()
                output = self.shell(text, block)
                for expected in command.expected:
                    check_output(expected, output, f"{block}: {command.text}")
        if block.output is not None:
            assert event_shapes(output) == event_shapes(block.output), f"{block}: output differs:\n{output}"

    def background_start(self, text: str, block: Block) -> None:
        """A `... &` command (the standalone fake): started, and waited for until its first line of output."""
        command = re.sub(r"&\s*(#.*)?$", "", text)
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.environ(),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.background.append(proc)
        first: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            first.append(proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(30) and first[0].strip(), f"{block}: {command} printed nothing"

    def shell(self, text: str, block: Block) -> str:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", text],
            cwd=ROOT,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{block}: {text}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def run_python(self, block: Block) -> subprocess.CompletedProcess[str]:
        if block.env is not None:
            self.start(f"{sys.executable} app.py", block.env)
        self.ensure_service()
        script = self.folder / "snippet.py"
        script.write_text(self.rewrite(block.text))
        env = self.environ()
        return subprocess.run(
            [sys.executable, str(script)], cwd=self.folder, env=env, capture_output=True, text=True, timeout=120
        )

    def close(self) -> None:
        try:
            self.stop()
        finally:
            for proc in self.background:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
                assert proc.stdout is not None
                proc.stdout.close()


def check_output(expected: str, output: str, where: str) -> None:
    if expected.startswith("{"):
        shown = json.loads(expected)
        got = json.loads(output.strip().splitlines()[-1] if output.strip() else "null")
        assert same_shape(shown, got), f"{where}: the doc shows {expected}\ngot {output}"
    else:
        assert expected.strip() in output, f"{where}: the doc shows {expected!r}\ngot {output}"


def same_shape(shown: Any, got: Any) -> bool:
    """The same keys (nested) and types; the same strings unless the doc's is elided with `...`."""
    if isinstance(shown, dict):
        return (
            isinstance(got, dict)
            and shown.keys() == got.keys()
            and all(same_shape(v, got[k]) for k, v in shown.items())
        )
    if isinstance(shown, str):
        return isinstance(got, str) and ("..." in shown or shown == got)
    return type(shown) is type(got)


def event_shapes(text: str) -> list[str]:
    """Each server-sent event as its field names (`[DONE]` as itself), runs of the same shape collapsed."""
    shapes: list[str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            shape = data if data == "[DONE]" else ",".join(sorted(json.loads(data)))
            if not shapes or shapes[-1] != shape:
                shapes.append(shape)
        elif line.strip():
            shapes.append(line)
    return shapes


@pytest.fixture
def session(fake: FakeGroq, tmp_path: Path) -> Iterator[Session]:
    session = Session(fake, tmp_path)
    yield session
    session.close()


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_command_in_the_docs_runs_as_shown(doc: Path, session: Session) -> None:
    ran = 0
    for block in blocks(doc):
        if block.lang in SHELL:
            session.run_block(block)
            ran += 1
        elif block.lang == "python":
            result = session.run_python(block)
            assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
            ran += 1
    assert ran or doc.name in ("development.md", "logging.md", "architecture.md", "internals.md"), f"{doc}: nothing"


def test_every_exemption_names_a_documented_command() -> None:
    """A stale exemption would hide a command added later under the same words."""
    used: set[str] = set()
    for doc in DOCS:
        for block in blocks(doc):
            if block.lang in SHELL:
                used |= {key for command in block.commands() for key in EXEMPT if key in command.text}
    assert used == set(EXEMPT)


def test_only_shell_and_python_blocks_are_left_unrun() -> None:
    """Any other fence is data shown (JSON, TOML, YAML, server-sent events), never a command to type."""
    langs = {block.lang for doc in DOCS for block in blocks(doc)}
    assert langs <= {*SHELL, "python", "json", "toml", "yaml", "text"}, langs


def _readme_stream_snippet() -> Block:
    snippets = [
        block for block in blocks(ROOT / "README.md") if block.lang == "python" and "httpx.stream" in block.text
    ]
    assert len(snippets) == 1
    return snippets[0]


def test_the_streaming_snippet_raises_the_error_event_and_skips_reasoning(fake: FakeGroq, tmp_path: Path) -> None:
    """README's Python snippet against an `event: error` mid-stream, and a stream with reasoning events."""
    snippet = _readme_stream_snippet()
    session = Session(fake, tmp_path)
    try:
        fake.default = Behaviour(error_event_after=2)
        result = session.run_python(snippet)
        assert result.returncode == 1
        assert "RuntimeError" in result.stderr and "KeyError" not in result.stderr, result.stderr
        assert result.stdout == "Hello from "
        fake.default = Behaviour(reasoning="Ten numbers, one by one.")
        asking = Block(
            snippet.doc,
            snippet.line,
            "python",
            snippet.text.replace('"stream": True}', '"stream": True, "include_reasoning": True}'),
            None,
            None,
        )
        assert "include_reasoning" in asking.text
        result = session.run_python(asking)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Hello from the fake Groq server.\n"
        assert "include_reasoning" in str(fake.received[-1]), "the fake was asked for the reasoning"
    finally:
        session.close()


def test_a_command_that_drifted_from_the_code_fails(fake: FakeGroq, tmp_path: Path) -> None:
    """The runner fails a command that no longer works and output that no longer matches."""
    session = Session(fake, tmp_path)
    try:
        wrong_path = Block(ROOT / "README.md", 1, "sh", "curl -s localhost:8000/chats -d '{}'\n", None, None)
        with pytest.raises(AssertionError, match="exit 22"):
            session.run_block(wrong_path)
        wrong_output = 'curl -s localhost:8000/healthz\n# {"status": "ok", "version": "..."}\n'
        with pytest.raises(AssertionError, match="the doc shows"):
            session.run_block(Block(ROOT / "README.md", 1, "sh", wrong_output, None, None))
        short_token = "METRICS=true METRICS_TOKEN=tok_ops_2026 .venv/bin/python app.py\n"
        with pytest.raises(AssertionError, match="service exited early"):
            session.run_block(Block(ROOT / "README.md", 1, "sh", short_token, None, None))
    finally:
        session.service = None  # the last one never started
        session.close()


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings outside code blocks: lower case, punctuation dropped, spaces to `-`."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_reaches_its_file_and_heading() -> None:
    broken = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
