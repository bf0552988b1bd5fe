"""A configuration error never prints a secret pasted into another variable, in any case and in no part."""

from __future__ import annotations

from typing import Any

import pytest
from test_config_closed import _fails

SECRET = "gsk_secret_0123456789"


def _fragments(secret: str) -> set[str]:
    return {secret[i : i + 8].lower() for i in range(len(secret) - 7)}


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("LOG_LEVEL", SECRET.upper(), "(got '[redacted]')"),  # the key, upper-cased
        ("GROQ_MODEL", "x " + SECRET[:-2], "(got 'x [redacted]')"),  # 19 of its 21 characters
        ("GROQ_TIMEOUT", "ab" + SECRET[3:].upper(), "(got 'ab[redacted]')"),
        ("PORT", "8000 # " + SECRET + " was here", "(a value of 37 characters)"),  # too long to echo at all
        ("CORS_ORIGINS", "https://" + SECRET + ".example", "(a value of 37 characters)"),
    ],
)
def test_no_part_of_a_secret_is_printed(start_process: Any, name: str, value: str, shown: str) -> None:
    line = _fails(start_process, {"GROQ_API_KEY": SECRET, name: value})
    assert line["msg"].startswith(f"configuration error: {name} ") and line["msg"].endswith(shown), line["msg"]
    assert not [part for part in _fragments(SECRET) if part in line["msg"].lower()]


def test_a_short_value_is_still_echoed(start_process: Any) -> None:
    line = _fails(start_process, {"GROQ_API_KEY": SECRET, "LOG_LEVEL": "verbose"})
    assert line["msg"].endswith(" must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got 'verbose')")
