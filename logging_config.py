"""One logging set-up for our loggers, uvicorn's and Python warnings: JSON lines or readable text.

Structured fields travel as `extra={"fields": {...}}`; the request id travels in a ContextVar so
every line written while a request is handled carries it.
"""

from __future__ import annotations

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# C0 controls, DEL, C1 controls and the Unicode line separators: none may split or colour a text line.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class _Formatter(logging.Formatter):
    def __init__(self, *, as_json: bool, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._as_json = as_json
        self._secrets: tuple[str, ...] = ()
        self.mask(secrets)

    def mask(self, secrets: tuple[str, ...]) -> None:
        """Mask these secrets too, in every form (_forms), longest first; those already masked stay masked
        (never pruned, on purpose: a rotated-out secret stays masked)."""
        forms = {*self._secrets, *_forms(secrets, as_json=self._as_json)}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            fields["request_id"] = request_id
        fields.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self._as_json:
            line = json.dumps(fields, default=str)
        else:
            head = " ".join(str(fields.pop(k)) for k in ("ts", "level", "logger", "msg"))
            line = " ".join([head, *(f"{k}={_text_value(v)}" for k, v in fields.items())]).translate(_UNPRINTABLE)
        for secret in self._secrets:  # on the finished line, after every escaping
            if secret in line:
                line = line.replace(secret, "[redacted]")
        return line


def _forms(secrets: tuple[str, ...], *, as_json: bool) -> tuple[str, ...]:
    """Each secret as it can appear in a finished line, longest first: JSON-escaped once (a string field), twice
    (a text line quotes a JSON-encoded value again; logged text holding JSON) or three times, and, in a text line,
    as written. A JSON line holds no secret unescaped that holds a quote or a backslash; such a form, replaced
    there, could cut an escape in two."""
    forms = set()
    for secret in filter(None, secrets):
        escaped = [secret]
        for _ in range(3):
            escaped.append(json.dumps(escaped[-1])[1:-1])
        forms.update(escaped[1:] if as_json else escaped)
    return tuple(sorted(forms, key=len, reverse=True))


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


def logging_dict(
    *, level: str, fmt: str, secrets: tuple[str, ...] = (), stream: Any = "ext://sys.stderr"
) -> dict[str, Any]:
    """The dictConfig for the whole process; uvicorn gets it as `log_config` so it adds no handler of its own."""
    handler = {"class": "logging.StreamHandler", "formatter": "service", "stream": stream}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": _Formatter, "as_json": fmt == "json", "secrets": secrets}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            # Our middleware writes the one access line per request; uvicorn's would be a duplicate.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            # The SDK and httpx log request details at DEBUG; keep them quiet unless they warn.
            "groq": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


def configure(
    *, level: str, fmt: str, secrets: tuple[str, ...] = (), stream: Any = "ext://sys.stderr"
) -> dict[str, Any]:
    config = logging_dict(level=level, fmt=fmt, secrets=secrets, stream=stream)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return config


def mask(secrets: tuple[str, ...]) -> None:
    """Mask these secrets too (a reload read new ones), in the same forms as those from start, which stay masked."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _Formatter):
            handler.formatter.mask(secrets)


def fatal_line(message: str, *, fmt: str) -> str:
    """One CRITICAL line in the requested format, for failures before logging could be configured."""
    record = logging.LogRecord("service", logging.CRITICAL, __file__, 0, message, None, None)
    return _Formatter(as_json=fmt == "json").format(record)
