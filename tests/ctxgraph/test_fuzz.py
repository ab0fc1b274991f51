"""Protocol fuzzing of the real ctxgraph daemon over raw unix sockets.

The contract under test (ARCHITECTURE.md, wire protocol): newline-delimited JSON, at most 1 MiB per line; every
request line gets exactly one reply line, a JSON object with ``ok``; failures carry one of the contract's error
codes; a malformed or oversized line gets ``invalid_request`` and the connection stays usable; no input crashes a
daemon.  On top of that, ``internal`` is never an acceptable answer to anything a client sends: every input here
is either valid or the client's mistake.

The hypothesis properties share ONE daemon (module scope).  After each fuzzed line a ``stats`` probe goes down the
same connection: its reply must be the very next line, which proves both "exactly one reply" and "still usable".
A request that may open a ``watch`` stream gets a connection of its own, closed afterwards.

Raw sockets (not :class:`nullbox.wire.Client`) keep the framing byte-exact: what is sent is what the test says.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctxgraph.client import CtxClient
from ctxgraph.process import ServerProcess
from nullbox.wire import MAX_LINE, JSONObject

CONTRACT_CODES: Final = frozenset(
    {"invalid_request", "not_found", "forbidden", "conflict", "unavailable", "internal"},
)
OPS: Final = (
    "put",
    "put_batch",
    "get",
    "query",
    "history",
    "by_agent",
    "watch",
    "stats",
    "register_agent",
    "unregister_agent",
    "list_agents",
)
REPLY_TIMEOUT_S: Final = 30.0
FUZZ: Final = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ------------------------------------------------------------------------------------------------- raw sockets


class LineSocket:
    """A raw AF_UNIX connection: send exact bytes, read exact lines (of any length)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.sock.connect(str(path))
        self._buffer = bytearray()

    def __enter__(self) -> LineSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """The next line without its newline; fails the test on EOF or after ``REPLY_TIMEOUT_S`` of silence."""
        scanned = 0
        while (end := self._buffer.find(b"\n", scanned)) < 0:
            scanned = len(self._buffer)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise AssertionError(f"no complete reply line within {REPLY_TIMEOUT_S}s") from None
            assert chunk, "the daemon closed the connection instead of replying"
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"a reply carries {name}, which is not JSON")


def _describe(line: bytes) -> str:
    return repr(line) if len(line) <= 300 else f"{line[:300]!r}... ({len(line)} bytes)"


def check_reply(raw: bytes, request: bytes) -> JSONObject:
    """A reply line as the contract has it; ``internal`` fails the test (no client input deserves it)."""
    text = raw.decode("utf-8")
    reply = json.loads(text, parse_constant=_reject_constant)
    assert isinstance(reply, dict), f"reply {_describe(raw)} to {_describe(request)} is not an object"
    assert isinstance(reply.get("ok"), bool), f"reply {_describe(raw)} to {_describe(request)} has no bool 'ok'"
    if not reply["ok"]:
        error = reply.get("error")
        assert isinstance(error, dict), f"failure {_describe(raw)} has no 'error' object"
        assert error.get("code") in CONTRACT_CODES, f"failure {_describe(raw)} has a code outside the contract"
        assert isinstance(error.get("message"), str), f"failure {_describe(raw)} has no message"
        assert error["code"] != "internal", f"internal error for client input {_describe(request)}: {error}"
    return reply


def check_line_limit(raw: bytes, request: bytes) -> None:
    assert len(raw) <= MAX_LINE, (
        f"a reply line of {len(raw)} bytes (limit {MAX_LINE}) answered {_describe(request)}: {_describe(raw)}"
    )


NOT_JSON: Final = object()


def parse_line(line: bytes) -> tuple[Any, bool]:
    """(value, strict): the line's JSON value or NOT_JSON, and whether the daemon's strict decoding accepts it.

    NaN and Infinity are tolerated here (``strict`` is then False) so that, say, a ``watch`` carrying them is still
    recognised as one.  Lines over the limit are NOT_JSON: the daemon never decodes them.
    """
    if len(line) > MAX_LINE:
        return NOT_JSON, False
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    try:
        value = json.loads(line.decode("utf-8"), parse_constant=constant)
    except (ValueError, RecursionError):
        return NOT_JSON, False
    return value, not constants


