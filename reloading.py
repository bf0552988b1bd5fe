"""SIGHUP: read SERVICE_KEYS_FILE and the secrets' files (`*_FILE`) again, for the requests that start after.

The environment and `.env` are not read again: the reload parses the variables as they were at start, so every
value from a file passes the same checks as at start. A reload that fails changes nothing and logs one ERROR;
one that succeeds logs one line naming the clients. Requests in flight keep the client entry and the Groq
connection they were admitted with; the Groq clients made with an old key close once the requests in flight at
the reload have ended.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any, Protocol

import logging_config
from config import Settings, SettingsError, load_settings
from llm import Upstream

if TYPE_CHECKING:
    from access import Keyring
    from shutdown import Requests

logger = logging.getLogger("service")


class Reloadable(Protocol):
    """What a reload reads and replaces of app.Service (this module is below app.py, so it names only these)."""

    settings: Settings
    upstream: Upstream | None

    @property
    def reload_on_hup(self) -> bool: ...

    @property
    def keyring(self) -> Keyring: ...

    @property
    def requests(self) -> Requests: ...

    @property
    def quota(self) -> object | None: ...


class Reloader:
    """Installed by the app's lifespan in `python app.py` and in each of its workers (server.py, workers.py)."""

    def __init__(self, service: Reloadable) -> None:
        self._service = service
        self._retiring: set[asyncio.Task[None]] = set()  # old Groq clients waiting for their requests to end

    def install(self) -> Reloader:
        if self._service.reload_on_hup:  # the main thread's loop only: not under a test's thread or TestClient
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        return self

    async def aclose(self) -> None:
        if self._service.reload_on_hup:  # shutting down: a reload would have nothing to apply to, so SIG_IGN;
            # held back meanwhile, as removing the loop's handler sets SIG_DFL first (a SIGHUP would end the process)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP that came meanwhile is dropped
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        for task in self._retiring:  # the requests they wait for have ended, or been ended, by now
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def reload(self) -> None:
        service = self._service
        try:
            settings = load_settings(service.settings.environ)
            check_applicable(service.settings, settings, quota_on=service.quota is not None)
        except SettingsError as exc:
            logger.error("reload failed, the configuration in use stays: %s", exc)
            return
        except Exception as exc:  # not foreseen: its message may quote a secret, so the type alone, no traceback
            logger.error("reload failed, the configuration in use stays: unexpected %s", exc.__class__.__name__)
            return
        old, new = service.upstream, None
        if old is not None and settings.groq_api_key != service.settings.groq_api_key:
            new = Upstream(settings)  # made before anything changes
        logging_config.mask(settings.secrets())  # before anything could log them
        service.keyring.replace(settings)
        if old is not None and new is not None:
            service.upstream = new
            task = asyncio.get_running_loop().create_task(_retire(old, set(service.requests.tasks)))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        service.settings = settings
        names = [client.name for client in service.keyring.clients.values()]
        logger.info(
            "reloaded: %d client(s): %s",
            len(names),
            ", ".join(names) or "none (loopback only)",
            extra={"fields": {"clients": names}},
        )


async def _retire(old: Upstream, requests: set[asyncio.Task[Any]]) -> None:
    """Close the old Groq clients once every request in flight at the reload has ended: a call already under way
    finishes on its connection, while the calls that start after the reload take the new Upstream."""
    try:
        if requests:
            await asyncio.wait(requests)
    finally:
        await old.aclose()


def check_applicable(old: Settings, new: Settings, *, quota_on: bool) -> None:
    """What a reload cannot change in a running process, refused so the reload changes nothing."""
    if bool(old.service_api_keys or old.service_keys) != bool(new.service_api_keys or new.service_keys):
        raise SettingsError("service tokens cannot be turned on or off by a reload; restart the service")
    if new.quotas_on() and not quota_on:
        raise SettingsError("SERVICE_KEYS_FILE sets a limit, but quotas were off at start; restart to turn them on")
    if quota_on and new.redis_url != old.redis_url:
        raise SettingsError("REDIS_URL_FILE changed; the quota's Redis connection is made at start: restart")
