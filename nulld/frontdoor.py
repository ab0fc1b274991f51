"""nulld's front door: verbs named ``<service>.<verb>`` are relayed to the service that owns them.

The host needs one connection (the control socket, the virtio-serial port or vsock) for everything:
``{"op": "ctx.put", "key": ..., "value": ...}`` reaches ctxgraph's admin socket as ``{"op": "put", ...}``, and
its reply (or its stream of events) comes back with the caller's id.  ``agent.<verb>`` goes to cage as
``<verb>``, ``secret.<verb>`` to cage as ``secret_<verb>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

from nullbox.wire import AsyncClient, ErrorCode, RawObject, Reply, Request, Stream, WireError

ROUTES: Final = {
    "ctx": Path("/run/nullbox/ctxgraph.sock"),
    "egress": Path("/run/nullbox/egress.sock"),
    "agent": Path("/run/nullbox/cage.sock"),
    "secret": Path("/run/nullbox/cage.sock"),
}
#: Who answers each prefix, for "... is not running" (agent and secret verbs both belong to cage).
OWNERS: Final = {"ctx": "ctxgraph", "egress": "egress", "agent": "cage", "secret": "cage"}
#: The service-side op is this prefix + the verb (cage names its vault ops secret_set, secret_list, ...).
VERB_PREFIX: Final = {"secret": "secret_"}
STREAMING: Final = frozenset({"ctx.watch"})
#: Ops that stream only when asked to (``follow``); otherwise they answer once.
STREAMING_WHEN_FOLLOWED: Final = frozenset({"agent.logs"})


def streams(request: Request) -> bool:
    if request.op in STREAMING:
        return True
    return request.op in STREAMING_WHEN_FOLLOWED and request.params.get("follow") is True


def route(op: str, routes: Mapping[str, Path] = ROUTES) -> tuple[Path, str] | None:
    """(socket, verb) for a front-door op, or None when ``op`` is nulld's own."""
    service, dot, verb = op.partition(".")
    if not dot or service not in routes:
        return None
    if not verb:
        raise WireError(ErrorCode.INVALID_REQUEST, f"{op!r} names no verb for {service}")
    return routes[service], VERB_PREFIX.get(service, "") + verb


async def forward(request: Request, target: Path, verb: str) -> Reply:
    try:
        client = await AsyncClient.connect(f"unix:{target}")
    except OSError as exc:
        raise WireError(ErrorCode.UNAVAILABLE, f"{_owner(request.op)} is not running ({exc.strerror})") from None
    if streams(request):

        async def events() -> AsyncIterator[Mapping[str, Any] | RawObject]:
            try:
                async for event in client.stream(verb, **request.params):
                    yield event
            finally:
                await client.close()

        return Stream(events())
    try:
        return await client.call(verb, **request.params)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def _owner(op: str) -> str:
    prefix = op.partition(".")[0]
    return OWNERS.get(prefix, prefix)