def echoed_id(line: bytes) -> tuple[bool, Any]:
    """(True, id) when the reply must carry this id: a request object whose id is plainly valid.

    Ids the contract allows are ints and strings; the daemon caps them (int64, 256 characters), so only ids well
    inside any sensible limit are held to being echoed.
    """
    obj, strict = parse_line(line)
    if not strict or not isinstance(obj, dict):
        return False, None
    request_id = obj.get("id")
    if request_id is None:
        return True, None
    if isinstance(request_id, bool):
        return False, None
    if isinstance(request_id, int) and abs(request_id) <= 2**53:
        return True, request_id
    if isinstance(request_id, str) and len(request_id) <= 64:
        try:
            request_id.encode("utf-8")
        except UnicodeEncodeError:
            return False, None
        return True, request_id
    return False, None


def opens_stream(line: bytes) -> bool:
    obj, _ = parse_line(line)
    return isinstance(obj, dict) and obj.get("op") == "watch"


_probe_ids = itertools.count()


def exchange(conn: LineSocket, line: bytes) -> list[JSONObject]:
    """Send one line; return its replies, proven complete (and the connection usable) by a ``stats`` probe."""
    assert b"\n" not in line
    probe_id = f"probe-{next(_probe_ids)}"
    probe = json.dumps({"id": probe_id, "op": "stats"}).encode() + b"\n"
    replies: list[JSONObject] = []
    if line.strip():
        conn.send(line + b"\n")
        raw = conn.read_line()
        replies.append(check_reply(raw, line))
        check_line_limit(raw, line)
        conn.send(probe)
        after = check_reply(conn.read_line(), probe)
    else:
        # A blank line may be ignored or refused, but answered at most once.
        conn.send(line + b"\n" + probe)
        while (after := check_reply(conn.read_line(), line)).get("id") != probe_id:
            replies.append(after)
        assert len(replies) <= 1, f"{len(replies)} replies to the blank line {line!r}"
    assert after.get("id") == probe_id, (
        f"after the reply to {_describe(line)} the next line should answer the stats probe, got {after}"
    )
    assert after["ok"], f"the connection is unusable after {_describe(line)}: {after}"

    if replies:
        (reply,) = replies
        must_echo, request_id = echoed_id(line)
        if must_echo:
            assert reply.get("id") == request_id, f"reply {reply} does not echo the id of {_describe(line)}"
        if reply["ok"] and "event" in reply:
            assert opens_stream(line), f"an event line answered a request that is not a watch: {reply}"
            assert reply["event"] == {"type": "subscribed", "prefix": reply["event"].get("prefix")}
        if reply["ok"] and opens_stream(line):
            assert "event" in reply, f"a successful watch must start with an event line, got {reply}"
    return replies


# -------------------------------------------------------------------------------------------- the live daemon


