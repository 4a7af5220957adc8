"""The CustomerQueryService gRPC servicer: GetCustomer and ListCustomers from the `customers` read model."""

from __future__ import annotations

from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound
from query_service import paging, views
from query_service.consistency import ReadYourWrites
from query_service.customer_read_model import CustomerReadModel, normalize_email
from query_service.grpc_api import Context, answer, collect, parse_uuid, validated_and_consistent

# Longer than any stored value (names: 200 characters, emails: 254): anything longer cannot match.
MAX_NAME_PREFIX_LENGTH = 200
MAX_EMAIL_LENGTH = 254


class CustomerQueryServicer(customer_service_pb2_grpc.CustomerQueryServiceServicer):
    """Answers GetCustomer and ListCustomers from the MongoDB read model only."""

    def __init__(self, read_model: CustomerReadModel, read_your_writes: ReadYourWrites) -> None:
        self._read_model = read_model
        self._ryw = read_your_writes

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
        page = docs[:page_size]
        response = customer_service_pb2.ListCustomersResponse(
            customers=[views.customer_from_document(d) for d in page], consistency=consistency
        )
        if len(docs) > page_size:
            last = page[-1]
            cursor = paging.CustomerCursor(name=str(last.get("name") or ""), customer_id=str(last["_id"]))
            response.next_page_token = paging.encode_customer_page_token(cursor, filters)
        return response


def parse_list_customers_request(
    request: customer_service_pb2.ListCustomersRequest,
) -> tuple[paging.CustomerFilter, int, paging.CustomerCursor | None]:
    """Filters, effective page size and cursor of a ListCustomers request; all field errors at once."""
    violations: list[FieldViolation] = []
    if len(request.name_prefix) > MAX_NAME_PREFIX_LENGTH:
        violations.append(FieldViolation("name_prefix", f"must be at most {MAX_NAME_PREFIX_LENGTH} characters long"))
    email = normalize_email(request.email)
    if len(email) > MAX_EMAIL_LENGTH:
        violations.append(FieldViolation("email", f"must be at most {MAX_EMAIL_LENGTH} characters long"))
    page_size = collect(violations, lambda: paging.effective_page_size(request.page_size))
    filters = paging.CustomerFilter(name_prefix=request.name_prefix, email=email)
    after: paging.CustomerCursor | None = None
    if request.page_token and not violations:
        after = collect(violations, lambda: paging.decode_customer_page_token(request.page_token, filters))
    if violations:
        raise InvalidArgument(violations)
    assert page_size is not None
    return filters, page_size, after
