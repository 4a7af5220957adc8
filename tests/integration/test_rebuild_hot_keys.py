"""Hot keys in `cqrs rebuild`'s comparison, against the real servers: a derived document (a customer's order
statistics, the customer fields on orders, the sales report) whose two sides are each right for their own sources
is in flight; one that is wrong on either side stays a difference.

The live read model moves on after the generation was built (an order placed, a customer renamed, projected by the
real projector): the two sides are then at different points, as a busy system's are whenever the comparison reads
them, and each is consistent with itself.
"""

from __future__ import annotations

import uuid

from command_service.domain import commands as cmd
from command_service.domain.customer_commands import RenameCustomer
from command_service.handlers import customer_handler, order_handler
from cqrsctl.rebuild import run_rebuild
from cqrsctl.rebuild.hot_keys import held_on_each_side
from cqrsctl.rebuild.model import BOOKKEEPING_FIELDS
from cqrsctl.rebuild.shadow import MISSING_IN_GENERATION, ComparisonResult, Difference, IgnoredFields, ShadowComparer
from cqrsctl.verify.own_sources import DERIVED_CHECKS
from projector.registry import SALES_REPORT, VIEWS
from tests.integration.test_cutover import reflected
from tests.integration.test_rebuild import live, rebuild_config
from tests.integration.test_relay import ADDRESS, ctx
from tests.integration.test_verify import System
from tests.support import eventually

__all__ = ["live"]

COLLECTIONS = ("orders", "customers", "sales_daily")


def test_every_derived_view_has_its_hot_key_check() -> None:
    assert set(DERIVED_CHECKS) == {view.name for view in VIEWS}


async def _customer_named(system: System, name: str) -> str:
    doc = await system.db["customers"].find_one({"name": name}, {"_id": 1})
    assert doc is not None, f"no customer named {name!r}"
    return str(doc["_id"])


async def _compare(system: System, generation: str, ignored: IgnoredFields) -> list[Difference]:
    compared = ComparisonResult()
    comparer = ShadowComparer(system.db, system.db.client[generation], ignored, 100)
    for collection in COLLECTIONS:
        await comparer.full(collection, compared)
    return compared.differences


def _keys(differences: list[Difference]) -> set[tuple[str, str]]:
    return {(d.collection, d.doc_id) for d in differences}


async def test_hot_keys_right_on_each_side_are_in_flight_and_a_wrong_side_stays_a_difference(live: System) -> None:
    built = await run_rebuild(rebuild_config(live))
    assert built.equal
    buyer, renamed = await _customer_named(live, "Customer 0"), await _customer_named(live, "Customer 2")
    orders = order_handler(live.store)
    order = str(uuid.uuid4())
    await orders.handle(cmd.CreateOrder(order, buyer, "EUR", ADDRESS), ctx())
    await orders.handle(cmd.AddOrderItem(order, "SKU-9", "Item 9", 2, 400), ctx())
    await orders.handle(cmd.PlaceOrder(order), ctx())
    await customer_handler(live.store).handle(RenameCustomer(renamed, "Someone else"), ctx())
    await eventually(lambda: reflected(live, live.config.mongo_database), what="the live side to project them")

    ignored = IgnoredFields(BOOKKEEPING_FIELDS, COLLECTIONS)
    differences = await _compare(live, built.database, ignored)
    renamed_orders = {str(d["_id"]) async for d in live.db["orders"].find({"customer_id": renamed}, {"_id": 1})}
    reports = {d.doc_id for d in differences if d.collection == "sales_daily"}
    assert len(reports) == 1 and len(renamed_orders) >= 1
    by_key: dict[tuple[str, str], Difference] = {(d.collection, d.doc_id): d for d in differences}
    assert by_key[("orders", order)].kind == MISSING_IN_GENERATION
    assert {f.path.partition(".")[0] for f in by_key[("customers", buyer)].fields} == {"order_stats"}
    in_views = {("customers", buyer), *(("sales_daily", r) for r in reports), *(("orders", o) for o in renamed_orders)}
    assert in_views < _keys(differences), "the live side's move left these documents differing"

    left, in_flight = await held_on_each_side(differences, live.db, live.db.client[built.database], ignored)
    # The new order and the renamed customer's own fields are the projections' business: they stay.
    assert _keys(left) == {("orders", order), ("customers", renamed)}
    assert in_flight == len(in_views)

    # A report that lacks a fact its order's checkpoint covers lost it, even the day's latest one.
    report = next(iter(reports))
    generation = live.db.client[built.database]
    before_the_placement = await generation["sales_daily"].find_one({"_id": report})
    assert before_the_placement is not None
    await live.db["sales_daily"].replace_one({"_id": report}, before_the_placement)
    check_report = DERIVED_CHECKS[SALES_REPORT.name].check
    assert await check_report(live.db, [report], ignored.ignores) == set()
    # The same report read while the batch that counts that fact is in flight (the order written, its checkpoint
    # still before the placement, v3) is right for its sources.
    await live.db["checkpoints"].update_one({"_id": order}, {"$set": {"version": 2}})
    assert await check_report(live.db, [report], ignored.ignores) == {report}

    # A side wrong for its own sources stays a difference: the live statistics, the generation's report, the
    # customer name copied onto one live order.
    wrong_order = sorted(renamed_orders)[0]
    await live.db["customers"].update_one({"_id": buyer}, {"$inc": {"order_stats.placed_orders": 1}})
    await generation["sales_daily"].update_one({"_id": report}, {"$inc": {"placed_revenue_minor": 1}})
    await live.db["orders"].update_one({"_id": wrong_order}, {"$set": {"customer_name": "Mallory"}})
    again = await _compare(live, built.database, ignored)
    left, in_flight = await held_on_each_side(again, live.db, generation, ignored, seconds=0.5, pause=0.01)
    wrong = {("customers", buyer), ("sales_daily", report), ("orders", wrong_order)}
    assert _keys(left) == {("orders", order), ("customers", renamed)} | wrong
    assert in_flight == len(in_views) - len(wrong)