class Daemon:
    """One live daemon for a whole module, and one long-lived connection that every fuzzed line goes through."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.conn = LineSocket(server.socket)

    def exchange(self, line: bytes) -> list[JSONObject]:
        if opens_stream(line):
            # A watch keeps streaming entries; give it a connection of its own and hang up afterwards.
            with LineSocket(self.server.socket) as conn:
                replies = exchange(conn, line)
        else:
            try:
                replies = exchange(self.conn, line)
            except BaseException:
                # Unread replies would be blamed on the next example: start that one on a clean connection.
                self.conn.close()
                self.conn = LineSocket(self.server.socket)
                raise
        assert self.server.alive(), f"the daemon died on {_describe(line)}; see {self.server.log}"
        for reply in replies:
            if reply["ok"] and isinstance(reply.get("hash"), str):
                KNOWN_HASHES.append(reply["hash"])
        return replies

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    server = ServerProcess(tmp_path_factory.mktemp("fuzz") / "ctxgraph").start()
    live = Daemon(server)
    try:
        yield live
        assert server.alive(), f"the daemon died during the fuzzing; see {server.log}"
        assert live.exchange(b'{"op":"stats"}')[0]["ok"]
    finally:
        live.close()
        status = server.stop(30.0)
    assert status == 0, f"the daemon exited {status} after the fuzzing; see {server.log}"


# ------------------------------------------------------------------------------------------------- strategies

KNOWN_HASHES: list[str] = []
"""Hashes the daemon handed out, so that ``get`` is sometimes asked for something that exists."""

BOUNDARY_INTS: Final = (
    0,
    1,
    2,
    3,
    63,
    64,
    65,
    999,
    1000,
    1001,
    1024,
    2**31 - 1,
    2**31,
    2**32 - 2,
    2**32 - 1,
    2**32,
    2**53 - 1,
    2**53,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    10**100,
)
INTS: Final = st.one_of(st.integers(), st.sampled_from([*BOUNDARY_INTS, *(-v for v in BOUNDARY_INTS)]))
CHARS: Final = st.characters(exclude_categories=())  # every code point: controls and lone surrogates included
SPECIAL_STRINGS: Final = st.sampled_from(
    [
        "",
        " ",
        "a",
        "a/b",
        "../x",
        "\x00",
        "k\x00ey",
        "\x1f",
        "\x7f",
        "\x85",
        "\u2028",
        "\ud800",
        "\udfff",
        "a\ud800b",
        "\ufeff",
        "%",
        "_",
        "\U0010ffff",
        "NaN",
        "Infinity",
        "null",
        "9" * 19,
        str(2**63 - 1),
        str(2**63),
    ]
)
LONG_STRINGS: Final = st.builds(
    lambda char, count: char * count,
    st.sampled_from(["k", "é", "🙂", "\x00", "\ud800"]),
    st.sampled_from([63, 64, 65, 256, 257, 1023, 1024, 1025, 4096, 70_000]),
)
STRINGS: Final = st.one_of(st.text(CHARS, max_size=24), SPECIAL_STRINGS, LONG_STRINGS)
SCALARS: Final = st.one_of(st.none(), st.booleans(), INTS, st.floats(), STRINGS)  # floats: NaN and ±Infinity too


def _nest(depth: int, as_object: bool, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"n": value} if as_object else [value]
    return value


JSON_VALUES: Final = st.one_of(
    st.recursive(
        SCALARS,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(STRINGS, children, max_size=4),
        max_leaves=20,
    ),
    st.builds(_nest, st.integers(0, 200), st.booleans(), SCALARS),  # around the nesting limit of 64, and beyond
)

VALID_KEYS: Final = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=20),
    st.text("ab/", min_size=1, max_size=4),  # a small alphabet, so that queries find what puts stored
)
KEYS: Final = st.one_of(VALID_KEYS, STRINGS, JSON_VALUES)
AGENT_NAMES: Final = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    st.sampled_from(["fuzz", "fuzz-2", "a/b", "../etc", "a\\b", "", "a" * 64, "a" * 65, "op\x00", "agént"]),
    STRINGS,
    JSON_VALUES,
)
HASHES: Final = st.one_of(
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.integers(min_value=0).map(lambda i: KNOWN_HASHES[i % len(KNOWN_HASHES)] if KNOWN_HASHES else "0" * 64),
    STRINGS,
    JSON_VALUES,
)
CURSORS: Final = st.one_of(
    st.integers(min_value=0, max_value=10**19 - 1).map(str),  # up to 19 digits, what a cursor may look like
    st.sampled_from([str(v) for v in BOUNDARY_INTS]),
    STRINGS,
    JSON_VALUES,
)
LIMITS: Final = st.one_of(st.integers(-2, 1002), st.sampled_from(BOUNDARY_INTS), JSON_VALUES)
PREFIX_LISTS: Final = st.one_of(st.lists(st.one_of(VALID_KEYS, st.just(""), STRINGS), max_size=3), JSON_VALUES)
SMALL_IDS: Final = st.one_of(st.integers(-1, 12), st.sampled_from(BOUNDARY_INTS), JSON_VALUES)  # uid, gid, cid
ITEMS: Final = st.one_of(
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"key": KEYS, "value": JSON_VALUES}, optional={"agent": AGENT_NAMES}),
            JSON_VALUES,
        ),
        max_size=5,
    ),
    st.just([{"key": "k", "value": 1}] * 1001),  # one more than a batch may hold
    JSON_VALUES,
)
PAGING: Final = {"limit": LIMITS, "after": CURSORS}
OP_PARAMS: Final[dict[str, dict[str, st.SearchStrategy[Any]]]] = {
    "put": {"key": KEYS, "value": JSON_VALUES, "agent": AGENT_NAMES},
    "put_batch": {"items": ITEMS},
    "get": {"hash": HASHES},
    "query": {"prefix": KEYS, **PAGING},
    "history": {"key": KEYS, **PAGING},
    "by_agent": {"agent": AGENT_NAMES, **PAGING},
    "watch": {"prefix": KEYS},
    "stats": {},
    "register_agent": {
        "agent": AGENT_NAMES,
        "read": PREFIX_LISTS,
        "write": PREFIX_LISTS,
        "uid": SMALL_IDS,
        "gid": SMALL_IDS,
        "cid": SMALL_IDS,
    },
    "unregister_agent": {"agent": AGENT_NAMES},
    "list_agents": {},
}
PARAM_NAMES: Final = sorted({name for params in OP_PARAMS.values() for name in params} | {"id", "op"})
REQUEST_IDS: Final = st.one_of(st.integers(), st.text(CHARS, max_size=20), st.sampled_from(BOUNDARY_INTS), JSON_VALUES)


# Well-formed requests, so that the fuzzing also reaches storage, paging, registration and streams; a mutation of
# one parameter then probes the validation right next to the paths that work.
AGENT_POOL: Final = st.one_of(
    st.sampled_from(["fuzz-a", "fuzz-b", "fuzz_c", "Z9", "operator"]),
    st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
)
TEXT_ANY: Final = st.one_of(  # may hold lone surrogates: such a value is invalid, never internal
    st.text(CHARS, max_size=12),
    st.sampled_from(["\ud800", "a\udc00", "\udbff\udbff"]),
)
GOOD_VALUES: Final = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**53) + 1, 2**53 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(codec="utf-8"), max_size=12),
        TEXT_ANY,
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), TEXT_ANY), children, max_size=4)
    ),
    max_leaves=12,
)
GOOD_ITEM: Final = st.fixed_dictionaries({"key": VALID_KEYS, "value": GOOD_VALUES}, optional={"agent": AGENT_POOL})
GOOD_PAGING: Final = {
    "limit": st.integers(1, 1000),
    "after": st.one_of(
        st.integers(min_value=0, max_value=10**19 - 1).map(str),  # what the cursor syntax allows
        st.sampled_from([str(2**63 - 1), str(2**63), "9" * 19]),  # around the int64 of a row id
        st.just(None),
    ),
}
GOOD_PREFIX: Final = st.one_of(st.just(""), VALID_KEYS)
GOOD_PREFIXES: Final = st.lists(GOOD_PREFIX, max_size=3)
GOOD_REQUESTS: Final[dict[str, st.SearchStrategy[dict[str, Any]]]] = {
    "put": st.fixed_dictionaries({"key": VALID_KEYS, "value": GOOD_VALUES}, optional={"agent": AGENT_POOL}),
    "put_batch": st.fixed_dictionaries({"items": st.lists(GOOD_ITEM, min_size=1, max_size=5)}),
    "get": st.fixed_dictionaries({"hash": HASHES}),
    "query": st.fixed_dictionaries({}, optional={"prefix": GOOD_PREFIX, **GOOD_PAGING}),
    "history": st.fixed_dictionaries({"key": VALID_KEYS}, optional=GOOD_PAGING),
    "by_agent": st.fixed_dictionaries({"agent": AGENT_POOL}, optional=GOOD_PAGING),
    "watch": st.fixed_dictionaries({}, optional={"prefix": GOOD_PREFIX}),
    "stats": st.just({}),
    "register_agent": st.fixed_dictionaries(
        {"agent": AGENT_POOL},
        optional={
            "read": GOOD_PREFIXES,
            "write": GOOD_PREFIXES,
            "uid": st.integers(0, 2**32 - 2),
            "gid": st.integers(0, 2**32 - 2),
            "cid": st.integers(3, 10),
        },
    ),
    "unregister_agent": st.fixed_dictionaries({"agent": AGENT_POOL}),
    "list_agents": st.just({}),
}


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A request object: a well-formed one, one with a parameter gone wrong, or anything at all."""
    kind = draw(st.sampled_from(["good", "good", "mutated", "mutated", "wild"]))
    request: dict[str, Any]
    if kind == "wild":
        op: Any = draw(st.one_of(st.sampled_from(OPS), STRINGS, JSON_VALUES))
        known = OP_PARAMS.get(op, {}) if isinstance(op, str) else {}
        request = draw(st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), STRINGS), JSON_VALUES, max_size=2))
        request.update(draw(st.fixed_dictionaries({}, optional=known)))
        if draw(st.integers(0, 4)) > 0:
            request["op"] = op
    else:
        op = draw(st.sampled_from(OPS))
        request = {**draw(GOOD_REQUESTS[op]), "op": op}
        if kind == "mutated":
            known = OP_PARAMS[op]
            name = draw(st.one_of(st.sampled_from(sorted(known)), STRINGS) if known else STRINGS)
            if name in request and draw(st.booleans()):
                del request[name]
            else:
                request[name] = draw(known.get(name, JSON_VALUES))
    if draw(st.booleans()):
        request["id"] = draw(REQUEST_IDS)
    return request


