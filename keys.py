"""SERVICE_KEYS_FILE: named clients, each by the SHA-256 of its token (the file never holds a token), with its
own limits and models. Imported only when the variable is set.

    [[keys]]
    name = "batch"                     # in the access line as `key`, and the client's quota identity
    sha256 = "<64 hex characters>"     # of the token the client sends as Authorization: Bearer <token>
    requests_per_minute = 30           # optional: override QUOTA_REQUESTS_PER_MINUTE for this client
    tokens_per_minute = 20000          # optional: override QUOTA_TOKENS_PER_MINUTE
    tokens_per_day = 500000            # optional: override QUOTA_TOKENS_PER_DAY
    allowed_models = ["openai/gpt-oss-20b"]   # optional: narrow ALLOWED_MODELS for this client
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from env_values import MODEL_PATTERN, ServiceKey, SettingsError, read_regular_file

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_LIMITS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
_FIELDS = frozenset({"name", "sha256", "allowed_models", *_LIMITS})
KEYS_FILE_LIMIT = 1024 * 1024  # 1,000 clients take about 150 KiB


def load(path: str) -> tuple[ServiceKey, ...]:
    try:
        text = read_regular_file(path, KEYS_FILE_LIMIT + 1)
        if len(text) > KEYS_FILE_LIMIT:
            raise SettingsError(f"SERVICE_KEYS_FILE is too large (over {KEYS_FILE_LIMIT // 1024 // 1024} MiB)")
        data = tomllib.loads(text.decode("utf-8"))
    except OSError as exc:
        raise SettingsError(f"SERVICE_KEYS_FILE cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"SERVICE_KEYS_FILE is not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"SERVICE_KEYS_FILE is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise SettingsError("SERVICE_KEYS_FILE is nested too deeply to parse") from None
    entries = data.get("keys")
    if set(data) != {"keys"} or not isinstance(entries, list) or not entries:
        raise SettingsError("SERVICE_KEYS_FILE must hold one or more [[keys]] tables and nothing else")
    found: list[ServiceKey] = []
    for i, entry in enumerate(entries):
        key = _entry(entry, f"SERVICE_KEYS_FILE keys[{i}]")
        for other in found:
            if other.sha256 == key.sha256:
                raise SettingsError(f"SERVICE_KEYS_FILE entries {other.name!r} and {key.name!r} have the same sha256")
            if other.name == key.name:
                raise SettingsError(f"SERVICE_KEYS_FILE has two entries named {key.name!r}; names must be unique")
        found.append(key)
    return tuple(found)


def _entry(entry: Any, where: str) -> ServiceKey:
    if not isinstance(entry, dict):
        raise SettingsError(f"{where} must be a table with name and sha256")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise SettingsError(f"{where} has unknown fields {', '.join(unknown)} (allowed: {', '.join(sorted(_FIELDS))})")
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SettingsError(f"{where}.name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise SettingsError(f"{where} ({name!r}).sha256 must be the token's SHA-256 as 64 hex characters")
    limits: dict[str, int] = {}
    for field in _LIMITS:
        value = entry.get(field)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10**12:
                raise SettingsError(f"{where} ({name!r}).{field} must be a whole number from 1 to 10**12")
            limits[field] = value
    models = entry.get("allowed_models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and MODEL_PATTERN.fullmatch(m) for m in models):
        raise SettingsError(f"{where} ({name!r}).allowed_models must be a list of model names")
    return ServiceKey(name, bytes.fromhex(digest), allowed_models=tuple(models), **limits)
