"""The CustomerQueryService gRPC servicer: GetCustomer and ListCustomers from the `customers` read model."""

from __future__ import annotations

from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound
from query_service import paging, views
from query_service.consistency import ReadYourWrites
from query_service.customer_read_model import CustomerReadModel, normalize_email
from query_service.grpc_api import Context, answer, collect, parse_uuid, validated_and_consistent
from query_service.request_checks import text_filter_violation

# Longer than any stored value (names: 200 characters, emails: 254): anything longer cannot match.
MAX_NAME_PREFIX_LENGTH = 200
MAX_EMAIL_LENGTH = 254


class CustomerQueryServicer(customer_service_pb2_grpc.CustomerQueryServiceServicer):
    """Answers GetCustomer and ListCustomers from the MongoDB read model only."""

    def __init__(
        self,
        read_model: CustomerReadModel,
        read_your_writes: ReadYourWrites,
        *,
        max_message_bytes: int = paging.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._read_model = read_model
        self._ryw = read_your_writes
        self._page_budget = paging.page_budget(max_message_bytes)

    async def GetCustomer(
        self, request: customer_service_pb2.GetCustomerRequest, context: Context
    ) -> customer_service_pb2.GetCustomerResponse:
        return await answer(context, "GetCustomer", lambda: self._get_customer(request, context))

    async def ListCustomers(
        self, request: customer_service_pb2.ListCustomersRequest, context: Context
    ) -> customer_service_pb2.ListCustomersResponse:
        return await answer(context, "ListCustomers", lambda: self._list_customers(request, context))

    async def _get_customer(
        self, request: customer_service_pb2.GetCustomerRequest, context: Context
    ) -> customer_service_pb2.GetCustomerResponse:
        customer_id, consistency = await validated_and_consistent(
            self._ryw, request.consistency, context, lambda: parse_uuid(request.customer_id, "customer_id")
        )
        doc = await self._read_model.get(customer_id)
        if doc is None:
            raise NotFound(f"customer {customer_id} not found")
        return customer_service_pb2.GetCustomerResponse(
            customer=views.customer_from_document(doc), consistency=consistency
        )

    async def _list_customers(
        self, request: customer_service_pb2.ListCustomersRequest, context: Context
    ) -> customer_service_pb2.ListCustomersResponse:
        (filters, page_size, after), consistency = await validated_and_consistent(
            self._ryw, request.consistency, context, lambda: parse_list_customers_request(request)
        )
        # One extra document tells whether another page exists without a second query.
        docs = await self._read_model.list_page(filters, after, page_size + 1)
        customers = [views.customer_from_document(d) for d in docs[:page_size]]
        count = paging.fit_page((c.ByteSize() for c in customers), page_size, self._page_budget)
        response = customer_service_pb2.ListCustomersResponse(customers=customers[:count], consistency=consistency)
        if len(docs) > count:
            last = docs[count - 1]
            cursor = paging.CustomerCursor(name=str(last.get("name") or ""), customer_id=str(last["_id"]))
            response.next_page_token = paging.encode_customer_page_token(cursor, filters)
        return response


def parse_list_customers_request(
    request: customer_service_pb2.ListCustomersRequest,
) -> tuple[paging.CustomerFilter, int, paging.CustomerCursor | None]:
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
    after: paging.CustomerCursor | None = None
    if request.page_token and not violations:
        after = collect(violations, lambda: paging.decode_customer_page_token(request.page_token, filters))
    if violations:
        raise InvalidArgument(violations)
    assert page_size is not None
    return filters, page_size, after
