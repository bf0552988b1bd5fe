"""Fail when a service module passes 300 lines, or the default deployment or all modules pass their budget.

The default deployment is what `python app.py` loads with no optional feature on (tests/test_audit.py checks
that list against sys.modules); each feature's modules are imported only when it is turned on.
Tests, bench, scripts and docs are not counted. Raise a budget only in the same commit as the code that
needs it, with the reason beside it.
"""

import sys
from pathlib import Path

MODULE_BUDGET = 300
DEFAULT_MODULES = [
    "app",
    "access",
    "body",
    "config",
    "disconnect",
    "envelope",
    "env_values",
    "errors",
    "framing",
    "groq_wire",
    "llm",
    "logging_config",
    "middleware",
    "pacing",
    "record",
    "reloading",
    "sdk_validation",
    "server",
    "shutdown",
    "streaming",
    "upstream_clients",
    "validation",
    "write_deadline",
]
FEATURE_MODULES = {  # what each optional feature adds, imported only when it is on
    "SERVICE_KEYS_FILE": ["keys"],
    "a QUOTA_* limit": ["quota", "quota_local", "quota_types"],
    "REDIS_URL (with a quota)": ["quota_redis", "quota_deadline", "quota_lua/admit.lua", "quota_lua/settle.lua"],
    "METRICS=true": ["metrics"],
    "FALLBACK_MODELS": ["fallback"],
    "WORKERS > 1": ["workers"],
    "UPSTREAM_TRANSPORT=aiohttp (the fast extra)": ["upstream_aiohttp"],
    "the script API (never imported by the app)": ["chat_api"],
}
# History: 1,000 for the first contract; 1,650 after streaming, hardening and the SDK routes; 1,665 for the CORS
# envelope; 1,700 for splitting groq_wire.py and sdk_validation.py off modules at the 300-line limit. Then the
# default deployment grew to ~2,900 lines with issues 10-12 and 16: no 500 from any input and no Groq answer
# (bounded error bodies, nesting, surrogates, overflow: validation, errors, groq_wire), clean HTTP framing
# (framing.py: head limits on every head, early refusals without a reset, no smuggling), resources released
# however a request ends (lifetimes.py: disconnect watch, write deadline), the shutdown deadline (shutdown.py),
# configuration that fails closed (env_values.py), reasoning models, and the quota/metrics hooks; the features
# add quotas (keys, quota, quota_local, quota_redis) and metrics. The last +10/+15: the review's shared helpers
# (is_sdk_route, chunk_usage, one refusal envelope) and error-type sets named by their classes instead of strings.
# The total's +140: quota.py settling before the usage reaches the client, and quota_redis.py's Redis calls
# (issue 22 returned them to redis-py's pool, under a deadline that counts only Redis's time, in the same lines).
# Issue 26 (FALLBACK_MODELS): +75 in the default deployment for its parsing and start-up errors and llm.py's
# per-call retries and deadline (the chain itself, fallback.py, loads only when set); the total's +205 with it.
# Issue 24: +160 both: nulls and the openai SDK's bookkeeping removed at any depth, GET /v1/models/{id} with its
# access checks, Groq's own error objects and x-ratelimit-* headers carried out of llm.py to the clients.
# +15 total (issue 22): the in-process store's minute windows on the monotonic clock, and counts it forgets once
# past their window as Redis expires its keys, so the two stores agree even after clock steps (a hypothesis test).
# +10 total: quota_types.py, the types both stores share, split from quota.py (at 301) so the stores import
# nothing above them.
# Issue 26's review: +50 in the total for fallback.py keeping the SDK's retries of what does not fall back (408, 504).
# Issue 25: +165 in the default deployment, +195 in all: SIGHUP reloads the keys and secrets' files in place
# (reloading.py, the Keyring Authorize reads, old Groq clients closed after their requests, new secrets masked
# in logs), every secret may come from a <NAME>_FILE (env_values.py), and workers.py sends SIGHUP on to workers.
# +20 total (issue 22's review): quota_deadline.py, split from quota_redis.py, with the deadline's backstop.
# +15 both: body.give_back, malloc_trim(0) after a body of 512 KiB or more (the heap's freed pages, not only its top).
# The +80 of issue 27: UPSTREAM_TRANSPORT (upstream_clients.py: llm.py's pools moved behind one lease, the choice,
# the clients' options) and stream events relayed up to a bad one whatever the read boundaries (aiohttp batches
# reads); the total's +130 adds upstream_aiohttp.py, the fast extra's one shared client.
# +115 default, +120 total for issue 23: METRICS_TOKEN (its reader and start-up checks, /metrics's own access
# rule in Authorize), model labels only from Groq's answer, masking every escaped form of every secret, and a
# REDIS_URL that urlsplit cannot read refused at start-up.
# +20 more for issue 23 after the rebase on issue 25: METRICS_TOKEN's digest in the reloadable Keyring, and
# access.py (Keyring and Authorize) split from middleware.py, which passed 300 lines, with its own header.
# Issue 25's review: +15 default, +30 total: SIGHUP ignored from app.py's first line, secrets' files read as
# regular files under a size limit (a FIFO or /dev/zero hung or exhausted start-up), a deeply nested keys file and
# an unforeseen reload failure as one line, and workers.py's list of the uvicorn internals it relies on.
# Issue 21 (layers that point down): +165 total. The quota's Lua scripts left quota_redis.py's strings for
# quota_lua/*.lua, counted here from now on, one statement a line under a header on KEYS, ARGV and the reply (+93 net);
# chat_api.py, the script API moved out of llm.py under its own docstring (+31 net); reloading.py's Protocol for
# the service instead of importing app.py (+20); server.py taking the app factory (+7); no fmt: skip in
# quota_local.py and no unrelated values packed into one assignment to save lines (+11).
# Issue 21: +125 both: one typed record per request (record.py: its attributes and the one function that renders
# the access line from them, in place of a dict every module wrote keys into), the error envelope below the
# modules that answer errors (envelope.py, so shutdown.py no longer imports streaming.py), and lifetimes.py split
# by job into disconnect.py, pacing.py and write_deadline.py, each with its own header. Then +10 both: the request
# id on the record, and the review's last length-only names in app.py and quota.py written out.
# Raise them again only with the change that needs it.
DEFAULT_BUDGET = 3750
TOTAL_BUDGET = 5265
ROOT = Path(__file__).resolve().parent.parent


