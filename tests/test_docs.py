"""Every shell command and Python snippet shown in README.md and docs/*.md, run against a real service.

Each ```sh / ```bash / ```console block is run a command at a time with bash, in order, against `python app.py`
started as the docs say and talking to the fake Groq on 127.0.0.1 (the test's own, or `tests/fake_groq.py` run
standalone where a block starts it). A command that runs `python app.py` starts the service itself, with the
variables on its line; a block after an `<!-- docs-test: env VAR=value ... -->` marker gets a service started
with those variables; any other block uses the service running (the default one if none). Ports 8000 and 9000
are rewritten to free ones, `.venv/bin/` to this interpreter's, `/tmp/` and the deployment's secret files to the
test's own folder, a `read -rs` prompt gets `TYPED` on its standard input, `curl` gets
`--fail-with-body` (so a 4xx is a failure, not a printed error body) and `/path/to/checkout` becomes the
checkout. What a doc shows as output must match: a `# {...}` line under a command (the same keys, nested; the
same strings unless the doc's holds `...`), a `# → text` line (the text is in the output), and a ```text block
right after a block (the same sequence of server-sent event shapes). ```python blocks run from another folder.
Every fence (``` or ~~~, indented or not) is a language run here or one of `DATA`, else the test fails; so does a
command that would hide its exit status (`|| true`), unless `MASKING_EXEMPT` says why.
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
DATA = ("json", "toml", "yaml", "text")  # shown, never typed: JSON, TOML, YAML, server-sent events

# The two fresh-machine commands: they build a venv and run the whole suite (tests/test_process.py checks both).
FRESH_MACHINE = (
    "python3 -m venv .venv && .venv/bin/pip install --require-hashes --no-deps -r requirements.txt &&",
    "bash scripts/test.sh",
)
# A command holding one of these is not run here; each says why and what covers it instead.
EXEMPT = {
    "pip install --require-hashes": "installs into the venv running this test; tests/test_locks.py installs each lock",
    "bash scripts/lock.sh": "re-resolves the locks against PyPI and rewrites them; tests/test_locks.py checks them",
    "bench/run.py --quick": "runs for a minute; tests/test_audit.py::test_the_benchmark_runs runs it as shown",
    "bench/run.py --only": "minutes of load as shown; tests/test_audit.py runs each group with --quick --no-wrk",
    "docker ": "a container engine, images and ports 8000/8080; tests/test_container.py, tests/test_compose.py",
    "sudo ": "root on a systemd host; tests/test_container.py installs as shown, tests/test_deploy_files.py verifies",
    "sudoedit ": "an editor on a systemd host; tests/test_container.py writes the same files",
    "bash scripts/wheelhouse.sh": "downloads every lock's wheels from PyPI; tests/test_container.py runs it",
    "Bearer ${tokens%%,*}": "calls the container of the `docker run` above it; tests/test_container.py",
}

# What a `read -rs` prompt in the docs is typed (docs/deployment.md: the Groq key, then the client tokens).
TYPED = ("gsk_typed_at_the_prompt", "tok_typed_1,tok_typed_2")
# A command that masks its exit status (see `masking`) fails the test unless it holds one of these, with why.
MASKING_EXEMPT: dict[str, str] = {}


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


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")  # CommonMark: any indent, backticks or tildes, an info string


def blocks(doc: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of a document (or of `text`, shown as that document), its language the info string's
    first word ("" for a bare fence): nothing fenced is skipped, see `unhandled`."""
    found: list[Block] = []
    env: dict[str, str] | None = None
    lines = (doc.read_text() if text is None else text).splitlines()
    index, last_end = 0, -10
    while index < len(lines):
        line = lines[index]
        marker = re.fullmatch(r"<!-- docs-test: env (.+) -->", line)
        fence = FENCE.match(line)
        if marker:
            env = dict(item.split("=", 1) for item in marker.group(1).split())
        elif fence:
            indent, marks, info = fence.groups()
            closing = re.compile(rf"\s*{marks[0]}{{{len(marks)},}}\s*")
            end = next((i for i in range(index + 1, len(lines)) if closing.fullmatch(lines[i])), None)
            assert end is not None, f"{doc.relative_to(ROOT)}:{index + 1}: a fence that is never closed"
            body = [text_line.removeprefix(indent) for text_line in lines[index + 1 : end]]
            lang = info.split()[0] if info.strip() else ""
            block = Block(doc, index + 1, lang, "\n".join(body) + "\n", env, None)
            if block.lang == "text" and found and found[-1].lang in SHELL and index == last_end + 2:
                found[-1].output = block.text  # a ```text block right after a command block: its output
            else:
                found.append(block)
            env, index, last_end = None, end, end
        elif line.strip() and not line.startswith("<!--"):
            env = None
        index += 1
    return found


def unhandled(found: list[Block]) -> list[str]:
    """The blocks whose language this test neither runs nor knows to be data: each one a failure, not a skip."""
    return [f"{block}: ```{block.lang}" for block in found if block.lang not in {*SHELL, "python", *DATA}]


def masking(command: str) -> bool:
    """A command whose exit status would not be its own: `|| true`, `|| :`, `; true` at the end, any `||`,
    `set +e`. The test would pass it whatever it did."""
    return bool(re.search(r"\|\||;\s*(true|:)\s*(#.*)?$|\bset \+e\b", command))


