"""The projector's nats-py client, with two per-message costs of receiving an event cut to a few microseconds.

The projector receives every event, so what nats-py spends per message is a large share of its CPU (`make bench`:
a raw pull consumer that does nothing with its messages, beside the projector). Two paths of nats-py 2.x cost far
more than the work they do; this client replaces both, with the same results:

* Header parsing. `Client._parse_header_lines` checks that a header name holds no whitespace by running a Python
  generator over each character of each name; with the relay's seven headers that made it the largest single cost
  of receiving a message (~22 us against ~9). Here the check is one regular-expression search (`\\s` on a `str`
  matches exactly the characters `str.isspace` accepts).
* Taking a delivered message. `Subscription.next_msg` creates a task (named with a fresh uuid4) around
  `asyncio.wait_for(queue.get())` on every call, even when the message is already in the subscription's queue, and
  a JetStream `fetch` calls it once per message: a batch of 200 cost 400 tasks and about five event-loop turns a
  message. The subscriptions of this client take a message that is already queued directly, with nats-py's own
  bookkeeping (pending size, `task_done`), and leave waiting to nats-py.

Should a nats-py release rename what these override, or drop the subscription's queue or pending size, the
overrides are simply not used and nats-py's own paths run (nats-py is required `>=2.9`);
`tests/unit/test_projector_cpu_paths.py` and `tests/integration/test_projector_nats_client.py` compare both with
nats-py's.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_CRLF = b"\r\n"
_WHITESPACE = re.compile(r"\s")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`nats.aio.client.Client._parse_header_lines` (nats-py 2.x), with the same results."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue  # a malformed (non-ASCII) name is skipped, as nats-py does
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class QueuedFirstSubscription(Subscription):
    """A subscription whose `next_msg` returns an already-delivered message at once, without a task."""

    async def next_msg(self, timeout: float | None = 1.0) -> Msg:
        queue = self._pending_queue
        if self._cb or self._conn.is_closed or queue.empty():
            return await super().next_msg(timeout)  # waiting, and every error, as nats-py does them
        msg: Msg = queue.get_nowait()
        self._pending_size -= len(msg.data)
        queue.task_done()
        return msg


class ProjectorNatsClient(Client):
    """`nats.aio.client.Client` with the cheaper header parser and queued-first subscriptions."""

    _parse_header_lines = staticmethod(parse_header_lines)

    async def subscribe(self, *args: Any, **kwargs: Any) -> Subscription:
        sub = await super().subscribe(*args, **kwargs)
        if _takes_queued_first(sub):
            sub.__class__ = QueuedFirstSubscription
        return sub


def _takes_queued_first(sub: Subscription) -> bool:
    """Whether `sub` is nats-py's own class with the queue and the pending size `QueuedFirstSubscription` uses: a
    release that changes either (or a subclass of its own) keeps its own `next_msg`."""
    return (
        type(sub) is Subscription
        and isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)
        and isinstance(getattr(sub, "_pending_size", None), int)
    )
