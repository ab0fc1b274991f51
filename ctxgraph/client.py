"""Clients for ctxgraph, used by nullctl, by the tests and by agents written in Python.

Both speak the wire protocol of :mod:`nullbox.wire`; an agent in any other language needs only a socket and a
JSON library (docs/ctxgraph.md).  Failures raise :class:`nullbox.wire.WireError` with the server's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from ctxgraph import defaults
from nullbox.wire import Address, AsyncClient, Client, JSONObject

DEFAULT_ADDRESS = f"unix:{defaults.SOCKET}"


def _without_none(**params: Any) -> JSONObject:
    return {k: v for k, v in params.items() if v is not None}


def _put(key: str, value: Any, agent: str | None) -> JSONObject:
    return _without_none(key=key, value=value, agent=agent)


def _page(limit: int | None, after: str | None, **params: Any) -> JSONObject:
    return _without_none(limit=limit, after=after, **params)


def _registration(agent: str, read: list[str] | None, write: list[str] | None, **numbers: int | None) -> JSONObject:
    """``register_agent``'s parameters; ``max_calls_per_hour`` (0 or absent: no limit) is among ``numbers``."""
    return _without_none(agent=agent, read=read, write=write, **numbers)


class CtxClient:
    """Blocking client.  ``CtxClient("unix:/run/nullbox/ctxgraph.sock")``, or an agent's own socket."""

    def __init__(self, address: Address | str = DEFAULT_ADDRESS, *, timeout: float | None = 30.0) -> None:
        self.rpc = Client(address, timeout=timeout)

    def __enter__(self) -> CtxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rpc.close()

    def put(self, key: str, value: Any, *, agent: str | None = None) -> JSONObject:
        return self.rpc.call("put", **_put(key, value, agent))

    def put_batch(self, items: list[JSONObject]) -> list[JSONObject]:
        results: list[JSONObject] = self.rpc.call("put_batch", items=items)["results"]
        return results

    def get(self, digest: str) -> JSONObject:
        entry: JSONObject = self.rpc.call("get", hash=digest)["entry"]
        return entry

    def query(self, prefix: str = "", *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return self.rpc.call("query", **_page(limit, after, prefix=prefix))

    def query_all(self, prefix: str = "", *, page: int = 500) -> Iterator[JSONObject]:
        """Every entry under ``prefix``, newest first, following ``next`` cursors."""
        after: str | None = None
        while True:
            result = self.query(prefix, limit=page, after=after)
            yield from result["entries"]
            after = result["next"]
            if after is None:
                return

    def history(self, key: str, *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return self.rpc.call("history", **_page(limit, after, key=key))

    def by_agent(self, agent: str, *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return self.rpc.call("by_agent", **_page(limit, after, agent=agent))

    def watch(self, prefix: str = "") -> Iterator[JSONObject]:
        """New entries under ``prefix`` as they are committed; the first event confirms the subscription."""
        return self.rpc.stream("watch", prefix=prefix)

    def stats(self) -> JSONObject:
        return self.rpc.call("stats")

    def register_agent(
        self,
        agent: str,
        *,
        read: list[str] | None = None,
        write: list[str] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        cid: int | None = None,
        max_calls_per_hour: int | None = None,
    ) -> JSONObject:
        params = _registration(agent, read, write, uid=uid, gid=gid, cid=cid, max_calls_per_hour=max_calls_per_hour)
        return self.rpc.call("register_agent", **params)

    def unregister_agent(self, agent: str) -> JSONObject:
        return self.rpc.call("unregister_agent", agent=agent)

    def list_agents(self) -> list[JSONObject]:
        agents: list[JSONObject] = self.rpc.call("list_agents")["agents"]
        return agents


class AsyncCtxClient:
    """asyncio client; many calls may be outstanding at once on one connection (they are pipelined)."""

    def __init__(self, rpc: AsyncClient) -> None:
        self.rpc = rpc

    @classmethod
    async def connect(cls, address: Address | str = DEFAULT_ADDRESS) -> AsyncCtxClient:
        return cls(await AsyncClient.connect(address))

    async def __aenter__(self) -> AsyncCtxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.rpc.close()

    async def put(self, key: str, value: Any, *, agent: str | None = None) -> JSONObject:
        return await self.rpc.call("put", **_put(key, value, agent))

    async def put_batch(self, items: list[JSONObject]) -> list[JSONObject]:
        results: list[JSONObject] = (await self.rpc.call("put_batch", items=items))["results"]
        return results

    async def get(self, digest: str) -> JSONObject:
        entry: JSONObject = (await self.rpc.call("get", hash=digest))["entry"]
        return entry

    async def query(self, prefix: str = "", *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return await self.rpc.call("query", **_page(limit, after, prefix=prefix))

    async def history(self, key: str, *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return await self.rpc.call("history", **_page(limit, after, key=key))

    async def by_agent(self, agent: str, *, limit: int | None = None, after: str | None = None) -> JSONObject:
        return await self.rpc.call("by_agent", **_page(limit, after, agent=agent))

    def watch(self, prefix: str = "") -> AsyncIterator[JSONObject]:
        return self.rpc.stream("watch", prefix=prefix)

    async def stats(self) -> JSONObject:
        return await self.rpc.call("stats")

    async def register_agent(
        self,
        agent: str,
        *,
        read: list[str] | None = None,
        write: list[str] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        cid: int | None = None,
        max_calls_per_hour: int | None = None,
    ) -> JSONObject:
        params = _registration(agent, read, write, uid=uid, gid=gid, cid=cid, max_calls_per_hour=max_calls_per_hour)
        return await self.rpc.call("register_agent", **params)

    async def unregister_agent(self, agent: str) -> JSONObject:
        return await self.rpc.call("unregister_agent", agent=agent)
