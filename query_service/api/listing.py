"""What ListOrders and ListCustomers share: the end of parsing a listing request, and the cut of one page."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from core.errors import FieldViolation, InvalidArgument
from query_service import paging
from query_service.read_model import Document
from query_service.request_checks import collect

Filters = TypeVar("Filters")
Cursor = TypeVar("Cursor")
View = TypeVar("View", bound=Message)


def listing(
    violations: list[FieldViolation],
    page_size: int | None,
    filters: Filters,
    page_token: str,
    decode_token: Callable[[str, Filters], Cursor],
) -> tuple[Filters, int, Cursor | None]:
    """Filters, page size and cursor of a listing request, or InvalidArgument with every violation found.

    The page token is decoded only for an otherwise valid request, as it is checked against the filters it was
    issued for.
    """
    after: Cursor | None = None
    if page_token and not violations:
        after = collect(violations, lambda: decode_token(page_token, filters))
    if violations:
        raise InvalidArgument(violations)
    assert page_size is not None
    return filters, page_size, after


def page_of(
    docs: list[Document], page_size: int, budget: int, view: Callable[[Document], View]
) -> tuple[list[View], Document | None]:
    """The views of one page and, when another page follows, the last document shown (for the next cursor).

    `docs` holds one document more than a page: it tells whether another page exists without a second query. The
    page is cut by encoded size too (`budget` bytes): 500 orders of 100 long lines would not fit a gRPC message.
    """
    shown = [view(doc) for doc in docs[:page_size]]
    count = paging.fit_page((item.ByteSize() for item in shown), page_size, budget)
    return shown[:count], docs[count - 1] if len(docs) > count else None
