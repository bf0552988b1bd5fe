"""Settings: read once at start-up from the environment (and `.env` in the working directory)."""

from __future__ import annotations

import importlib.util
import io
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_TOKEN_LENGTH = 16
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?", re.I)
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[^/:\[\]]+)(?::([0-9]{1,5}))?", re.I)


class SettingsError(ValueError):
    """A variable holds a value the service cannot run with; the message names it and what it accepts."""

    log_format = "json"  # how to report it: the LOG_FORMAT that was asked for, if that much was valid


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A client: its name in logs and quotas, its token's SHA-256, and its own limits (None: the defaults)."""

    name: str
    sha256: bytes = field(repr=False)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    allowed_models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    groq_api_key: str | None = field(default=None, repr=False)
    groq_model: str = "openai/gpt-oss-20b"
    groq_base_url: str = "https://api.groq.com"
    groq_timeout: float = 60.0
    groq_max_retries: int = 2
    stream_idle_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "json"
    log_prompts: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    service_api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 1024 * 1024
    max_concurrency: int = 64
    allowed_models: tuple[str, ...] = ()
    client_timeout: float = 15.0
    shutdown_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    forwarded_allow_ips: str = ""
    service_keys: tuple[ServiceKey, ...] = ()  # from SERVICE_KEYS_FILE
    quota_requests_per_minute: int | None = None
    quota_tokens_per_minute: int | None = None
    quota_tokens_per_day: int | None = None
    quota_default_reserve: int = 1024
    redis_url: str | None = field(default=None, repr=False)
    quota_fail_mode: str = "closed"
    redis_timeout: float = 0.25
    # The quota windows in seconds: settable only through the library (tests), never by a variable.
    quota_minute: float = 60.0
    quota_day: float = 86400.0
    allowed_hosts: tuple[str, ...] = ()
    metrics: bool = False

    def secrets(self) -> tuple[str, ...]:
        """What must never reach a log line or a client: the Groq key, the client tokens, Redis's password."""
        redis_password = urlsplit(self.redis_url).password if self.redis_url else None
        return tuple(s for s in (self.groq_api_key, *self.service_api_keys, redis_password) if s)

    def quotas_on(self) -> bool:
        limits = (self.quota_requests_per_minute, self.quota_tokens_per_minute, self.quota_tokens_per_day)
        keys = (k.requests_per_minute or k.tokens_per_minute or k.tokens_per_day for k in self.service_keys)
        return any(limits) or any(keys)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: `.env` overlaid by the real environment, which wins)."""
    try:
        if environ is None:
            environ = {**_dotenv(Path(".env")), **os.environ}
        return _parse(environ)
    except SettingsError as exc:
        known = os.environ if environ is None else environ  # a .env that cannot be parsed is not used at all
        error = SettingsError(_masked(str(exc), known))  # a secret pasted into the wrong variable stays hidden
        error.log_format = "text" if known.get("LOG_FORMAT", "").strip().lower() == "text" else "json"
        raise error from None


def _dotenv(path: Path) -> dict[str, str]:
    """The `.env` file's variables; a line python-dotenv cannot parse is an error, not a skipped line."""
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        raise SettingsError(f"{path} cannot be read as UTF-8 text; fix or remove it") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:  # python-dotenv counts the blank lines before a statement as part of it
            text = binding.original.string
            line = binding.original.line + text[: len(text) - len(text.lstrip())].count("\n")
            raise SettingsError(f"{path} line {line} cannot be parsed (check its quotes and the KEY=value form)")
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def _masked(message: str, environ: Mapping[str, str]) -> str:
    secrets = [environ.get("GROQ_API_KEY", ""), *environ.get("SERVICE_API_KEYS", "").split(",")]
    for secret in sorted({s.strip(" ") for s in secrets}, key=len, reverse=True):
        if len(secret) >= 4:  # a fragment that short would mask ordinary words; such tokens are refused anyway
            message = message.replace(secret, "[redacted]")
    return message