def encode_line(value: Any, mode: str) -> bytes:
    """JSON text of ``value``: NaN/Infinity tokens allowed; lone surrogates as \\u escapes or as raw CESU bytes."""
    if mode == "ascii":
        return json.dumps(value, ensure_ascii=True).encode()
    text = json.dumps(value, ensure_ascii=False)
    if mode == "surrogatepass":
        return text.encode("utf-8", "surrogatepass")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True).encode()


MODES: Final = st.sampled_from(["utf-8", "ascii", "surrogatepass"])
REQUEST_LINES: Final = st.builds(encode_line, request_objects(), MODES)


def _mutate(line: bytes, position: int, cut: int, insert: bytes) -> bytes:
    at = position % (len(line) + 1)
    return (line[:at] + insert + line[at + cut :]).replace(b"\n", b"")


BYTE_LINES: Final = st.one_of(
    st.binary(max_size=512).map(lambda data: data.replace(b"\n", b"")),
    st.builds(_mutate, REQUEST_LINES, st.integers(min_value=0), st.integers(0, 4), st.binary(max_size=6)),
    REQUEST_LINES.map(lambda line: line[: len(line) // 2]),
)


# ------------------------------------------------------------------------------------------------- properties


@FUZZ
@given(line=BYTE_LINES)
def test_any_byte_line_gets_exactly_one_well_formed_reply(daemon: Daemon, line: bytes) -> None:
    replies = daemon.exchange(line)
    if line.strip():
        assert len(replies) == 1


@FUZZ
@given(value=JSON_VALUES, mode=MODES)
def test_any_json_value_gets_exactly_one_well_formed_reply(daemon: Daemon, value: Any, mode: str) -> None:
    line = encode_line(value, mode)
    (reply,) = daemon.exchange(line)
    if not isinstance(value, dict):
        assert reply == {"id": None, "ok": False, "error": reply["error"]}
        assert reply["error"]["code"] == "invalid_request"


@FUZZ
@given(request=request_objects(), mode=MODES)
def test_any_request_gets_exactly_one_reply_and_never_internal(
    daemon: Daemon, request: dict[str, Any], mode: str
) -> None:
    line = encode_line(request, mode)
    (reply,) = daemon.exchange(line)
    op = request.get("op")
    event(f"{op if op in OPS else 'other op'}: {'ok' if reply['ok'] else reply['error']['code']}")
    if reply["ok"]:
        assert op in OPS, f"an unknown op succeeded: {reply}"


@FUZZ
@given(batch=st.lists(request_objects().filter(lambda r: r.get("op") != "watch"), min_size=1, max_size=6), mode=MODES)
def test_pipelined_requests_are_answered_once_each_in_order(
    daemon: Daemon, batch: list[dict[str, Any]], mode: str
) -> None:
    """Requests on one connection run concurrently; replies still come one per line, in request order."""
    lines = [encode_line({**request, "id": f"pipe-{i}"}, mode) for i, request in enumerate(batch)]
    with LineSocket(daemon.server.socket) as conn:
        conn.send(b"".join(line + b"\n" for line in lines))
        for i, line in enumerate(lines):
            raw = conn.read_line()
            reply = check_reply(raw, line)
            check_line_limit(raw, line)
            if parse_line(line)[1]:
                assert reply.get("id") == f"pipe-{i}", f"reply {i} of the pipeline is {reply}"
        # Nothing more than one reply per line, and the connection is still fine.
        (probe,) = exchange(conn, b'{"id":"end","op":"stats"}')
        assert probe["ok"] and probe["id"] == "end"
    assert daemon.server.alive()


# ---------------------------------------------------------------------------------------------- explicit cases


def _refused(daemon: Daemon, line: bytes) -> JSONObject:
    (reply,) = daemon.exchange(line)
    assert reply["ok"] is False, f"{_describe(line)} was accepted: {reply}"
    assert reply["error"]["code"] == "invalid_request", reply
    return reply


def test_oversized_line_is_refused_and_the_connection_stays_usable(daemon: Daemon) -> None:
    """More than 1 MiB without a newline, sent in pieces over a while, then the newline: one refusal, no more."""
    with LineSocket(daemon.server.socket) as conn:
        conn.send(b'{"id":"big","op":"put","key":"k","value":"')
        for _ in range(5):
            conn.send(b"x" * (300 * 1024))  # 1.5 MiB in all, and no newline yet
            time.sleep(0.05)  # keep the line open for a while, as a slow client would
        # The tail of the long line looks like a request of its own; it must be swallowed with the rest.
        conn.send(b'"}{"id":"tail","op":"stats"}\n')
        reply = check_reply(conn.read_line(), b"<oversized line>")
        assert reply == {"id": None, "ok": False, "error": reply["error"]}
        assert reply["error"]["code"] == "invalid_request"
        # The next line answers the next request: nothing of the long line was taken for a request.
        (after,) = exchange(conn, b'{"id":"after","op":"stats"}')
        assert after["id"] == "after" and after["ok"], after


def test_line_of_exactly_1_mib_is_a_request_and_one_byte_more_is_not(server: ServerProcess) -> None:
    head, tail = b'{"id":"edge","op":"stats"', b"}"  # JSON whitespace pads the line to the limit exactly
    exact = head + b" " * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(exact) == MAX_LINE
    over = head + b" " * (MAX_LINE - len(head) - len(tail) + 1) + tail
    with LineSocket(server.socket) as conn:
        (accepted,) = exchange(conn, exact)
        assert accepted["id"] == "edge" and accepted["ok"], accepted
        (refused,) = exchange(conn, over)
        assert refused["id"] is None and refused["error"]["code"] == "invalid_request", refused


def test_a_mebibyte_of_open_brackets(daemon: Daemon) -> None:
    _refused(daemon, b"[" * MAX_LINE)
    _refused(daemon, b"{" * MAX_LINE)
    _refused(daemon, b'{"op":"put","key":"deep","value":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    _refused(daemon, b'{"op":"put","key":"deep","value":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001)


def test_nesting_limit_of_values_is_64(daemon: Daemon) -> None:
    for as_object in (False, True):
        (ok,) = daemon.exchange(json.dumps({"op": "put", "key": "nest/64", "value": _nest(64, as_object, 1)}).encode())
        assert ok["ok"], ok
        _refused(daemon, json.dumps({"op": "put", "key": "nest/65", "value": _nest(65, as_object, 1)}).encode())


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize(
    "template",
    [
        '{{"op":"put","key":"k","value":{}}}',
        '{{"op":"put","key":"k","value":[1,{{"x":{}}}]}}',
        '{{"op":"put_batch","items":[{{"key":"k","value":{}}}]}}',
        '{{"op":"query","limit":{}}}',
        '{{"id":{},"op":"stats"}}',
        '{{"op":"register_agent","agent":"nan","cid":{}}}',
    ],
)
def test_nan_and_infinity_are_refused(daemon: Daemon, template: str, token: str) -> None:
    _refused(daemon, template.format(token).encode())


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"put","key":"k","value":9007199254740992}',  # 2**53
        b'{"op":"put","key":"k","value":-9007199254740992}',
        b'{"op":"put","key":"k","value":[18446744073709551616]}',  # 2**64
        b'{"op":"put","key":"k","value":' + b"9" * 400 + b"}",
        b'{"op":"put","key":"k","value":' + b"9" * 5000 + b"}",  # past Python's int-from-text digit limit
        b'{"op":"query","limit":18446744073709551616}',
        b'{"id":9223372036854775808,"op":"stats"}',  # 2**63
        b'{"op":"register_agent","agent":"big","uid":18446744073709551616}',
    ],
)
def test_integers_beyond_2_53_are_refused(daemon: Daemon, line: bytes) -> None:
    _refused(daemon, line)


