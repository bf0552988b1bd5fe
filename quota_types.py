"""What the two quota stores and the gate share: a client's limits, an admission's figures, a reservation.

Below quota.py, quota_local.py and quota_redis.py, so the stores never import the module that chooses between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

NEVER = -1.0  # Raw.wait when the request alone is over the limit: no wait would let it pass


class Limits(NamedTuple):
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int  # 0: unlimited


class Raw(NamedTuple):
    """One admission's outcome, in seconds; the same from both stores."""

    refused: int  # 0 admitted, else the index in quota._NAMES of the limit with the longest wait
    wait: float  # seconds until it would pass; NEVER when the request alone is over the limit
    requests_remaining: int
    requests_reset: float
    minute_used: int
    minute_reset: float
    day_used: int
    day_reset: float
    bucket: int  # where the reservation was booked, for the settlement
    day: int


@dataclass(frozen=True, slots=True)
class Ticket:
    client: str
    limits: Limits
    cost: int
    bucket: int
    day: int
