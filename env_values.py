"""Environment values, one reader per kind: each checks its variable and fails naming it (never printing a secret)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_TOKEN_LENGTH = 16
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.I)
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[^/:\[\]]+)(?::([0-9]{1,5}))?", re.I)
_SHOWN_MAX = 24  # a longer value is described, not echoed: it may hold a secret pasted into the wrong variable
# Each secret may come from a file instead (Docker secrets, systemd's LoadCredential=): <NAME>_FILE holds its path.
SECRET_VARIABLES = ("GROQ_API_KEY", "SERVICE_API_KEYS", "REDIS_URL", "METRICS_TOKEN")
SECRET_FILE_LIMIT = 64 * 1024  # a secret's file holds a few hundred bytes; more is a wrong path


class SettingsError(ValueError):
    """A variable holds a value the service cannot run with; the message names it and what it accepts."""

    log_format = "json"  # how to report it: the LOG_FORMAT that was asked for, if that much was valid


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A client of SERVICE_KEYS_FILE (keys.py): its name in logs and quotas, its token's SHA-256, its own limits."""

    name: str
    sha256: bytes = field(repr=False)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    allowed_models: tuple[str, ...] = ()


def read_secret_files(environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The environment with each secret set by <NAME>_FILE read from its file, and {name: path} of those read.

    The file's content is the value, less one trailing newline; it is never put in a message.
    """
    files = {
        name: environ[f"{name}_FILE"].strip() for name in SECRET_VARIABLES if environ.get(f"{name}_FILE", "").strip()
    }
    resolved = dict(environ)
    for name, path in files.items():
        if environ.get(name, "").strip():
            raise SettingsError(f"Set {name} or {name}_FILE, not both")
        try:
            data = read_regular_file(path, SECRET_FILE_LIMIT + 1)
            resolved[name] = data.decode("utf-8").removesuffix("\n")  # exactly as written: no \r\n made \n
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise SettingsError(f"{name}_FILE: {path} cannot be read ({reason})") from None
        if len(data) > SECRET_FILE_LIMIT:
            raise SettingsError(f"{name}_FILE: {path} is too large (over {SECRET_FILE_LIMIT // 1024} KiB)")
        if not resolved[name]:
            raise SettingsError(f"{name}_FILE: {path} is empty")
    return resolved, files


def read_regular_file(path: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file; a FIFO, a device (/dev/zero) or a directory is refused unread."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO would wait for a writer
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return file.read(limit)


@dataclass(frozen=True, slots=True)
class Reader:
    environ: Mapping[str, str]
    files: Mapping[str, str] = field(default_factory=dict)  # {name: path} of the secrets read from files

    def _label(self, name: str) -> str:
        """How a message names a secret: by its file when it came from one (the value is never shown)."""
        return f"{name}_FILE ({self.files[name]})" if name in self.files else name

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]+", raw) or not low <= int(raw) <= high:
            raise SettingsError(f"{name} must be a whole number from {low} to {high} ({shown(raw)})")
        return int(raw)

    def limit(self, name: str) -> int | None:
        return None if self._raw(name) is None else self.integer(name, 0, 1, 10**12)

    def path(self, name: str) -> str | None:
        return self._raw(name)

    def redis_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is not None and not (re.fullmatch(r"rediss?://[^\s/?#]+(/[0-9]{0,5})?", raw) and _parses(raw)):
            raise SettingsError(
                f"{self._label(name)} must look like redis://host:port/db or rediss://... (its value is not shown)"
            )
        return raw

    def seconds(self, name: str, default: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{name} must be a number of seconds > 0 ({shown(raw)})")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if allowed == LOG_LEVELS else raw.lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)} ({shown(raw)})")
        return value

    def model(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None else check_model(name, raw)

    def url(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        # The SDK appends /openai/v1/... itself, so an OpenAI-style base URL would double it.
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", raw) or raw.rstrip("/").endswith("/openai/v1"):
            raise SettingsError(
                f"{name} must be an origin such as https://api.groq.com, without /openai/v1 ({shown(raw)})"
            )
        return raw.rstrip("/")

    def csv(self, name: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in (self._raw(name) or "").split(",") if part.strip())

    def secret(self, name: str) -> str | None:
        """A secret is printable ASCII without spaces, taken as written; its value never goes into a message."""
        value = self.environ.get(name, "")
        if value and not re.fullmatch(r"[!-~]+", value):
            raise SettingsError(
                f"{self._label(name)} must be printable ASCII without spaces or control characters (check for a"
                " trailing newline, spaces or quotes); the value is not shown"
            )
        return value or None

    def tokens(self, name: str) -> tuple[str, ...]:
        """Comma-separated secrets; spaces next to a comma only separate them."""
        parts = (part.strip(" ") for part in self.environ.get(name, "").split(","))
        return tuple(self._token(name, part, f"{self._label(name)} entries") for part in parts if part)

    def token(self, name: str) -> str | None:
        """One bearer token (METRICS_TOKEN): a secret of at least MIN_TOKEN_LENGTH characters."""
        value = self.secret(name)
        return None if value is None else self._token(name, value, self._label(name))

    def _token(self, name: str, value: str, label: str) -> str:
        """A bearer token; `label` names it in the message ("SERVICE_API_KEYS entries", "METRICS_TOKEN")."""
        Reader({name: value}, self.files).secret(name)
        if len(value) < MIN_TOKEN_LENGTH:
            raise SettingsError(
                f"{label} must be at least {MIN_TOKEN_LENGTH} characters; make one with"
                ' python3 -c "import secrets; print(secrets.token_urlsafe(24))"; the value is not shown'
            )
        return value

    def fallbacks(self, name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Comma-separated `model>fallback` pairs, each model with at most one fallback; every model that has one,
        with its chain (`a>b,b>c`: a with (b, c), b with (c,)), walked once here, where a cycle is refused."""
        pairs: dict[str, str] = {}
        for entry in self.csv(name):
            model, arrow, fallback = (part.strip() for part in entry.partition(">"))
            if not (arrow and MODEL_PATTERN.fullmatch(model) and MODEL_PATTERN.fullmatch(fallback)):
                raise SettingsError(
                    f"{name} entries must be model>fallback pairs such as openai/gpt-oss-120b>openai/gpt-oss-20b,"
                    f" each name 1-128 characters of A-Z a-z 0-9 . _ : / - ({shown(entry)})"
                )
            if model == fallback:
                raise SettingsError(f"{name}: {model!r} falls back to itself")
            if model in pairs:
                raise SettingsError(
                    f"{name} gives {model!r} two fallbacks ({pairs[model]!r} and {fallback!r}); keep one"
                )
            pairs[model] = fallback
        chains = []
        for start in pairs:
            chain = [start]
            while chain[-1] in pairs:
                chain.append(pairs[chain[-1]])
                if chain[-1] in chain[:-1]:
                    raise SettingsError(f"{name} has a cycle: {' > '.join(chain[chain.index(chain[-1]) :])}")
            chains.append((start, tuple(chain[1:])))
        return tuple(chains)

    def host(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        address = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        if not (_is_ip(address) or (address == raw and _HOSTNAME.fullmatch(raw))):
            raise SettingsError(
                f"{name} must be an IP address or a host name, such as 127.0.0.1, 0.0.0.0, ::1 or localhost"
                f" ({shown(raw)})"
            )
        return address


def shown(value: str) -> str:
    """How a message refers to the value it refuses: the value itself if short, else only its length."""
    return f"got {value!r}" if len(value) <= _SHOWN_MAX else f"a value of {len(value)} characters"


def check_model(name: str, value: str) -> str:
    if not MODEL_PATTERN.fullmatch(value):
        raise SettingsError(f"{name} must hold 1-128 characters of A-Z a-z 0-9 . _ : / - ({shown(value)})")
    return value


def _parses(url: str) -> bool:
    """Whether urlsplit reads its port (and so its password): not with a `[` left open or a port that is no number."""
    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    return port is None or port > 0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_origin(name: str, value: str) -> str:
    """`*` or scheme://host[:port], as a browser writes an Origin header: no path, no trailing slash."""
    match = _ORIGIN.fullmatch(value)
    host = match.group(2).strip("[]") if match else ""
    port = match.group(3) if match else None
    valid = match is not None and (_is_ip(host) or bool(_HOSTNAME.fullmatch(host)))
    if value != "*" and not (valid and (port is None or 0 < int(port) < 65536)):
        raise SettingsError(
            f"{name} entries must be * or scheme://host[:port] such as https://app.example, without a path"
            f" or trailing slash ({shown(value)})"
        )
    return value.lower()


def check_host_pattern(name: str, value: str) -> str:
    """A Host header's host part (no port), like Starlette's TrustedHostMiddleware: `*`, `*.domain`, a name or an IP."""
    rest = value[2:] if value.startswith("*.") else value
    bracketed = rest.startswith("[") and rest.endswith("]")
    if not (value == "*" or (bracketed and _is_ip(rest[1:-1])) or _is_ip(rest) or _HOSTNAME.fullmatch(rest)):
        raise SettingsError(
            f"{name} entries must be host names or addresses without a port, such as api.example.com,"
            f" *.example.com or 10.0.0.5 ({shown(value)})"
        )
    return f"[{value}]" if ":" in value and _is_ip(value) else value.lower()  # as a Host header writes IPv6