def test_largest_safe_integer_is_a_value(daemon: Daemon) -> None:
    (reply,) = daemon.exchange(b'{"op":"put","key":"int/max","value":9007199254740991}')
    assert reply["ok"], reply


@pytest.mark.parametrize("char", ["\\u0000", "\\u001f", "\\u007f", "\\u0085", "\\n"])
@pytest.mark.parametrize(
    "template",
    [
        '{{"op":"put","key":"a{}b","value":1}}',
        '{{"op":"put_batch","items":[{{"key":"a{}b","value":1}}]}}',
        '{{"op":"history","key":"a{}b"}}',
        '{{"op":"query","prefix":"a{}"}}',
        '{{"op":"register_agent","agent":"ctl","read":["a{}"]}}',
    ],
)
def test_keys_with_control_characters_are_refused(daemon: Daemon, template: str, char: str) -> None:
    _refused(daemon, template.format(char).encode())


@pytest.mark.parametrize("name", ["a/b", "../escape", "/abs", "a/../../x", "x/", "a\\b", "."])
def test_agent_names_with_a_slash_are_refused(daemon: Daemon, name: str) -> None:
    for request in (
        {"op": "put", "agent": name, "key": "k", "value": 1},
        {"op": "put_batch", "items": [{"agent": name, "key": "k", "value": 1}]},
        {"op": "register_agent", "agent": name},
        {"op": "unregister_agent", "agent": name},
        {"op": "by_agent", "agent": name},
    ):
        _refused(daemon, json.dumps(request).encode())
    # Nothing was bound where such a name would have put an agent's socket.
    assert not (daemon.server.agents_dir / f"{name}.sock").exists()
    strays = [p for p in daemon.server.root.parent.rglob("*.sock") if p.parent != daemon.server.agents_dir]
    assert strays == [daemon.server.socket]


