"""Per-client quotas: requests per minute (GCRA), tokens per rolling minute and per UTC day.

Imported only when a limit is set. A request reserves an estimate when it is admitted (one atomic step), and
`QuotaGate` settles it to Groq's reported usage once the answer is over, however it ends. The counts live in
this process (`quota_local.Local`) or, with REDIS_URL, in Redis (`quota_redis.Shared`); both return `Raw` figures.
With METRICS=true, `on_remaining` (metrics.Metrics.quota) gets each limit's remaining figure as the headers show
it, and again after a settlement that changed the counts.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import errors
from access import CLIENT, LOCAL
from config import ServiceKey, Settings
from quota_types import NEVER, Limits, Raw, Ticket
from record import RECORD, Record

QUOTA = "service.quota"  # scope key: this request's `Admission`, filled by `Quota.admit`
GROQ_ROUTES = frozenset(
    {"/chat", "/openai/v1/chat/completions", "/v1/chat/completions", "/openai/v1/models", "/v1/models"}
)
MODEL_ROUTES = ("/openai/v1/models/", "/v1/models/")  # and a model's id
_NAMES = ("", "requests_per_minute", "tokens_per_minute", "tokens_per_day")
_NOT_SENT = frozenset({errors.NotConfigured.type})  # admitted, then the service refused: refund all
# Refused by Groq before generating (its 401/403, 429, 498) or never sent (no connection): charged 0. Any other
# error keeps the reservation (a 400 such as json_validate_failed comes after generating; so may a dropped call).
_NOT_GENERATED = frozenset(
    e.type for e in (errors.UpstreamAuth, errors.RateLimited, errors.UpstreamBusy, errors.UpstreamUnreachable)
)
_MAX_COUNT = 10_000_000  # a token count from Groq at or above this is not believed
Remaining = Callable[[str, str, int], None]  # client name, limit name (_NAMES), requests or tokens remaining


class Store(Protocol):  # `settle` must book even in a cancelled task: it never waits, or waits in a task of its own
    async def admit(self, client: str, limits: Limits, cost: int, commit: bool) -> Raw | None: ...
    async def settle(self, ticket: Ticket, tokens: int | None, refund_request: bool) -> bool: ...
    async def ready(self) -> bool: ...
    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Admission:
    ticket: Ticket | None = None  # a reservation not settled yet
    headers: list[tuple[bytes, bytes]] | None = None  # None: not admitted (yet), so the gate looks them up
    settled: Ticket | None = None  # settled, and METRICS is to be told the counts after the answer


class Quota:
    """The limits of each client, and the admission that reserves tokens or refuses with 429."""

    def __init__(self, settings: Settings, store: Store, *, on_remaining: Remaining | None = None) -> None:
        self.store = store
        self._on_remaining = on_remaining
        limits = (settings.quota_requests_per_minute, settings.quota_tokens_per_minute, settings.quota_tokens_per_day)
        self._defaults = limits
        self._reserve = settings.quota_default_reserve
        # By client name, as the counts are: a reload that changes the entry replaces its limits, so one per name.
        self._limits: dict[str, tuple[ServiceKey, Limits]] = {}

    def limits(self, client: ServiceKey) -> Limits:
        entry, limits = self._limits.get(client.name, (None, None))
        if entry != client or limits is None:
            own = (client.requests_per_minute, client.tokens_per_minute, client.tokens_per_day)
            limits = Limits(*(mine or default or 0 for mine, default in zip(own, self._defaults, strict=True)))
            self._limits[client.name] = (client, limits)
        return limits

    def gate(self, app: ASGIApp) -> QuotaGate:
        return QuotaGate(app, self)

    def ready(self) -> Awaitable[bool]:
        return self.store.ready()

    def aclose(self) -> Awaitable[None]:
        return self.store.aclose()

    @staticmethod
    def ask_for_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """A relayed stream asks Groq for its usage chunk; True when the client did not, so the relay drops it."""
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            return body, False
        return {**body, "stream_options": {**options, "include_usage": True}}, True

    async def admit(self, scope: Scope, body_bytes: int | None, max_tokens: object) -> None:
        """Reserve this request's estimate (body bytes / 4 + its max tokens), or raise QuotaExceeded.

        The whole body as the client sent it counts as prompt: tools, schemas and other fields are sent too."""
        admission: Admission = scope[QUOTA]
        admission.headers = []
        client = scope.get(CLIENT, LOCAL)
        limits = self.limits(client)
        if not any(limits):
            return
        cost = 0
        if body_bytes is not None:
            cost = -(-body_bytes // 4) + (max_tokens if isinstance(max_tokens, int) else self._reserve)
        raw = await self.store.admit(client.name, limits, cost, True)  # QuotaUnavailable when down and closed
        if raw is None:  # down, and QUOTA_FAIL_MODE=open
            return
        admission.headers = self._headers(client.name, limits, raw)
        if raw.refused:
            record: Record = scope[RECORD]
            record.quota = _NAMES[raw.refused]
            raise _exceeded(limits, raw, cost)
        admission.ticket = Ticket(client.name, limits, cost, raw.bucket, raw.day)

    async def peek(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The headers for an answer that reserved nothing (refused before admission)."""
        client = scope[CLIENT]
        limits = self.limits(client)
        raw = await self._look(client.name, limits) if any(limits) else None
        return [] if raw is None else self._headers(client.name, limits, raw)

    async def settle(self, ticket: Ticket, record: Record) -> bool:
        """Book Groq's usage (the record's token counts) in place of the reservation; True: tell METRICS (`report`)."""
        prompt = record.prompt_tokens
        completion = record.completion_tokens
        error = record.error
        tokens = None  # unknown: the reservation stands
        if _count(prompt) and _count(completion):
            tokens = prompt + completion
        elif error in _NOT_SENT or error in _NOT_GENERATED:
            tokens = 0
        record.charged_tokens = ticket.cost  # until the store takes the settlement (a native cancel may come)
        settled = await self.store.settle(ticket, tokens, error in _NOT_SENT)
        record.charged_tokens = tokens if settled and tokens is not None else ticket.cost
        return bool(self._on_remaining and settled and (error in _NOT_SENT or tokens not in (None, ticket.cost)))

    async def report(self, ticket: Ticket) -> None:
        """Tell METRICS the counts as they are now, after a settlement changed them."""
        raw = await self._look(ticket.client, ticket.limits)
        if raw is not None and self._on_remaining:
            _report(self._on_remaining, ticket.client, ticket.limits, raw)

    async def _look(self, client: str, limits: Limits) -> Raw | None:
        """The counts as they are, booking nothing; None when the store is down or busy."""
        try:
            return await self.store.admit(client, limits, 0, False)
        except (errors.QuotaUnavailable, errors.Overloaded):
            return None

    def _headers(self, client: str, limits: Limits, raw: Raw) -> list[tuple[bytes, bytes]]:
        if self._on_remaining:
            _report(self._on_remaining, client, limits, raw)
        return _headers(limits, raw)


