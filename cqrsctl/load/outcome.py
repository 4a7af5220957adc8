"""How the load tool counts one reply: a success, an error, or a read of the run's own write that the read model
did not show yet. Pure: no gRPC import, no I/O (status codes arrive as their names, e.g. "NOT_FOUND").

The read model is eventually consistent: a GetOrder sent right after the CreateOrder that made the order can be
answered NOT_FOUND until the projector has applied the event. That is replication lag, which the time-to-queryable
figures measure, not a failure of the service; counting it as an error would hide real errors among lag. Only
reads of orders this run created get that benefit of the doubt: NOT_FOUND for any other id is an error.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

# The start of the UNAVAILABLE message the query service sends when a read's consistency tokens are not reflected
# within its wait (`query_service.consistency.WaitOutcome.describe`; tests/unit/test_load_outcome.py pins it).
# Nothing else tells this apart from an UNAVAILABLE for a MongoDB outage, which is an error.
TOKEN_WAIT_EXPIRED: Final = "the read model has not caught up with the consistency tokens"


class Outcome(Enum):
    OK = "ok"
    NOT_YET_VISIBLE = "not_yet_visible"
    ERROR = "error"


def classify(code: str | None, details: str | None = None, *, reads_own_write: bool = False) -> Outcome:
    """What one reply counts as.

    `code` is the gRPC status code's name (None for a success), `details` its message. `reads_own_write` is True
    for a read of an order this run created (and whose creation was acknowledged): then NOT_FOUND, or a
    consistency wait that ran out before the read model reflected the write's token, is NOT_YET_VISIBLE.
    Everything else that failed is an ERROR.
    """
    if code is None:
        return Outcome.OK
    if reads_own_write and (
        code == "NOT_FOUND" or (code == "UNAVAILABLE" and (details or "").startswith(TOKEN_WAIT_EXPIRED))
    ):
        return Outcome.NOT_YET_VISIBLE
    return Outcome.ERROR