# ----------------------------------------------------------------------------------- bugs these tests exposed


def test_lone_surrogate_in_an_object_key_of_a_value_is_invalid_not_internal(daemon: Daemon) -> None:
    """The value ``{"\\ud800": 1}`` cannot be canonicalized (RFC 8785 sorts keys by UTF-16 code units)."""
    _refused(daemon, b'{"op":"put","key":"surrogate","value":{"\\ud800":1}}')
    _refused(daemon, b'{"op":"put_batch","items":[{"key":"surrogate","value":[{"a\\udc00":1}]}]}')


@pytest.mark.parametrize("cursor", [str(2**63), "9" * 19])
@pytest.mark.parametrize(
    "template",
    [
        '{{"op":"query","after":"{}"}}',
        '{{"op":"query","prefix":"a","after":"{}"}}',
        '{{"op":"history","key":"a","after":"{}"}}',
        '{{"op":"by_agent","agent":"operator","after":"{}"}}',
    ],
)
def test_cursor_beyond_int64_is_not_internal(daemon: Daemon, template: str, cursor: str) -> None:
    """A 19-digit ``after`` passes the cursor syntax check but does not fit SQLite's INTEGER."""
    (reply,) = daemon.exchange(template.format(cursor).encode())
    assert reply["ok"] or reply["error"]["code"] == "invalid_request", reply