class Session:
    """The service (and a standalone fake) the blocks of one document run against."""

    def __init__(self, fake: FakeGroq, folder: Path, interpreter: Path = Path(sys.executable)) -> None:
        self.fake = fake
        self.folder = folder
        self.interpreter = interpreter
        self.port = free_port()
        self.fake_port = free_port()
        self.service: Process | None = None
        self.background: list[subprocess.Popen[str]] = []
        self.exempted: set[str] = set()

    def rewrite(self, text: str) -> str:
        text = re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\1:{self.port}", text)
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{self.fake_port}")
        text = text.replace("--port 9000", f"--port {self.fake_port}")
        # The docs' scratch files, moved here, before the interpreter's path is put in (a checkout may be under
        # /tmp/ itself); only paths that start there, not a /tmp/ or .venv/bin/ inside another path.
        text = re.sub(r"(?<![\w/.-])/tmp/", lambda _: f"{self.folder}/", text)
        text = re.sub(r"(?<![\w/.-])\.venv/bin/", lambda _: f"{self.interpreter.parent}/", text)
        secrets = r"(?<![\w/.-])((deploy/)?groq-proxy\.env|deploy/secrets)"  # files docs/deployment.md writes
        text = re.sub(secrets, lambda match: f"{self.folder}/{match[1]}", text)
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
            assert not masking(command.text) or any(key in command.text for key in MASKING_EXEMPT), (
                f"{block}: {command.text} hides its exit status: the test would pass whatever it did"
            )
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
        # cwd: the checkout, so docs/deployment.md's `$PWD/.venv` (what `systemd-analyze verify` checks the unit's
        # ExecStart against) is the checkout's venv, which scripts/test.sh creates.
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", text],
            input="\n".join(TYPED) + "\n" if "read -rs" in text else None,
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
    problems = [problem for doc in DOCS for problem in unhandled(blocks(doc))]
    assert not problems, problems


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


PROBE = """\
1. A step:

   ```sh
   echo indented in a list
   ```

~~~bash
echo tildes
~~~

```
a bare fence
```

```sh\x20
echo trailing space after the language
```

```shell-session
$ echo a language this test does not run
```

````sh
echo a longer fence, holding ```
````
"""


def test_the_parser_finds_every_fence_and_flags_the_languages_it_does_not_run() -> None:
    found = blocks(ROOT / "README.md", PROBE)
    assert [(block.line, block.lang, block.text) for block in found] == [
        (3, "sh", "echo indented in a list\n"),
        (7, "bash", "echo tildes\n"),
        (11, "", "a bare fence\n"),
        (15, "sh", "echo trailing space after the language\n"),
        (19, "shell-session", "$ echo a language this test does not run\n"),
        (23, "sh", "echo a longer fence, holding ```\n"),
    ]
    assert unhandled(found) == ["README.md:11: ```", "README.md:19: ```shell-session"]


@pytest.mark.parametrize(
    ("command", "masked"),
    [
        ("curl -s localhost:8000/healthz || true", True),
        ("curl -s localhost:8000/healthz || :", True),
        ("curl -s localhost:8000/healthz || echo down", True),
        ("curl -s localhost:8000/healthz; true", True),
        ("curl -s localhost:8000/healthz ; :   # whatever happens", True),
        ("set +e; curl -s localhost:8000/healthz", True),
        ("curl -s localhost:8000/healthz && echo up", False),
        ("curl -s localhost:8000/healthz | tail -n 1", False),  # run with pipefail
    ],
)
def test_a_command_that_hides_its_exit_status_is_refused(command: str, masked: bool, session: Session) -> None:
    assert masking(command) is masked
    if masked:
        with pytest.raises(AssertionError, match="hides its exit status"):
            session.run_block(Block(ROOT / "README.md", 1, "sh", command + "\n", None, None))


def test_paths_are_rewritten_only_where_they_start(fake: FakeGroq, tmp_path: Path) -> None:
    """A checkout under /tmp/: its interpreter's path keeps its /tmp/; the docs' own /tmp/ files move."""
    session = Session(fake, tmp_path / "scratch", interpreter=Path("/tmp/checkout/.venv/bin/python"))  # noqa: S108
    shown = ".venv/bin/python bench/run.py > /tmp/out.md && cat /tmp/out.md /opt/app/.venv/bin/x deploy/secrets/a"
    assert session.rewrite(shown) == (
        f"/tmp/checkout/.venv/bin/python bench/run.py > {tmp_path}/scratch/out.md && cat {tmp_path}/scratch/out.md"  # noqa: S108
        f" /opt/app/.venv/bin/x {tmp_path}/scratch/deploy/secrets/a"
    )


def test_the_secrets_typed_at_the_prompt_reach_their_files_and_nothing_else(session: Session) -> None:
    """docs/deployment.md's `read -rs` commands: the typed key and tokens land in files only their owner reads, and
    nothing echoes them."""
    deployment = [block for block in blocks(ROOT / "docs" / "deployment.md") if "read -rs" in block.text]
    assert len(deployment) == 2
    for block in deployment:
        session.run_block(block)
        for command in block.commands():
            if "read -rs" in command.text:  # once more, for its output
                output = session.shell(session.rewrite(command.text), block)
                assert output == "\n\n", output  # the two `echo`s after the prompts, nothing typed
    key, tokens = TYPED
    files = {
        "groq-proxy.env": f"GROQ_API_KEY={key}\nSERVICE_API_KEYS={tokens}\n",
        "deploy/secrets/groq_api_key": key,
        "deploy/secrets/service_api_keys": tokens,
    }
    for name, content in files.items():
        path = session.folder / name
        assert path.read_text() == content
        assert path.stat().st_mode & 0o777 == 0o600, name
    assert (session.folder / "deploy" / "secrets").stat().st_mode & 0o777 == 0o700
