"""The projector's side of read-model generations (`core.generations`): which generation it writes, when to look
again, and the heartbeat a cutover waits for.

The runner calls `poll` between batches when `due`, moves its pipeline if a new generation is active, then calls
`report`: from that report on, no batch of this projector writes the old generation.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.generations import GenerationFollower, ensure_active, remove_writer, report_writer


class GenerationWriter:
    """One projector process's view of the active generation and its writer heartbeat."""

    def __init__(self, base: AsyncDatabase[dict[str, Any]], versions: Mapping[str, int], poll_seconds: float) -> None:
        self._base = base
        self._versions = dict(versions)
        self._poll_seconds = poll_seconds
        self._follower = GenerationFollower(base)
        self._recorded = False
        self._next_check = 0.0
        # Names this process in the writer heartbeats a cutover waits for.
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @property
    def database(self) -> str:
        """The database of the generation this projector writes."""
        return self._follower.current.database

    def due(self, now: float) -> bool:
        return now >= self._next_check

    def check_soon(self) -> None:
        """Look again before the next fetch (after a MongoDB outage: a cutover may have happened meanwhile)."""
        self._next_check = 0.0

    async def poll(self) -> str | None:
        """The database of a newly active generation (None: unchanged). Records the active generation first if
        none is (see `ensure_active`). Raises the driver's error when MongoDB is down."""
        if not self._recorded:
            await ensure_active(self._base, self._versions)
            self._recorded = True
        moved = await self._follower.poll()
        return None if moved is None else moved.database

    async def report(self, now: float) -> None:
        """The heartbeat: this projector writes `database` from now on."""
        await report_writer(self._base, self.writer_id, self._follower.current)
        self._next_check = now + self._poll_seconds

    async def leave(self) -> None:
        """Removes the heartbeat (a cutover would otherwise wait for it to expire); a no-op if never recorded."""
        if self._recorded:
            await remove_writer(self._base, self.writer_id)