def test_concurrent_registrations_of_one_cid_conflict(server: ServerProcess) -> None:
    """Two pipelined registrations of new agents with the same vsock CID: one wins, the other is a conflict."""
    with LineSocket(server.socket) as conn:
        conn.send(
            b'{"id":1,"op":"register_agent","agent":"first","cid":7}\n'
            b'{"id":2,"op":"register_agent","agent":"second","cid":7}\n'
        )
        replies = [check_reply(conn.read_line(), b"register_agent cid=7") for _ in range(2)]
        assert [r["id"] for r in replies] == [1, 2]
        assert sorted(r["ok"] for r in replies) == [False, True], replies
        (loser,) = [r for r in replies if not r["ok"]]
        assert loser["error"]["code"] == "conflict", loser
        (listed,) = exchange(conn, b'{"op":"list_agents"}')
        (stats,) = exchange(conn, b'{"op":"stats"}')
    assert [a["cid"] for a in listed["agents"]] == [7]
    # The daemon's live agents and its stored registrations agree.
    assert stats["agents"] == len(listed["agents"]), (stats, listed)


def test_reply_lines_respect_the_1_mib_limit(server: ServerProcess) -> None:
    """Three 400 kB values are each fine; a page holding all three must still fit in one protocol line."""
    with LineSocket(server.socket) as conn:
        for i in range(3):
            line = json.dumps({"op": "put", "key": f"big/{i}", "value": "x" * 400_000}).encode()
            assert exchange(conn, line)[0]["ok"]
        conn.send(b'{"id":"page","op":"query","prefix":"big/"}\n')
        raw = conn.read_line()
        check_reply(raw, b"query big/")
        check_line_limit(raw, b'{"op":"query","prefix":"big/"}')
    # The project's own client reads at most MAX_LINE bytes per reply.
    with CtxClient(server.address) as client:
        assert len(list(client.query_all("big/"))) == 3
