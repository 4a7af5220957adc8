"""The one registry of read-model projections, shared by the projector, `cqrs verify` and `cqrs dead-letters`.

Orders come first: a batch writes order documents before the customer views derived from them (see
`projector.pipeline`). A new read model is a module in `projector/projections/` added here.
"""

from __future__ import annotations

from projector.projections import Projection
from projector.projections.customers import CUSTOMERS
from projector.projections.orders import ORDERS

PROJECTIONS: tuple[Projection, ...] = (ORDERS, CUSTOMERS)
