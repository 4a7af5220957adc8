"""The read-model contract (core/read_model.py) is the one source both sides use; every status is known everywhere.

A status or index added to the contract and missed by a projection, the customer statistics or the query views
fails here instead of reading as UNSPECIFIED or counting nowhere.
"""

from __future__ import annotations

from cqrs.orders.v1 import customer_pb2, order_pb2

from core import read_model as contract
from core.projections.customers import CUSTOMERS, empty_order_stats
from core.projections.orders import ORDERS
from projector.order_stats import STATUS_COUNTERS
from query_service import views
from query_service.customer_read_model import CUSTOMER_INDEXES
from query_service.read_model import ORDER_INDEXES


def test_every_order_status_maps_to_a_distinct_proto_value_and_back() -> None:
    mapped = {status: views.status_to_proto(status) for status in contract.OrderStatus}
    assert order_pb2.ORDER_STATUS_UNSPECIFIED not in mapped.values(), mapped
    assert len(set(mapped.values())) == len(contract.OrderStatus)
    for status, value in mapped.items():
        assert views.status_from_proto(value) == status
    # and every proto value (but UNSPECIFIED) is a status of the contract
    named = {v.number for v in order_pb2.OrderStatus.DESCRIPTOR.values} - {order_pb2.ORDER_STATUS_UNSPECIFIED}
    assert named == set(mapped.values())


def test_every_customer_status_maps_to_a_proto_value() -> None:
    assert set(views.CUSTOMER_STATUS_TO_PROTO) == set(contract.CustomerStatus)
    named = {v.number for v in customer_pb2.CustomerStatus.DESCRIPTOR.values} - {
        customer_pb2.CUSTOMER_STATUS_UNSPECIFIED
    }
    assert named == set(views.CUSTOMER_STATUS_TO_PROTO.values())


def test_every_order_status_has_a_counter_in_the_customer_statistics() -> None:
    assert set(STATUS_COUNTERS) == set(contract.OrderStatus)
    assert set(STATUS_COUNTERS.values()) <= set(empty_order_stats())


def test_both_sides_use_the_contracts_collections_and_indexes() -> None:
    assert ORDERS.collection == contract.ORDERS_COLLECTION
    assert CUSTOMERS.collection == contract.CUSTOMERS_COLLECTION
    assert tuple(ORDERS.indexes) == contract.ORDER_INDEXES
    assert tuple(CUSTOMERS.indexes) == contract.CUSTOMER_INDEXES
    assert [tuple(m.document["key"].items()) for m in ORDER_INDEXES] == list(contract.ORDER_INDEXES)
    assert [tuple(m.document["key"].items()) for m in CUSTOMER_INDEXES] == list(contract.CUSTOMER_INDEXES)
