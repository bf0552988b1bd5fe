"""WORKERS > 1: uvicorn's supervisor, with SIGHUP sent on to each worker, which reloads (reloading.py).

uvicorn's `Multiprocess` answers SIGHUP by replacing every worker in turn, waiting for each old one to drain:
the environment and `.env` would be read again, a broken file would only show as a worker that fails to start,
and a long stream would hold up the others. Its signals are dispatched to `handle_<name>` methods, so this
class replaces `handle_hup` alone: each worker gets SIGHUP and reloads in place. A worker still starting is
waited for (as uvicorn's own restart does), since SIGHUP would end it before its handler is installed; one that
does not start in time is skipped with a warning.

The uvicorn supervisor internals this leans on are rows of docs/internals.md, checked on the pinned uvicorn by
tests/test_internals.py (which also checks that `handle_signals` still calls `handle_<name>` by the signal's name).
"""

from __future__ import annotations

import logging
import os
import signal

from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("service")


class Workers(Multiprocess):
    def handle_hup(self) -> None:
        for process in self.processes:
            timeout = self.config.timeout_worker_healthcheck
            if process.pid is not None and process.wait_until_ready(timeout, self.should_exit):
                os.kill(process.pid, signal.SIGHUP)
            else:
                logger.warning("reload: worker %s is not serving, not reloaded; send SIGHUP again", process.pid)
