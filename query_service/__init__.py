"""Read side of the order service: a gRPC server that answers only from the MongoDB read model.

It imports neither asyncpg nor nats: PostgreSQL and NATS are the write side's business, and the read model in
MongoDB is all this service needs (ARCHITECTURE.md, guarantee 6).

Two services on one server: OrderQueryService (GetOrder, ListOrders, WatchOrder) and CustomerQueryService
(GetCustomer, ListCustomers). Every query accepts consistency tokens (read-your-writes, `consistency.py`);
WatchOrder streams share one change-stream feed (`watch.py`).
"""