class QuotaGate:
    """Innermost middleware on the Groq-calling routes: the x-ratelimit-* headers on every answer (a stream's
    included; in place of Groq's), and the settlement before the piece carrying Groq's usage (or the last piece)
    goes out, so the client's next request normally meets it; for an answer that never ends, once it is over."""

    def __init__(self, app: ASGIApp, quota: Quota) -> None:
        self.app = app
        self.quota = quota

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] in GROQ_ROUTES or scope["path"].startswith(MODEL_ROUTES)):
            return await self.app(scope, receive, send)
        admission = scope[QUOTA] = Admission()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = admission.headers
                if headers is None:
                    headers = await self.quota.peek(scope) if CLIENT in scope else []
                message["headers"] = [*(h for h in message["headers"] if not h[0].startswith(b"x-ratelimit")), *headers]
            if admission.ticket is not None and _usage_known(message, scope[RECORD]):
                await self._settle(admission, scope)  # booked before the client can see the usage
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if admission.ticket is not None:  # an answer that did not end (the client left, an error)
                await self._settle(admission, scope)
            if admission.settled is not None:
                with anyio.CancelScope(shield=True):
                    await self.quota.report(admission.settled)

    async def _settle(self, admission: Admission, scope: Scope) -> None:
        """Once per admission. A cancelled request still pays: the local store never waits, Redis's runs in a task
        of its own that the cancellation does not reach (at the shutdown deadline it ends after the request)."""
        ticket, admission.ticket = admission.ticket, None
        if ticket is not None and await self.quota.settle(ticket, scope[RECORD]):
            admission.settled = ticket


