"""CustomerQueryService: one table entry per unary RPC (request -> parsed, read) over `QueryRunner`."""

from __future__ import annotations

from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import customer_service_pb2 as pb
from cqrs.orders.v1 import customer_service_pb2_grpc as pb_grpc

from core.errors import FieldViolation, NotFound
from query_service import paging, views
from query_service.api.listing import listing, page_of
from query_service.api.runner import Query, QueryRunner
from query_service.consistency import ReadYourWrites
from query_service.customer_read_model import CustomerReadModel, normalize_email
from query_service.request_checks import collect, parse_uuid, text_filter_violation

# Longer than any stored value (names: 200 characters, emails: 254): anything longer cannot match.
MAX_NAME_PREFIX_LENGTH = 200
MAX_EMAIL_LENGTH = 254

CustomerListing = tuple[paging.CustomerFilter, int, paging.CustomerCursor | None]


def parse_list_customers_request(request: pb.ListCustomersRequest) -> CustomerListing:
    """Filters, effective page size and cursor of a ListCustomers request; all field errors at once."""
    violations: list[FieldViolation] = []
    email = normalize_email(request.email)
    for problem in (
        text_filter_violation("name_prefix", request.name_prefix, max_length=MAX_NAME_PREFIX_LENGTH),
        text_filter_violation("email", email, max_length=MAX_EMAIL_LENGTH),
    ):
        if problem is not None:
            violations.append(problem)
    page_size = collect(violations, lambda: paging.effective_page_size(request.page_size))
    filters = paging.CustomerFilter(name_prefix=request.name_prefix, email=email)
    return listing(violations, page_size, filters, request.page_token, paging.decode_customer_page_token)


class CustomerQueryServicer(pb_grpc.CustomerQueryServiceServicer):
    """Answers the customer queries from the MongoDB read model only: a table of unary reads."""

    def __init__(
        self,
        read_model: CustomerReadModel,
        read_your_writes: ReadYourWrites,
        *,
        max_message_bytes: int = paging.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._read_model = read_model
        self._page_budget = paging.page_budget(max_message_bytes)
        self.runner = QueryRunner(self, read_your_writes)

    async def _get_customer(
        self, customer_id: str, consistency: consistency_pb2.ReadConsistency
    ) -> pb.GetCustomerResponse:
        doc = await self._read_model.get(customer_id)
        if doc is None:
            raise NotFound(f"customer {customer_id} not found")
        return pb.GetCustomerResponse(customer=views.customer_from_document(doc), consistency=consistency)

    async def _list_customers(
        self, query: CustomerListing, consistency: consistency_pb2.ReadConsistency
    ) -> pb.ListCustomersResponse:
        filters, page_size, after = query
        docs = await self._read_model.list_page(filters, after, page_size + 1)
        customers, last = page_of(docs, page_size, self._page_budget, views.customer_from_document)
        response = pb.ListCustomersResponse(customers=customers, consistency=consistency)
        if last is not None:
            cursor = paging.CustomerCursor(name=str(last.get("name") or ""), customer_id=str(last["_id"]))
            response.next_page_token = paging.encode_customer_page_token(cursor, filters)
        return response

    GetCustomer = Query(pb.GetCustomerRequest, lambda r: parse_uuid(r.customer_id, "customer_id"), _get_customer)
    ListCustomers = Query(pb.ListCustomersRequest, parse_list_customers_request, _list_customers)
