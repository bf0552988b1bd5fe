"""Settings: read once at start-up from the environment (and `.env` in the working directory)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from env_values import (
    LOG_LEVELS,
    MODEL_PATTERN,
    Reader,
    ServiceKey,
    SettingsError,
    check_host_pattern,
    check_model,
    check_origin,
    read_secret_files,
    shown,
)

__all__ = ["MODEL_PATTERN", "ServiceKey", "Settings", "SettingsError", "load_settings"]
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


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
    fallback_models: tuple[tuple[str, tuple[str, ...]], ...] = ()  # FALLBACK_MODELS: (model, the models after it)
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
    metrics_token: str | None = field(default=None, repr=False)  # the scraper's own bearer token for /metrics
    upstream_transport: str = "httpx"  # UPSTREAM_TRANSPORT with "auto" resolved: "httpx" or "aiohttp"
    # The variables as read at start (the real environment over `.env`): a reload (SIGHUP, reloading.py) reads
    # the files they name again, never the environment.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def secrets(self) -> tuple[str, ...]:
        """What must never reach a log line or a client: the Groq key, the tokens, Redis's password."""
        secrets = (self.groq_api_key, *self.service_api_keys, self.metrics_token, _password(self.redis_url))
        return tuple(s for s in secrets if s)

    def quotas_on(self) -> bool:
        limits = (self.quota_requests_per_minute, self.quota_tokens_per_minute, self.quota_tokens_per_day)
        keys = (k.requests_per_minute or k.tokens_per_minute or k.tokens_per_day for k in self.service_keys)
        return any(limits) or any(keys)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: `.env` overlaid by the real environment, which wins)."""
    resolved = None
    try:
        if environ is None:
            environ = {**_dotenv(Path(".env")), **os.environ}
        resolved, files = read_secret_files(environ)
        return _parse(resolved, files, environ)
    except SettingsError as exc:
        # What to mask: the secrets as read from their files, if that went well; an unparsable .env is not used
        known = resolved if resolved is not None else os.environ if environ is None else environ
        error = SettingsError(_masked(str(exc), known))  # a secret pasted into the wrong variable stays hidden
        error.log_format = "text" if known.get("LOG_FORMAT", "").strip().lower() == "text" else "json"
        raise error from None


def _dotenv(path: Path) -> dict[str, str]:
    """The `.env` file's variables; a line that is not blank, a comment or KEY=value is an error, not a skipped
    line (python-dotenv reads a bare `KEY` line, without an error, as a variable of no value, and skips it)."""
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        raise SettingsError(f"{path} cannot be read as UTF-8 text; fix or remove it") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error or (binding.key is not None and binding.value is None):
            # python-dotenv counts the blank lines before a statement as part of it
            text = binding.original.string
            line = binding.original.line + text[: len(text) - len(text.lstrip())].count("\n")
            raise SettingsError(f"{path} line {line} cannot be parsed (check its quotes and the KEY=value form)")
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def _secrets_in(environ: Mapping[str, str]) -> list[str]:
    """Every secret the environment holds, checked or not: what a configuration error must not show."""
    return [
        environ.get("GROQ_API_KEY", ""),
        *environ.get("SERVICE_API_KEYS", "").split(","),
        environ.get("METRICS_TOKEN", ""),
        _password(environ.get("REDIS_URL")),
    ]


def _password(url: str | None) -> str:
    """A URL's password, read as urlsplit reads it but also from a URL it cannot parse (a config error shows none)."""
    netloc = re.split(r"[/?#]", (url or "").strip().partition("://")[2], maxsplit=1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    return userinfo.partition(":")[2] if at else ""


def _masked(message: str, environ: Mapping[str, str]) -> str:
    """Every run of 8 or more characters of a secret (a whole secret, if shorter) in any letter case, as written
    or escaped the way a message quotes a value (repr) or a log line does (JSON, once or twice)."""
    secrets = {s.strip(" ").translate(_LOWER) for s in _secrets_in(environ)}
    quoted = {s.replace("\\", "\\\\") for s in secrets}  # as repr() shows a value: \ doubled, and ' escaped
    quoted |= {q.replace("'", "\\'") for q in quoted}  # when the value holds both kinds of quote
    once = {json.dumps(s)[1:-1] for s in secrets}
    for secret in sorted(secrets | quoted | once | {json.dumps(s)[1:-1] for s in once}, key=len, reverse=True):
        if len(secret) < 4:  # a fragment that short would mask ordinary words; such tokens are refused anyway
            continue
        lower = message.translate(_LOWER)  # ASCII-only lowering keeps every index
        kept: list[str] = []
        start = 0
        while start < len(message):
            end = start
            while end < len(message) and lower[start : end + 1] in secret:
                end += 1
            run = end - start >= min(8, len(secret))
            kept.append("[redacted]" if run else message[start])
            start = end if run else start + 1
        message = "".join(kept)
    return message


def _parse(environ: Mapping[str, str], files: Mapping[str, str], source: Mapping[str, str]) -> Settings:
    env = Reader(environ, files)
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
        allowed_models=tuple(check_model("ALLOWED_MODELS", m) for m in env.csv("ALLOWED_MODELS")),
        fallback_models=env.fallbacks("FALLBACK_MODELS"),
        client_timeout=env.seconds("CLIENT_TIMEOUT", default.client_timeout),
        shutdown_timeout=env.seconds("SHUTDOWN_TIMEOUT", default.shutdown_timeout),
        cors_origins=tuple(check_origin("CORS_ORIGINS", o) for o in env.csv("CORS_ORIGINS")),
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
        metrics_token=env.token("METRICS_TOKEN"),
        allowed_hosts=tuple(check_host_pattern("ALLOWED_HOSTS", h) for h in env.csv("ALLOWED_HOSTS")),
        upstream_transport=_transport(env.choice("UPSTREAM_TRANSPORT", "auto", ("auto", "httpx", "aiohttp"))),
        environ=dict(source),
    )
    if settings.allowed_models and settings.groq_model not in settings.allowed_models:
        raise SettingsError(f"GROQ_MODEL must be one of ALLOWED_MODELS ({shown(settings.groq_model)})")
    for model, (fallback, *_) in settings.fallback_models:
        if settings.allowed_models and fallback not in settings.allowed_models:
            raise SettingsError(
                f"FALLBACK_MODELS: {model!r} falls back to {fallback!r}, which is not in ALLOWED_MODELS"
            )
    _check_quotas(settings)
    if "*" in env.csv("FORWARDED_ALLOW_IPS") and not (settings.service_api_keys or settings.service_keys):
        raise SettingsError(
            "FORWARDED_ALLOW_IPS=* lets any client claim a loopback address; without SERVICE_API_KEYS name the"
            " proxy's own addresses, or set SERVICE_API_KEYS"
        )
    _check_metrics_token(settings)
    if settings.metrics and importlib.util.find_spec("prometheus_client") is None:  # found, not imported
        raise SettingsError(
            "METRICS=true needs prometheus-client: pip install --require-hashes --no-deps -r requirements-metrics.txt"
        )
    return settings