def _parse(environ: Mapping[str, str]) -> Settings:
    env = _Reader(environ)
    default = Settings()
    settings = Settings(
        groq_api_key=env.secret("GROQ_API_KEY"),
        groq_model=env.model("GROQ_MODEL", default.groq_model),
        groq_base_url=env.url("GROQ_BASE_URL", default.groq_base_url),
        groq_timeout=env.seconds("GROQ_TIMEOUT", default.groq_timeout),
        groq_max_retries=env.integer("GROQ_MAX_RETRIES", default.groq_max_retries, 0, 10),
        stream_idle_timeout=env.seconds("GROQ_STREAM_IDLE_TIMEOUT", default.stream_idle_timeout),
        log_level=env.choice("LOG_LEVEL", default.log_level, LOG_LEVELS),
        log_format=env.choice("LOG_FORMAT", default.log_format, ("json", "text")),
        log_prompts=env.choice("LOG_PROMPTS", "false", ("true", "false")) == "true",
        host=env.host("HOST", default.host),
        port=env.integer("PORT", default.port, 0, 65535),
        workers=env.integer("WORKERS", default.workers, 1, 64),
        service_api_keys=env.tokens("SERVICE_API_KEYS"),
        max_body_bytes=env.integer("MAX_BODY_BYTES", default.max_body_bytes, 1, 2**31),
        max_concurrency=env.integer("MAX_CONCURRENCY", default.max_concurrency, 1, 100_000),
        allowed_models=tuple(_check_model("ALLOWED_MODELS", m) for m in env.csv("ALLOWED_MODELS")),
        client_timeout=env.seconds("CLIENT_TIMEOUT", default.client_timeout),
        shutdown_timeout=env.seconds("SHUTDOWN_TIMEOUT", default.shutdown_timeout),
        cors_origins=tuple(_check_origin("CORS_ORIGINS", o) for o in env.csv("CORS_ORIGINS")),
        forwarded_allow_ips=environ.get("FORWARDED_ALLOW_IPS", "").strip(),
        service_keys=_keys_file(env.path("SERVICE_KEYS_FILE"), environ),
        quota_requests_per_minute=env.limit("QUOTA_REQUESTS_PER_MINUTE"),
        quota_tokens_per_minute=env.limit("QUOTA_TOKENS_PER_MINUTE"),
        quota_tokens_per_day=env.limit("QUOTA_TOKENS_PER_DAY"),
        quota_default_reserve=env.integer("QUOTA_DEFAULT_RESERVE", default.quota_default_reserve, 1, 10_000_000),
        redis_url=env.redis_url("REDIS_URL"),
        quota_fail_mode=env.choice("QUOTA_FAIL_MODE", default.quota_fail_mode, ("closed", "open")),
        redis_timeout=env.seconds("REDIS_TIMEOUT", default.redis_timeout),
        metrics=env.choice("METRICS", "false", ("true", "false")) == "true",
        allowed_hosts=tuple(_check_host_pattern("ALLOWED_HOSTS", h) for h in env.csv("ALLOWED_HOSTS")),
    )
    if settings.allowed_models and settings.groq_model not in settings.allowed_models:
        raise SettingsError(f"GROQ_MODEL {settings.groq_model!r} must be one of ALLOWED_MODELS")
    _check_quotas(settings)
    if "*" in env.csv("FORWARDED_ALLOW_IPS") and not (settings.service_api_keys or settings.service_keys):
        raise SettingsError(
            "FORWARDED_ALLOW_IPS=* lets any client claim a loopback address; without SERVICE_API_KEYS name the"
            " proxy's own addresses, or set SERVICE_API_KEYS"
        )
    if settings.metrics and importlib.util.find_spec("prometheus_client") is None:  # found, not imported
        raise SettingsError(
            "METRICS=true needs prometheus-client: pip install --require-hashes -r requirements-metrics.txt"
        )
    return settings


def _keys_file(path: str | None, environ: Mapping[str, str]) -> tuple[ServiceKey, ...]:
    if path is None:
        return ()
    if environ.get("SERVICE_API_KEYS", "").strip():
        raise SettingsError("Set SERVICE_API_KEYS or SERVICE_KEYS_FILE, not both")
    import keys  # only with a keys file

    return keys.load(path)


def _check_quotas(settings: Settings) -> None:
    for key in settings.service_keys:
        if key.allowed_models and settings.groq_model not in key.allowed_models:
            raise SettingsError(f"SERVICE_KEYS_FILE entry {key.name!r}: allowed_models must include GROQ_MODEL")
        if settings.allowed_models and not set(key.allowed_models) <= set(settings.allowed_models):
            raise SettingsError(f"SERVICE_KEYS_FILE entry {key.name!r}: allowed_models must be among ALLOWED_MODELS")
    if settings.workers > 1 and settings.quotas_on() and not settings.redis_url:
        raise SettingsError("WORKERS > 1 with a quota needs REDIS_URL: each worker would count alone")
    # REDIS_URL without a quota (deploy/compose.yaml always sets it) is a warning at start-up (app.py), not an error.
    if settings.redis_url and settings.quotas_on() and importlib.util.find_spec("redis") is None:
        raise SettingsError(
            "REDIS_URL is set but the redis package is not installed: "
            "pip install --require-hashes -r requirements-redis.txt"
        )


