"""What a batch hands to the writers of its derived views (`projector.registry.VIEWS`), and their signature."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.projections import Document

if TYPE_CHECKING:
    from projector.order_stats import StoredStats

# One order's change in a batch: its document before (None: new) and after the batch's write.
Step = tuple[Document | None, Document]


@dataclass(frozen=True, slots=True)
class ViewSources:
    """What a batch gives a view writer besides its keys (all empty: the writer reads what it needs)."""

    docs: Mapping[str, Document] = field(default_factory=dict)  # trigger documents as the batch left them
    # Per key: the steps of its streams, when every stream the key depends on was written by this batch onto a
    # document the view counts as it is (`view_planning.view_steps`); a key left out must be recomputed.
    steps: Mapping[str, Sequence[Step]] = field(default_factory=dict)
    prior: Mapping[str, StoredStats] = field(default_factory=dict)  # the keys' state read before the batch wrote
    # The streams' checkpoint versions as the batch read them, and when (`time.monotonic()`; None: not a batch).
    checkpoints: Mapping[str, int] = field(default_factory=dict)
    loaded_at: float | None = None


# A view writer: (keys to recompute, versions the triggering documents already carry, refused keys to record,
# what the batch knows of the keys).
ViewWriter = Callable[[Iterable[str], Mapping[str, int], set[str], ViewSources], Awaitable[object]]