def _transport(chosen: str) -> str:
    """The groq SDK's aiohttp transport (the fast extra) when asked for, or for "auto" when installed."""
    installed = all(importlib.util.find_spec(name) is not None for name in ("aiohttp", "httpx_aiohttp"))  # not imported
    if chosen == "aiohttp" and not installed:
        raise SettingsError(
            "UPSTREAM_TRANSPORT=aiohttp needs the fast extra: "
            "pip install --require-hashes --no-deps -r requirements-fast.txt"
        )
    return "aiohttp" if chosen == "aiohttp" or (chosen == "auto" and installed) else "httpx"


def _keys_file(path: str | None, environ: Mapping[str, str]) -> tuple[ServiceKey, ...]:
    if path is None:
        return ()
    if environ.get("SERVICE_API_KEYS", "").strip():
        raise SettingsError("Set SERVICE_API_KEYS or SERVICE_KEYS_FILE, not both")
    import keys  # only with a keys file

    return keys.load(path)


def _check_metrics_token(settings: Settings) -> None:
    if settings.metrics_token is None:
        return
    if not settings.metrics:
        raise SettingsError("METRICS_TOKEN is set but METRICS is not true: set METRICS=true, or unset METRICS_TOKEN")
    digest = hashlib.sha256(settings.metrics_token.encode()).digest()
    if settings.metrics_token in settings.service_api_keys or digest in {k.sha256 for k in settings.service_keys}:
        raise SettingsError(
            "METRICS_TOKEN must differ from every client token (SERVICE_API_KEYS, SERVICE_KEYS_FILE): the scraper"
            " gets a token of its own, which cannot call Groq"
        )


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
            "pip install --require-hashes --no-deps -r requirements-redis.txt"
        )
