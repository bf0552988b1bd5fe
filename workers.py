"""WORKERS > 1: uvicorn's supervisor, with SIGHUP sent on to each worker, which reloads (reloading.py).

uvicorn's `Multiprocess` answers SIGHUP by replacing every worker in turn, waiting for each old one to drain:
the environment and `.env` would be read again, a broken file would only show as a worker that fails to start,
and a long stream would hold up the others. Its signals are dispatched to `handle_<name>` methods, so this
class replaces `handle_hup` alone: each worker that has finished starting gets SIGHUP and reloads in place.
A worker still starting is skipped (SIGHUP would end it before its handler is installed), with a warning: it may
have read the files before they changed, so send SIGHUP again once it serves.
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
            if process.pid is not None and process.is_ready(self.config.timeout_worker_healthcheck):
                os.kill(process.pid, signal.SIGHUP)
            else:
                logger.warning("reload: worker %s is still starting, not reloaded; send SIGHUP again", process.pid)