def _usage_known(message: Message, record: Record) -> bool:
    """Groq's usage is in the record (as early as the answer's head), or this is the answer's last piece."""
    counted = _count(record.prompt_tokens) and _count(record.completion_tokens)
    return counted or (message["type"] == "http.response.body" and not message.get("more_body"))


def _count(value: object) -> TypeGuard[int]:
    """A token count as Groq should report it; anything else (negative, bool, absurd) means usage unknown."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT


def _exceeded(limits: Limits, raw: Raw, cost: int) -> errors.QuotaExceeded:
    figure = limits[raw.refused - 1]
    what = _NAMES[raw.refused].replace("_", " ")
    if raw.wait == NEVER:
        return errors.QuotaExceeded(
            f"This request reserves {cost} tokens, more than this client's whole quota of {figure} {what}; "
            "send a shorter prompt or a lower max_tokens."
        )
    seconds = max(1, math.ceil(raw.wait))
    message = f"This client is over its quota of {figure} {what}; retry in {seconds} s."
    return errors.QuotaExceeded(message, retry_after=str(seconds))


def _headers(limits: Limits, raw: Raw) -> list[tuple[bytes, bytes]]:
    """The x-ratelimit-* headers Groq and OpenAI clients read, for the tightest limit of each kind."""
    headers: list[tuple[bytes, bytes]] = []
    if limits.requests_per_minute:
        headers += _kind(b"requests", limits.requests_per_minute, raw.requests_remaining, raw.requests_reset)
    tokens = [
        (limits.tokens_per_minute, raw.minute_used, raw.minute_reset),
        (limits.tokens_per_day, raw.day_used, raw.day_reset),
    ]
    set_limits = [(limit - used, limit, reset) for limit, used, reset in tokens if limit]
    if set_limits:
        remaining, limit, reset = min(set_limits)
        headers += _kind(b"tokens", limit, remaining, reset)
    return headers


def _report(on_remaining: Remaining, client: str, limits: Limits, raw: Raw) -> None:
    """Each set limit's remaining figure (for tokens, each window's own, where the header shows the tighter)."""
    left = (raw.requests_remaining, limits.tokens_per_minute - raw.minute_used, limits.tokens_per_day - raw.day_used)
    for name, limit, remaining in zip(_NAMES[1:], limits, left, strict=True):
        if limit:
            on_remaining(client, name, max(0, remaining))


_HEADER_NAMES = {
    k: [b"x-ratelimit-%s-%s" % (f, k) for f in (b"limit", b"remaining", b"reset")] for k in (b"requests", b"tokens")
}


def _kind(kind: bytes, limit: int, remaining: int, reset: float) -> list[tuple[bytes, bytes]]:
    values = (b"%d" % limit, b"%d" % max(0, remaining), duration(reset).encode())
    return list(zip(_HEADER_NAMES[kind], values, strict=True))


def duration(seconds: float) -> str:
    """As Groq writes its resets: `7.66s`, `2m59.56s`, `1h2m3s`."""
    seconds = max(0.0, round(seconds, 2))
    if seconds < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    return f"{int(hours)}h{text}" if hours else text


def build(settings: Settings, *, on_remaining: Remaining | None = None) -> Quota:
    if settings.redis_url:
        import quota_redis  # only with REDIS_URL

        return Quota(settings, quota_redis.Shared(settings), on_remaining=on_remaining)
    import quota_local

    return Quota(settings, quota_local.Local(settings), on_remaining=on_remaining)
