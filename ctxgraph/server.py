"""The ctxgraph daemon: the admin socket, one socket per registered agent, and optionally AF_VSOCK.

Writes go through a single group-commit writer (one durable transaction for everything queued), so many
concurrent or pipelined puts cost one fsync.  A put is acknowledged only after its transaction committed.
Reads run on the event loop against a separate WAL reader; on one connection a read waits for that
connection's earlier writes, so a client always reads its own writes.  Requests on an agent's socket are counted
against its ``max_calls_per_hour`` before they are dispatched (ctxgraph.budget); the admin socket is not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ctxgraph import defaults
from ctxgraph.access import ADMIN, Binding, Identity
from ctxgraph.budget import MAX_CALLS_PER_HOUR, CallBudget, Clock
from ctxgraph.model import Draft, Entry, PutResult, validate_agent, validate_hash, validate_key
from ctxgraph.store import AgentRecord, Store, parse_cursor
from nullbox import notify
from nullbox.wire import (
    READ_CHUNK,
    Connection,
    ErrorCode,
    Params,
    RawObject,
    Reply,
    Request,
    Stream,
    WireError,
    bind_unix,
    bind_vsock,
    encode,
    failure,
    invalid,
    serve_connection,
)

log = logging.getLogger("ctxgraph")

MAX_BATCH_ROWS: Final = 4096
MAX_PUT_BATCH: Final = 1000
MAX_PAGE: Final = 1000
WATCH_QUEUE: Final = 4096
MAX_AGENT_CONNECTIONS: Final = 64
"""Per agent socket: enough for any sane agent, and a bound on what a misbehaving one can hold open."""
MAX_ADMIN_CONNECTIONS: Final = 256
REFUSAL_LINGER: Final = 1.0


@dataclass(frozen=True)
class ServerConfig:
    db: Path = defaults.DB
    socket: Path = defaults.SOCKET
    agents_dir: Path = defaults.AGENTS_DIR
    vsock_port: int | None = None


# ------------------------------------------------------------------------------------------------ group commit


@dataclass
class _Unit:
    drafts: list[Draft]
    done: asyncio.Future[list[PutResult]]


class Committer:
    """Queues drafts and commits whatever has accumulated in one transaction on a dedicated writer thread."""

    def __init__(self, store: Store, on_commit: Callable[[list[Draft], list[PutResult]], None]) -> None:
        self._store = store
        self._on_commit = on_commit
        self._queue: asyncio.Queue[_Unit | None] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxgraph-writer")
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ctxgraph-committer")

    def submit(self, drafts: list[Draft]) -> asyncio.Future[list[PutResult]]:
        """Enqueue now (so puts on a connection commit in request order); the future resolves once durable."""
        if self.closed:
            raise WireError(ErrorCode.UNAVAILABLE, "ctxgraph is shutting down; retry after it restarts")
        future: asyncio.Future[list[PutResult]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Unit(drafts, future))
        return future

    async def close(self) -> None:
        """Refuse new writes, commit everything already queued, stop the writer thread."""
        self.closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            units = [first]
            rows = len(first.drafts)
            while rows < MAX_BATCH_ROWS and not self._queue.empty():
                unit = self._queue.get_nowait()
                if unit is None:
                    stopping = True
                    break
                units.append(unit)
                rows += len(unit.drafts)
            drafts = [d for u in units for d in u.drafts]
            try:
                results = await loop.run_in_executor(self._thread, self._store.insert, drafts)
            except Exception as exc:
                log.exception("commit of %d entries failed", len(drafts))
                error = WireError(ErrorCode.INTERNAL, f"the write could not be committed ({type(exc).__name__})")
                for unit in units:
                    if not unit.done.done():
                        unit.done.set_exception(error)
                continue
            offset = 0
            for unit in units:
                mine = results[offset : offset + len(unit.drafts)]
                offset += len(unit.drafts)
                if not unit.done.done():
                    unit.done.set_result(mine)
            self._on_commit(drafts, results)


# ------------------------------------------------------------------------------------------------------ watch


@dataclass(eq=False)
class _Watcher:
    prefix: str
    binding: Binding
    queue: asyncio.Queue[Entry | None] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE))
    overflowed: bool = False


class Watchers:
    """Live subscribers by key prefix; a subscriber that falls too far behind is told so and dropped."""

    def __init__(self) -> None:
        self._watchers: set[_Watcher] = set()

    def __len__(self) -> int:
        return len(self._watchers)

    def publish(self, drafts: list[Draft], results: list[PutResult]) -> None:
        """Hand each newly created entry to the watchers whose prefix (and read rights) cover it."""
        if not self._watchers:
            return  # the common case: nobody is watching, so no entry is built
        entries = [
            Entry(result.hash, draft.agent, draft.key, draft.canonical.decode(), result.created_ns)
            for draft, result in zip(drafts, results, strict=True)
            if result.created
        ]
        for watcher in list(self._watchers):
            if watcher.overflowed:
                continue
            for entry in entries:
                if entry.key.startswith(watcher.prefix) and watcher.binding.identity.may_read(entry.key):
                    try:
                        watcher.queue.put_nowait(entry)
                    except asyncio.QueueFull:
                        watcher.overflowed = True
                        break

    def subscribe(self, prefix: str, binding: Binding) -> Stream:
        watcher = _Watcher(prefix, binding)
        self._watchers.add(watcher)

        async def events() -> AsyncIterator[dict[str, Any] | RawObject]:
            yield {"type": "subscribed", "prefix": prefix}
            while True:
                if watcher.overflowed and watcher.queue.empty():
                    raise WireError(
                        ErrorCode.UNAVAILABLE,
                        f"watch fell more than {WATCH_QUEUE} entries behind; query to catch up, then watch again",
                    )
                entry = await watcher.queue.get()
                if entry is None:
                    return
                yield RawObject(f'{{"type":"entry","entry":{entry.to_wire()}}}')

        return Stream(events(), on_close=lambda: self._watchers.discard(watcher))

    def close_all(self) -> None:
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):
                watcher.queue.put_nowait(None)


# ----------------------------------------------------------------------------------------------------- server


@dataclass
class _AgentEndpoint:
    binding: Binding
    path: Path
    cid: int | None
    server: asyncio.AbstractServer | None = None
    connections: set[asyncio.Task[Any]] = field(default_factory=set)


OpHandler = Callable[[Request, Connection[Binding]], Awaitable[Reply]]


class CtxGraphServer:
    def __init__(self, config: ServerConfig, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock  # for the call budgets; tests pass one they can move forward
        self._budgets: dict[str, CallBudget] = {}
        self.store: Store | None = None
        self.watchers = Watchers()
        self._committer: Committer | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._vsock: asyncio.AbstractServer | None = None
        self._agents: dict[str, _AgentEndpoint] = {}
        self._connections: set[asyncio.Task[Any]] = set()
        self._started = time.monotonic()
        self._registry_lock = asyncio.Lock()  # register/unregister yield mid-way; they must not interleave
        self._ops: dict[str, OpHandler] = {
            "put": self._put,
            "put_batch": self._put_batch,
            "get": self._get,
            "query": self._query,
            "history": self._history,
            "by_agent": self._by_agent,
            "watch": self._watch,
            "stats": self._stats,
            "register_agent": self._register_agent,
            "unregister_agent": self._unregister_agent,
            "list_agents": self._list_agents,
        }

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        admin_sock = bind_unix(self.config.socket, 0o600)  # first: a second instance fails before touching the DB
        try:
            self.store = await asyncio.to_thread(Store, self.config.db)
        except BaseException:
            admin_sock.close()
            self.config.socket.unlink(missing_ok=True)
            raise
        self._committer = Committer(self.store, self.watchers.publish)
        self._committer.start()
        _traversable_dir(self.config.agents_dir)
        self._admin = await asyncio.start_unix_server(
            lambda r, w: self._serve(r, w, Binding(ADMIN), self._connections), sock=admin_sock
        )
        for record in self.store.agents():
            try:
                await self._open_agent(record)
            except OSError as exc:
                log.error("agent %s: cannot open its socket: %s", record.name, exc)
        if self.config.vsock_port is not None:
            await self._open_vsock(self.config.vsock_port)
        log.info(
            "serving %s (admin %s, %d agent sockets in %s)",
            self.config.db,
            self.config.socket,
            len(self._agents),
            self.config.agents_dir,
        )

    async def _open_vsock(self, port: int) -> None:
        try:
            sock = bind_vsock(port)
        except OSError as exc:
            log.warning("vsock port %d unavailable (%s); agents reach ctxgraph through their unix sockets", port, exc)
            return
        self._vsock = await asyncio.start_server(self._serve_vsock, sock=sock)
        log.info("listening on vsock port %d", port)

    async def stop(self) -> None:
        """Stop accepting, commit every write already received, end streams, close the database."""
        servers = [s for s in (self._admin, self._vsock, *(a.server for a in self._agents.values())) if s]
        for server in servers:
            server.close()
        if self._committer is not None:
            await self._committer.close()
        self.watchers.close_all()
        tasks = set(self._connections)
        for endpoint in self._agents.values():
            tasks |= endpoint.connections
        # Give connections a moment to write the replies of the writes just committed.
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.config.socket.unlink(missing_ok=True)
        for endpoint in self._agents.values():
            endpoint.path.unlink(missing_ok=True)
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        await self.start()
        await notify.ready_until_signalled()
        log.info("signal received; shutting down")
        await self.stop()

    # -------------------------------------------------------------------------------------------- plumbing

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, binding: Binding, registry: set[Any]
    ) -> None:
        limit = MAX_ADMIN_CONNECTIONS if binding.identity.is_admin else MAX_AGENT_CONNECTIONS
        if len(registry) >= limit:
            await _refuse(
                reader, writer, WireError(ErrorCode.UNAVAILABLE, f"too many connections to this socket ({limit})")
            )
            return
        task = asyncio.current_task()
        registry.add(task)
        try:
            await serve_connection(reader, writer, self._handle, binding)
        finally:
            registry.discard(task)

    async def _serve_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await self.serve_vsock_peer(reader, writer, peer[0] if isinstance(peer, tuple) else None)

    async def serve_vsock_peer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int | None
    ) -> None:
        """Serve a vsock connection as the agent registered for the peer's CID, or refuse it."""
        endpoint = next((e for e in self._agents.values() if cid is not None and e.cid == cid), None)
        if endpoint is None:
            await _refuse(reader, writer, WireError(ErrorCode.FORBIDDEN, f"no agent is registered for vsock CID {cid}"))
            return
        await self._serve(reader, writer, endpoint.binding, endpoint.connections)

    async def _open_agent(self, record: AgentRecord) -> _AgentEndpoint:
        path = self.config.agents_dir / f"{record.name}.sock"
        budget = self._budget(record.name, record.max_calls_per_hour)
        endpoint = _AgentEndpoint(Binding(Identity(record.name, record.read, record.write), budget), path, record.cid)
        sock = bind_unix(path, 0o600, uid=record.uid, gid=record.gid)
        endpoint.server = await asyncio.start_unix_server(
            lambda r, w: self._serve(r, w, endpoint.binding, endpoint.connections), sock=sock
        )
        self._agents[record.name] = endpoint
        return endpoint

    def _budget(self, name: str, limit: int) -> CallBudget:
        """The agent's budget, with ``limit``; kept by name so the calls counted survive re-registration."""
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = CallBudget(limit, self._clock)
        budget.limit = limit
        return budget

    async def _handle(self, request: Request, conn: Connection[Binding]) -> Reply:
        budget = conn.context.budget
        if budget is not None:
            wait = budget.take()
            if wait is not None:
                raise budget.refusal(conn.context.identity.agent or "?", wait)
        op = self._ops.get(request.op)
        if op is None:
            raise invalid(f"unknown op {request.op!r}; known: {', '.join(sorted(self._ops))}")
        return await op(request, conn)

    @staticmethod
    async def _after_own_writes(conn: Connection[Binding]) -> None:
        last: asyncio.Future[Any] | None = conn.state.get("last_write")
        if last is not None and not last.done():
            await asyncio.wait([last])

    def _submit(self, conn: Connection[Binding], drafts: list[Draft]) -> asyncio.Future[list[PutResult]]:
        assert self._committer is not None
        future = self._committer.submit(drafts)
        conn.state["last_write"] = future
        return future

    def _store(self) -> Store:
        assert self.store is not None
        return self.store

    # ------------------------------------------------------------------------------------------------- ops

    def _draft(self, identity: Identity, item: dict[str, Any], where: str = "") -> Draft:
        try:
            unknown = sorted(set(item) - {"agent", "key", "value"})
            if unknown:
                raise invalid(f"unknown field {unknown[0]!r}")
            if "value" not in item:
                raise invalid("'value' is required")
            agent = item.get("agent")
            writer = identity.writer(None if agent is None else validate_agent(agent))
            key = validate_key(item.get("key"))
            identity.check_write(key)
            return Draft.make(writer, key, item["value"])
        except WireError as exc:
            if not where:
                raise
            raise WireError(exc.code, f"{where}: {exc.message}") from None

    async def _put(self, request: Request, conn: Connection[Binding]) -> Reply:
        draft = self._draft(conn.context.identity, request.params)
        (result,) = await self._submit(conn, [draft])
        return {"hash": result.hash, "created": result.created}

    async def _put_batch(self, request: Request, conn: Connection[Binding]) -> Reply:
        items = Params(request, {"items"}).raw("items")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_PUT_BATCH:
            raise invalid(f"'items' must be a list of 1 to {MAX_PUT_BATCH} objects")
        drafts = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise invalid(f"items[{index}] must be an object with 'key' and 'value'")
            drafts.append(self._draft(conn.context.identity, item, f"items[{index}]"))
        results = await self._submit(conn, drafts)
        return {"results": [{"hash": r.hash, "created": r.created} for r in results]}

    async def _get(self, request: Request, conn: Connection[Binding]) -> Reply:
        digest = validate_hash(Params(request, {"hash"}).raw("hash"))
        await self._after_own_writes(conn)
        entry = self._store().get(digest)
        # Outside an agent's read prefixes an entry does not exist for it: "forbidden" would confirm a guess.
        if entry is None or not conn.context.identity.may_read(entry.key):
            raise WireError(ErrorCode.NOT_FOUND, f"no entry with hash {digest}")
        return RawObject(f'{{"entry":{entry.to_wire()}}}')

    @staticmethod
    def _paging(params: Params) -> tuple[int, str | None]:
        limit = params.integer("limit", 100, minimum=1, maximum=MAX_PAGE)
        after = params.optional_string("after")
        try:
            parse_cursor(after)
        except ValueError:
            raise invalid("'after' must be a cursor returned as 'next' by an earlier page") from None
        return limit, after

    async def _query(self, request: Request, conn: Connection[Binding]) -> Reply:
        params = Params(request, {"prefix", "limit", "after"})
        prefix = validate_key(params.string("prefix", ""), "prefix", allow_empty=True)
        limit, after = self._paging(params)
        conn.context.identity.check_read(prefix, "prefix")
        await self._after_own_writes(conn)
        return RawObject(self._store().query(prefix, limit, after).to_wire())

    async def _history(self, request: Request, conn: Connection[Binding]) -> Reply:
        params = Params(request, {"key", "limit", "after"})
        key = validate_key(params.raw("key"))
        limit, after = self._paging(params)
        conn.context.identity.check_read(key, "key")
        await self._after_own_writes(conn)
        return RawObject(self._store().history(key, limit, after).to_wire())

    async def _by_agent(self, request: Request, conn: Connection[Binding]) -> Reply:
        params = Params(request, {"agent", "limit", "after"})
        agent = validate_agent(params.raw("agent"))
        limit, after = self._paging(params)
        await self._after_own_writes(conn)
        return RawObject(self._store().by_agent(agent, limit, after, conn.context.identity.read).to_wire())

    async def _watch(self, request: Request, conn: Connection[Binding]) -> Reply:
        prefix = validate_key(Params(request, {"prefix"}).string("prefix", ""), "prefix", allow_empty=True)
        conn.context.identity.check_read(prefix, "prefix")
        return self.watchers.subscribe(prefix, conn.context)

    async def _stats(self, request: Request, conn: Connection[Binding]) -> Reply:
        Params(request, set())
        stats = self._store().stats()
        stats.update(
            agents=len(self._agents),
            watchers=len(self.watchers),
            connections=len(self._connections) + sum(len(a.connections) for a in self._agents.values()),
            uptime_s=round(time.monotonic() - self._started, 3),
        )
        return stats

    async def _register_agent(self, request: Request, conn: Connection[Binding]) -> Reply:
        conn.context.identity.check_admin(request.op)
        async with self._registry_lock:
            return await self._register_agent_locked(request)

    async def _register_agent_locked(self, request: Request) -> Reply:
        params = Params(request, {"agent", "read", "write", "uid", "gid", "cid", "max_calls_per_hour"})
        name = validate_agent(params.raw("agent"))
        read = _prefixes(params, "read")
        write = _prefixes(params, "write")
        uid = params.optional_integer("uid", minimum=0, maximum=2**32 - 2)
        gid = params.optional_integer("gid", minimum=0, maximum=2**32 - 2)
        cid = params.optional_integer("cid", minimum=3, maximum=2**32 - 2)
        calls = params.integer("max_calls_per_hour", 0, minimum=0, maximum=MAX_CALLS_PER_HOUR)
        if cid is not None:
            holder = next((n for n, e in self._agents.items() if e.cid == cid and n != name), None)
            if holder is not None:
                raise WireError(ErrorCode.CONFLICT, f"vsock CID {cid} is already registered to agent '{holder}'")
        existing = self._agents.get(name)
        record = AgentRecord(name, read, write, uid, gid, cid, time.time_ns(), calls)
        if existing is None:
            try:
                endpoint = await self._open_agent(record)
            except OSError as exc:
                raise WireError(ErrorCode.UNAVAILABLE, f"cannot create the socket for agent '{name}': {exc}") from None
        else:
            endpoint = existing
            endpoint.binding.identity = Identity(name, read, write)
            endpoint.binding.budget = self._budget(name, calls)
            endpoint.cid = cid
            if uid is not None or gid is not None:
                try:
                    os.chown(endpoint.path, -1 if uid is None else uid, -1 if gid is None else gid)
                except OSError as exc:
                    raise WireError(ErrorCode.UNAVAILABLE, f"cannot hand agent '{name}' its socket: {exc}") from None
        await asyncio.to_thread(self._store().save_agent, record)
        log.info("agent %s registered (socket %s)", name, endpoint.path)
        return {"agent": name, "socket": str(endpoint.path), "created": existing is None}

    async def _unregister_agent(self, request: Request, conn: Connection[Binding]) -> Reply:
        conn.context.identity.check_admin(request.op)
        name = validate_agent(Params(request, {"agent"}).raw("agent"))
        async with self._registry_lock:
            return await self._unregister_agent_locked(name)

    async def _unregister_agent_locked(self, name: str) -> Reply:
        endpoint = self._agents.pop(name, None)
        if endpoint is None:
            raise WireError(ErrorCode.NOT_FOUND, f"agent '{name}' is not registered")
        if endpoint.server is not None:
            endpoint.server.close()
        endpoint.path.unlink(missing_ok=True)
        for task in list(endpoint.connections):
            task.cancel()
        await asyncio.to_thread(self._store().delete_agent, name)
        for idle in [n for n, b in self._budgets.items() if n not in self._agents and b.used() == 0]:
            del self._budgets[idle]  # budgets with calls in the last hour are kept for a re-registration
        log.info("agent %s unregistered; its entries stay", name)
        return {"agent": name}

    async def _list_agents(self, request: Request, conn: Connection[Binding]) -> Reply:
        conn.context.identity.check_admin(request.op)
        Params(request, set())
        agents = []
        for record in self._store().agents():
            budget = self._budgets.get(record.name)
            agents.append({**record.to_json(), "calls_last_hour": 0 if budget is None else budget.used()})
        return {"agents": agents}


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: WireError) -> None:
    """Turn a connection away with one error line.

    What the client already sent is read and dropped for a moment before closing: closing a socket with unread
    input resets the connection, and the reset can destroy the error line before the client reads it.
    """
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        writer.write(encode(failure(None, error)))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(REFUSAL_LINGER):
            while await reader.read(READ_CHUNK):
                pass
    writer.close()


def _prefixes(params: Params, name: str) -> tuple[str, ...] | None:
    values = params.string_list(name)
    if values is None:
        return None
    return tuple(validate_key(v, f"{name}[{i}]", allow_empty=True) for i, v in enumerate(values))


def _traversable_dir(path: Path) -> None:
    """Make the agent sockets' directory (and its parent, when we create it) 0711: an agent's VMM, running as the
    agent's own uid, must reach its socket by path, but nobody may list the others.  mkdir's mode alone would be
    cut to 0700 by the service's umask (077)."""
    made_parent = not path.parent.exists()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o711)
    if made_parent:
        path.parent.chmod(0o711)
