"""A checkout service built on `cqrs_client`: what another backend service calling the order service looks like.

Registers a customer, creates an order, adds items, places it, then reads it back with read-your-writes (the
session adds its own writes' consistency tokens, so the read can't miss the order just placed) and prints it.

    python examples/checkout_service.py --command-addr 127.0.0.1:50051 --query-addr 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

import grpc

from cqrs_client import Address, ClientTLS, OrdersClient, OrderStatus, RetryPolicy, field_violations


async def checkout(client: OrdersClient, email: str) -> int:
    """Runs one checkout through a session and prints the placed order as the query side shows it."""
    session = client.session()
    customer = await session.register_customer("Grace Hopper", email)
    created = await session.create_order(
        customer.customer_id,
        "EUR",
        Address(recipient="Grace Hopper", line1="1 Compiler Way", city="Arlington", postal_code="22201", country="US"),
    )
    order_id = created.order_id
    await session.add_item(order_id, "COBOL-1", "COBOL handbook", 1, 3450)
    added = await session.add_item(order_id, "NANO-30", "Nanosecond wire (30 cm)", 3, 199)
    # expected_version: place exactly what was just filled (ABORTED if someone changed the order meanwhile).
    placed = await session.place_order(order_id, expected_version=added.version)

    view = await session.get_order(order_id)  # waits until the read model reflects every write of this session
    order = view.order
    print(f"customer {customer.customer_id} <{order.customer_email}>")
    print(
        f"order {order.order_id}: {OrderStatus.Name(order.status)}, version {order.version} "
        f"(placed at version {placed.version}), waited {view.consistency.waited_ms} ms for the read model"
    )
    for line in order.lines:
        print(f"  {line.quantity} x {line.sku:<8} {line.name:<24} {line.line_total_minor / 100:>8.2f} {order.currency}")
    print(f"  total {order.total_minor / 100:.2f} {order.currency}")
    return 0 if order.status == OrderStatus.Value("ORDER_STATUS_PLACED") else 1


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--command-addr", default="127.0.0.1:50051")
    parser.add_argument("--query-addr", default="127.0.0.1:50052")
    parser.add_argument("--email", default=None, help="customer email (default: a fresh random one)")
    parser.add_argument("--ca-file", default=None, help="PEM CA bundle: use TLS")
    parser.add_argument("--cert-file", default=None, help="client certificate for mutual TLS")
    parser.add_argument("--key-file", default=None, help="client key for mutual TLS")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each call in seconds")
    args = parser.parse_args(argv)

    tls = ClientTLS.from_files(args.ca_file, args.cert_file, args.key_file) if args.ca_file else None
    email = args.email or f"grace.{uuid.uuid4().hex[:8]}@example.com"
    # A token from the environment, never from the command line (it would show in `ps`).
    token = os.environ.get("CQRS_BEARER_TOKEN") or None
    try:
        async with OrdersClient.connect(
            args.command_addr,
            args.query_addr,
            tls=tls,
            bearer_token=token,
            default_timeout=args.timeout,
            retry=RetryPolicy(max_attempts=5, total_timeout=30.0),
        ) as client:
            return await checkout(client, email)
    except grpc.aio.AioRpcError as error:
        print(f"checkout failed: {error.code().name}: {error.details()}", file=sys.stderr)
        for violation in field_violations(error):
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
