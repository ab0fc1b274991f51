"""The ctxgraph daemon as a real process: sockets, identity, ACLs, watch, restarts, shutdown, vsock identity."""

from __future__ import annotations

import asyncio
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ctxgraph.model import hash_hex
from ctxgraph.process import ServerProcess
from ctxgraph.server import MAX_AGENT_CONNECTIONS, CtxGraphServer, ServerConfig
from nullbox.wire import Client, ErrorCode, WireError, decode_json


def _error(call: Any, *args: Any, **kwargs: Any) -> WireError:
    with pytest.raises(WireError) as exc:
        call(*args, **kwargs)
    return exc.value


def test_sockets_are_private(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("bot", uid=65534, gid=65534)
    assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
    agent_socket = server.agents_dir / "bot.sock"
    st = agent_socket.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stat.S_IMODE(server.db.stat().st_mode) & 0o077 == 0
    # an agent's VMM runs as the agent's uid: it can reach its own socket by path, but list nobody's
    assert stat.S_IMODE(server.agents_dir.stat().st_mode) == 0o711


def test_agent_identity_is_the_socket(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("alice")
        admin.register_agent("bob")
    with server.client("alice") as alice:
        mine = alice.put("k", "v")
        assert alice.get(mine["hash"])["agent"] == "alice"
        assert alice.put("k", "v", agent="alice")["hash"] == mine["hash"]
        spoof = _error(alice.put, "k", "v", agent="bob")
        assert spoof.code == ErrorCode.FORBIDDEN
        assert "alice" in spoof.message and "bob" in spoof.message
        for op in ("register_agent", "unregister_agent", "list_agents"):
            denied = _error(alice.rpc.call, op, agent="alice") if op != "list_agents" else _error(alice.rpc.call, op)
            assert denied.code == ErrorCode.FORBIDDEN, op
    with server.client() as admin:
        assert admin.by_agent("bob")["entries"] == []
        on_behalf = admin.put("k", "v", agent="bob")
        assert admin.get(on_behalf["hash"])["agent"] == "bob"
        assert admin.get(admin.put("k", "v")["hash"])["agent"] == "operator"


def test_read_and_write_prefixes(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("scoped", read=["shared/", "notes/"], write=["notes/"])
        secret = admin.put("private/plan", "do not read")
        shared = admin.put("shared/fact", 42)
        admin.put("shared/other", 43, agent="scoped")
    with server.client("scoped") as agent:
        assert agent.put("notes/mine", 1)["created"] is True
        assert _error(agent.put, "shared/x", 1).code == ErrorCode.FORBIDDEN
        assert _error(agent.query, "").code == ErrorCode.FORBIDDEN
        assert _error(agent.query, "private/").code == ErrorCode.FORBIDDEN
        assert _error(agent.history, "private/plan").code == ErrorCode.FORBIDDEN
        assert _error(agent.rpc.call, "watch", prefix="priv").code == ErrorCode.FORBIDDEN
        # Outside its read prefixes an entry does not exist for the agent, so a guess cannot be confirmed.
        assert _error(agent.get, secret["hash"]).code == ErrorCode.NOT_FOUND
        assert agent.get(shared["hash"])["value"] == 42
        assert [e["key"] for e in agent.query("shared/")["entries"]] == ["shared/other", "shared/fact"]
        assert [e["key"] for e in agent.by_agent("operator")["entries"]] == ["shared/fact"]
        assert agent.history("notes/mine")["entries"][0]["value"] == 1


def test_reregistering_changes_rights_of_live_connections(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("a", write=["x/"])
        with server.client("a") as agent:
            assert _error(agent.put, "y/1", 1).code == ErrorCode.FORBIDDEN
            assert admin.register_agent("a", write=["y/"])["created"] is False
            assert agent.put("y/1", 1)["created"] is True
            assert _error(agent.put, "x/1", 1).code == ErrorCode.FORBIDDEN


def test_unregister_closes_the_agent_socket_and_keeps_entries(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("gone")
        agent = server.client("gone")
        written = agent.put("k", "v")
        assert admin.unregister_agent("gone") == {"agent": "gone"}
        assert not (server.agents_dir / "gone.sock").exists()
        with pytest.raises((WireError, OSError)):
            agent.put("k", "again")
        agent.close()
        assert admin.get(written["hash"])["agent"] == "gone"
        assert _error(admin.unregister_agent, "gone").code == ErrorCode.NOT_FOUND
        assert admin.list_agents() == []


def test_vsock_cid_conflicts(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("one", cid=10)
        clash = _error(admin.register_agent, "two", cid=10)
        assert clash.code == ErrorCode.CONFLICT and "'one'" in clash.message
        assert admin.register_agent("one", cid=10)["created"] is False
        assert _error(admin.register_agent, "three", cid=2).code == ErrorCode.INVALID_REQUEST


def test_watch_delivers_new_entries_live(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("reader", read=["feed/"])
    events: list[dict[str, Any]] = []
    scoped_events: list[dict[str, Any]] = []
    watcher = server.client()
    stream = watcher.watch("feed/")
    scoped = server.client("reader")
    scoped_stream = scoped.watch("feed/")
    assert next(stream) == {"type": "subscribed", "prefix": "feed/"}
    assert next(scoped_stream)["type"] == "subscribed"

    def collect(source: Any, sink: list[dict[str, Any]], count: int) -> None:
        for _ in range(count):
            sink.append(next(source))

    threads = [
        threading.Thread(target=collect, args=(stream, events, 3)),
        threading.Thread(target=collect, args=(scoped_stream, scoped_events, 3)),
    ]
    for thread in threads:
        thread.start()
    with server.client() as writer:
        first = writer.put("feed/1", 1)
        writer.put("other/1", 1)  # not under the prefix
        writer.put("feed/1", 1)  # a duplicate is not a new entry
        writer.put_batch([{"key": "feed/2", "value": 2}, {"key": "feed/3", "value": 3}])
    for thread in threads:
        thread.join(timeout=10)
    watcher.close()
    scoped.close()
    assert [e["entry"]["key"] for e in events] == ["feed/1", "feed/2", "feed/3"]
    assert events[0] == {"type": "entry", "entry": writer_entry(server, first["hash"])}
    assert [e["entry"]["key"] for e in scoped_events] == ["feed/1", "feed/2", "feed/3"]
    with server.client() as admin:
        assert admin.stats()["watchers"] == 0  # closed watch connections unsubscribe


def writer_entry(server: ServerProcess, digest: str) -> dict[str, Any]:
    with server.client() as admin:
        return admin.get(digest)


def test_entries_travel_verbatim(server: ServerProcess) -> None:
    """Stored canonical JSON is sent as is; keys with quotes, escapes and non-ASCII survive the round trip."""
    key = 'q/"quoted" \\ \u00e9\u2028\U0001f600'
    value = {"z": [1.5, '\u2028"\\'], "a": {"\U0001f600": None}, "n": 1e21}
    with server.client() as admin:
        digest = admin.put(key, value)["hash"]
        assert digest == hash_hex("operator", key, value)
        assert admin.get(digest)["value"] == value
        (entry,) = admin.query("q/")["entries"]
        assert (entry["key"], entry["value"], entry["hash"]) == (key, value, digest)
        assert admin.history(key)["entries"] == [entry]


def test_pipelined_requests_read_their_own_writes(server: ServerProcess) -> None:
    digest = hash_hex("operator", "pipe/k", {"n": 1})
    with Client(server.address) as rpc:
        replies = rpc.call_many(
            [
                ("put", {"key": "pipe/k", "value": {"n": 1}}),
                ("get", {"hash": digest}),
                ("query", {"prefix": "pipe/"}),
                ("put", {"key": "", "value": 1}),
                ("history", {"key": "pipe/k"}),
            ]
        )
    put, got, query, bad, history = replies
    assert isinstance(put, dict) and put["hash"] == digest
    assert isinstance(got, dict) and got["entry"]["value"] == {"n": 1}
    assert isinstance(query, dict) and len(query["entries"]) == 1
    assert isinstance(bad, WireError) and bad.code == ErrorCode.INVALID_REQUEST
    assert isinstance(history, dict) and history["entries"][0]["hash"] == digest


def test_put_batch_is_validated_as_a_whole(server: ServerProcess) -> None:
    with server.client() as admin:
        bad = _error(admin.put_batch, [{"key": "b/1", "value": 1}, {"key": "b/2", "value": 2**60}])
        assert bad.code == ErrorCode.INVALID_REQUEST and bad.message.startswith("items[1]:")
        unknown = _error(admin.put_batch, [{"key": "b/1", "value": 1, "colour": "red"}])
        assert "items[0]" in unknown.message and "colour" in unknown.message
        assert admin.query("b/")["entries"] == []  # nothing of a refused batch was stored
        results = admin.put_batch([{"key": "b/1", "value": 1}, {"key": "b/1", "value": 1}])
        assert [r["created"] for r in results] == [True, False]
        assert _error(admin.put_batch, []).code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("op", "params", "fragment"),
    [
        ("query", {"prefix": "a", "limit": 0}, "'limit'"),
        ("query", {"prefix": "a", "limit": 1001}, "'limit'"),
        ("query", {"prefix": "a", "limit": True}, "'limit'"),
        ("query", {"prefix": "a", "after": "abc"}, "'after'"),
        ("query", {"prefix": 5}, "'prefix'"),
        ("query", {"prefix": "a", "colour": 1}, "'colour'"),
        ("get", {"hash": "ABC"}, "'hash'"),
        ("get", {}, "'hash'"),
        ("history", {}, "'key'"),
        ("by_agent", {"agent": "no/slash"}, "'agent'"),
        ("put", {"key": "k"}, "'value'"),
        ("put", {"key": "k\u0007", "value": 1}, "control"),
        ("put", {"key": "k", "value": 1, "agent": "bad name"}, "'agent'"),
        ("register_agent", {"agent": "a", "read": "notalist"}, "'read'"),
        ("register_agent", {"agent": "a", "write": ["ok", "\u0000"]}, "write[1]"),
        ("register_agent", {"agent": "a", "uid": -1}, "'uid'"),
        ("frobnicate", {}, "unknown op"),
    ],
)
def test_bad_parameters_name_the_field(server: ServerProcess, op: str, params: dict[str, Any], fragment: str) -> None:
    with server.client() as admin:
        error = _error(admin.rpc.call, op, **params)
        assert error.code == ErrorCode.INVALID_REQUEST
        assert fragment in error.message
        assert admin.stats()["entries"] == 0  # the connection is still usable and nothing was stored


def test_restart_keeps_entries_and_agents(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("keeper", write=["k/"])
        written = admin.put("k/1", {"persist": True}, agent="keeper")
    assert server.stop() == 0
    assert not server.socket.exists()
    server.start()
    with server.client("keeper") as agent:
        assert agent.get(written["hash"])["value"] == {"persist": True}
        assert _error(agent.put, "other/1", 1).code == ErrorCode.FORBIDDEN  # its rights survived too
    with server.client() as admin:
        assert [a["agent"] for a in admin.list_agents()] == ["keeper"]


def test_second_server_on_the_same_socket_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    intruder = subprocess.run(
        [*ServerProcess(tmp_path / "intruder").argv(), "--socket", str(server.socket)],  # the last --socket wins
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert intruder.returncode == 1
    assert "in use by another running server" in intruder.stderr
    assert not (tmp_path / "intruder" / "ctxgraph.db").exists()  # refused before it touched a database
    with server.client() as admin:
        assert admin.stats()["entries"] == 0


def test_unusable_database_is_one_clear_error(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "bad")
    proc.root.mkdir()
    proc.db.write_bytes(b"not a database" * 1000)
    result = subprocess.run(proc.argv(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"{proc.db}: not a usable ctxgraph database" in result.stderr
    assert "Traceback" not in result.stderr
    assert not proc.socket.exists()
    assert proc.db.read_bytes() == b"not a database" * 1000  # nothing stored is touched


def test_vsock_listener_is_optional(tmp_path: Path) -> None:
    """Where AF_VSOCK has no transport (this host) the daemon says so and serves its unix sockets."""
    with ServerProcess(tmp_path / "v", vsock_port=7000) as proc, proc.client() as admin:
        assert admin.stats()["entries"] == 0
        log = proc.log.read_text()
        assert "listening on vsock port 7000" in log or "vsock port 7000 unavailable" in log


async def _vsock_session(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Feed socketpairs to the vsock connection handler as if they came from guest CIDs."""
    server = CtxGraphServer(ServerConfig(tmp_path / "db", tmp_path / "admin.sock", tmp_path / "agents"))
    await server.start()
    try:
        record = await asyncio.to_thread(_admin_call, tmp_path / "admin.sock", "register_agent", agent="guest", cid=42)

        async def session(cid: int, lines: list[bytes]) -> list[dict[str, Any]]:
            ours, theirs = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=theirs)
            serving = asyncio.create_task(server.serve_vsock_peer(reader, writer, cid))
            client_reader, client_writer = await asyncio.open_connection(sock=ours)
            if lines:
                client_writer.write(b"".join(lines))
                await client_writer.drain()
            client_writer.write_eof()
            replies = [decode_json(line) for line in (await client_reader.read()).splitlines()]
            client_writer.close()
            await serving
            return replies

        known = await session(
            42, [b'{"id":1,"op":"put","key":"v/1","value":1}\n', b'{"id":2,"op":"by_agent","agent":"guest"}\n']
        )
        unknown = await session(99, [])  # refused before it can send anything
        return record, known + unknown, {}
    finally:
        await server.stop()


def _admin_call(path: Path, op: str, **params: Any) -> dict[str, Any]:
    with Client(f"unix:{path}") as rpc:
        return rpc.call(op, **params)


def test_vsock_peers_are_identified_by_cid(tmp_path: Path) -> None:
    record, replies, _ = asyncio.run(_vsock_session(tmp_path))
    assert record["created"] is True
    put, by_agent, refused = replies
    assert put["ok"] is True and put["id"] == 1
    assert by_agent["entries"][0]["agent"] == "guest"
    assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
    assert "CID 99" in refused["error"]["message"]


def test_large_pipelined_batch_completes(server: ServerProcess) -> None:
    """The server stops reading while its replies back up; call_many must keep reading while it sends."""
    requests = [("put", {"key": f"bulk/{i}", "value": {"i": i, "pad": "x" * 100}}) for i in range(8000)]
    with Client(server.address, timeout=60) as rpc:
        replies = rpc.call_many(requests)
    assert all(isinstance(r, dict) and r["created"] for r in replies)
    with server.client() as admin:
        assert admin.stats()["entries"] == 8000


def test_connections_per_agent_socket_are_bounded(server: ServerProcess) -> None:
    with server.client() as admin:
        admin.register_agent("greedy")
    path = str(server.agents_dir / "greedy.sock")
    held = []
    for _ in range(MAX_AGENT_CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        held.append(sock)
    with server.client("greedy") as surplus:  # the server accepts, answers once, and closes
        refused = _error(surplus.stats)
    assert refused.code == ErrorCode.UNAVAILABLE and "too many connections" in refused.message
    with server.client() as admin:  # other sockets are not affected
        assert admin.stats()["connections"] >= MAX_AGENT_CONNECTIONS
    held.pop().close()
    for _ in range(50):
        try:
            with server.client("greedy") as again:
                assert again.stats()["entries"] == 0
                break
        except WireError:
            time.sleep(0.05)  # the server notices the closed connection asynchronously
    else:
        pytest.fail("a slot freed by a closed connection was never reused")
    for sock in held:
        sock.close()
