"""Settings: read once at start-up from the environment (and `.env` in the working directory)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dotenv import dotenv_values

MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A variable holds a value the service cannot run with; the message names it and what it accepts."""

    log_format = "json"  # how to report it: the LOG_FORMAT that was asked for, if that much was valid


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
    metrics: bool = False

    def secrets(self) -> tuple[str, ...]:
        """What must never reach a log line or a client: the Groq key and the client tokens."""
        return tuple(s for s in (self.groq_api_key, *self.service_api_keys) if s)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: `.env` overlaid by the real environment, which wins)."""
    if environ is None:
        environ = {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}
    try:
        return _parse(environ)
    except SettingsError as exc:
        exc.log_format = "text" if environ.get("LOG_FORMAT", "").strip().lower() == "text" else "json"
        raise


def _parse(environ: Mapping[str, str]) -> Settings:
    env = _Reader(environ)
    default = Settings()
    settings = Settings(
        groq_api_key=environ.get("GROQ_API_KEY") or None,
        groq_model=env.model("GROQ_MODEL", default.groq_model),
        groq_base_url=env.url("GROQ_BASE_URL", default.groq_base_url),
        groq_timeout=env.seconds("GROQ_TIMEOUT", default.groq_timeout),
        groq_max_retries=env.integer("GROQ_MAX_RETRIES", default.groq_max_retries, 0, 10),
        stream_idle_timeout=env.seconds("GROQ_STREAM_IDLE_TIMEOUT", default.stream_idle_timeout),
        log_level=env.choice("LOG_LEVEL", default.log_level, LOG_LEVELS),
        log_format=env.choice("LOG_FORMAT", default.log_format, ("json", "text")),
        log_prompts=env.choice("LOG_PROMPTS", "false", ("true", "false")) == "true",
        host=environ.get("HOST") or default.host,
        port=env.integer("PORT", default.port, 0, 65535),
        workers=env.integer("WORKERS", default.workers, 1, 64),
        service_api_keys=env.csv("SERVICE_API_KEYS"),
        max_body_bytes=env.integer("MAX_BODY_BYTES", default.max_body_bytes, 1, 2**31),
        max_concurrency=env.integer("MAX_CONCURRENCY", default.max_concurrency, 1, 100_000),
        allowed_models=tuple(_check_model("ALLOWED_MODELS", m) for m in env.csv("ALLOWED_MODELS")),
        client_timeout=env.seconds("CLIENT_TIMEOUT", default.client_timeout),
        shutdown_timeout=env.seconds("SHUTDOWN_TIMEOUT", default.shutdown_timeout),
        cors_origins=env.csv("CORS_ORIGINS"),
        forwarded_allow_ips=environ.get("FORWARDED_ALLOW_IPS", "").strip(),
        metrics=env.choice("METRICS", "false", ("true", "false")) == "true",
    )
    if settings.allowed_models and settings.groq_model not in settings.allowed_models:
        raise SettingsError(f"GROQ_MODEL {settings.groq_model!r} must be one of ALLOWED_MODELS")
    if settings.metrics and importlib.util.find_spec("prometheus_client") is None:  # found, not imported
        raise SettingsError(
            "METRICS=true needs prometheus-client: pip install --require-hashes -r requirements-metrics.txt"
        )
    return settings


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


def _check_model(name: str, value: str) -> str:
    if not MODEL_PATTERN.fullmatch(value):
        raise SettingsError(f"{name} must hold 1-128 characters of A-Z a-z 0-9 . _ : / - (got {value!r})")
    return value