@dataclass(frozen=True, slots=True)
class _Reader:
    environ: Mapping[str, str]

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]+", raw) or not low <= int(raw) <= high:
            raise SettingsError(f"{name} must be a whole number from {low} to {high} (got {raw!r})")
        return int(raw)

    def limit(self, name: str) -> int | None:
        return None if self._raw(name) is None else self.integer(name, 0, 1, 10**12)

    def path(self, name: str) -> str | None:
        return self._raw(name)

    def redis_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is not None and not re.fullmatch(r"rediss?://[^\s/?#]+(/[0-9]{0,5})?", raw):
            raise SettingsError(f"{name} must look like redis://host:port/db or rediss://... (its value is not shown)")
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
            raise SettingsError(f"{name} must be a number of seconds > 0 (got {raw!r})")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if allowed == LOG_LEVELS else raw.lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)} (got {raw!r})")
        return value

    def model(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None else _check_model(name, raw)

    def url(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        # The SDK appends /openai/v1/... itself, so an OpenAI-style base URL would double it.
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", raw) or raw.rstrip("/").endswith("/openai/v1"):
            raise SettingsError(
                f"{name} must be an origin such as https://api.groq.com, without /openai/v1 (got {raw!r})"
            )
        return raw.rstrip("/")

    def csv(self, name: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in (self._raw(name) or "").split(",") if part.strip())

    def secret(self, name: str) -> str | None:
        """A secret is printable ASCII without spaces, taken as written; its value never goes into a message."""
        value = self.environ.get(name, "")
        if value and not re.fullmatch(r"[!-~]+", value):
            raise SettingsError(
                f"{name} must be printable ASCII without spaces or control characters (check for a trailing"
                " newline, spaces or quotes); the value is not shown"
            )
        return value or None

    def tokens(self, name: str) -> tuple[str, ...]:
        """Comma-separated secrets; spaces next to a comma only separate them."""
        tokens = tuple(part.strip(" ") for part in self.environ.get(name, "").split(",") if part.strip(" "))
        for token in tokens:
            _Reader({name: token}).secret(name)
            if len(token) < MIN_TOKEN_LENGTH:
                raise SettingsError(
                    f"{name} entries must be at least {MIN_TOKEN_LENGTH} characters; make each with"
                    ' python -c "import secrets; print(secrets.token_urlsafe(24))"; the value is not shown'
                )
        return tokens

    def host(self, name: str, default: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        address = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        if not (_is_ip(address) or (address == raw and _HOSTNAME.fullmatch(raw))):
            raise SettingsError(
                f"{name} must be an IP address or a host name, such as 127.0.0.1, 0.0.0.0, ::1 or localhost"
                f" (got {raw!r})"
            )
        return address


def _check_model(name: str, value: str) -> str:
    if not MODEL_PATTERN.fullmatch(value):
        raise SettingsError(f"{name} must hold 1-128 characters of A-Z a-z 0-9 . _ : / - (got {value!r})")
    return value


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_origin(name: str, value: str) -> str:
    """`*` or scheme://host[:port], as a browser writes an Origin header: no path, no trailing slash."""
    match = _ORIGIN.fullmatch(value)
    host = match.group(2).strip("[]") if match else ""
    port = match.group(3) if match else None
    valid = match is not None and (_is_ip(host) or bool(_HOSTNAME.fullmatch(host)))
    if value != "*" and not (valid and (port is None or 0 < int(port) < 65536)):
        raise SettingsError(
            f"{name} entries must be * or scheme://host[:port] such as https://app.example, without a path"
            f" or trailing slash (got {value!r})"
        )
    return value.lower()


def _check_host_pattern(name: str, value: str) -> str:
    """A Host header's host part (no port), like Starlette's TrustedHostMiddleware: `*`, `*.domain`, a name or an IP."""
    rest = value[2:] if value.startswith("*.") else value
    bracketed = rest.startswith("[") and rest.endswith("]")
    if not (value == "*" or (bracketed and _is_ip(rest[1:-1])) or _is_ip(rest) or _HOSTNAME.fullmatch(rest)):
        raise SettingsError(
            f"{name} entries must be host names or addresses without a port, such as api.example.com,"
            f" *.example.com or 10.0.0.5 (got {value!r})"
        )
    return f"[{value}]" if ":" in value and _is_ip(value) else value.lower()  # as a Host header writes IPv6