def _counts() -> dict[str, int]:
    """Lines per file of the service: each module by its name, the quota's Lua scripts (quota_lua/) by their path."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    files |= {path.relative_to(ROOT).as_posix(): path for path in ROOT.glob("quota_lua/*.lua")}
    return {name: len(path.read_text().splitlines()) for name, path in sorted(files.items())}


def _shown(name: str) -> str:
    return name if name.endswith(".lua") else f"{name}.py"


def main() -> None:
    counts = _counts()
    for name, lines in counts.items():
        print(f"{lines:5d}  {_shown(name)}{'  <- over ' + str(MODULE_BUDGET) if lines > MODULE_BUDGET else ''}")
    default = sum(counts.get(name, 0) for name in DEFAULT_MODULES)
    total = sum(counts.values())
    print(f"{default:5d}  the default deployment, {len(DEFAULT_MODULES)} modules (budget {DEFAULT_BUDGET})")
    for feature, modules in FEATURE_MODULES.items():
        print(f"{sum(counts.get(m, 0) for m in modules):5d}  added by {feature}: {', '.join(map(_shown, modules))}")
    print(f"{total:5d}  all modules (budget {TOTAL_BUDGET})")
    unlisted = set(counts) - set(DEFAULT_MODULES) - {m for ms in FEATURE_MODULES.values() for m in ms}
    if unlisted:
        sys.exit(f"modules neither default nor of a feature: {', '.join(sorted(unlisted))}")
    if default > DEFAULT_BUDGET or total > TOTAL_BUDGET or any(lines > MODULE_BUDGET for lines in counts.values()):
        sys.exit("size budget exceeded")


if __name__ == "__main__":
    main()
