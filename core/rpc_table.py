"""A gRPC servicer written as a table: each unary RPC is one class attribute, an `Rpc` entry, and one runner per
servicer runs them all.

An entry is a descriptor. On the class, `OrderCommandServicer.CreateOrder` is the entry itself (what tests and
tools inspect); on an instance, `servicer.CreateOrder` is the async method grpcio calls, which hands the request to
`servicer.runner.run(name, entry, request, context)`. Because the generated servicer base declares every RPC,
mypy checks each entry's request and response types against the proto and refuses to instantiate a servicer that
lacks one; `rpc_entries` lists a servicer class's entries, so a test can hold the tables to the proto descriptors.
Streaming RPCs stay ordinary `async def` methods of the servicer.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Generic, Protocol, Self, TypeVar, cast, overload

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
_Req_contra = TypeVar("_Req_contra", contravariant=True)
_Resp_co = TypeVar("_Resp_co", covariant=True)


class UnaryMethod(Protocol[_Req_contra, _Resp_co]):
    """A servicer's unary method as grpcio calls it (parameters named as in the generated servicer, so that mypy
    checks an entry against the generated method it stands for)."""

    def __call__(self, request: _Req_contra, context: Context) -> Awaitable[_Resp_co]: ...


class Runner(Protocol):
    """Runs one RPC of a table: the entry says what is specific to it, the runner does everything shared."""

    async def run(self, method: str, entry: Any, request: Any, context: Context) -> Any: ...


class TableServicer(Protocol):
    """A servicer whose RPCs are `Rpc` entries: it only has to hold their runner."""

    @property
    def runner(self) -> Runner: ...


class Rpc(Generic[Req, Resp]):
    """One unary RPC of a table servicer, named by the attribute it is assigned to; runners subclass it with what
    they need to know about an RPC."""

    def __init__(self, request: type[Req]) -> None:
        self.request = request
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Self: ...

    @overload
    def __get__(self, instance: TableServicer, owner: type) -> UnaryMethod[Req, Resp]: ...

    def __get__(self, instance: TableServicer | None, owner: type) -> Self | UnaryMethod[Req, Resp]:
        if instance is None:
            return self
        runner = instance.runner

        async def call(request: Req, context: Context) -> Resp:
            return cast(Resp, await runner.run(self.name, self, request, context))

        call.__name__ = call.__qualname__ = self.name
        return call


def rpc_entries(servicer: type) -> dict[str, Rpc[Any, Any]]:
    """The table of a servicer class: RPC name -> entry, inherited entries included."""
    return {
        name: value
        for klass in reversed(servicer.__mro__)
        for name, value in vars(klass).items()
        if isinstance(value, Rpc)
    }
