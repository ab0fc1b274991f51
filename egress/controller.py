"""The egress controller: the agent registry, the nftables table that enforces it, and one DNS proxy per agent.

Every change is one libnftables batch built by :mod:`egress.ruleset`; in-memory state changes only after the kernel
accepted the batch, so a refused change leaves both the ruleset and the registry as they were.  All changes, including
the DNS proxies' admissions, are serialised by one lock: the kernel sees them in the order they were decided.

Which name admitted which ``(address, port)`` is tracked here (the kernel only knows the element and its timeout),
so an ``update_agent`` that drops a name also drops the elements only that name justified, in the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from egress import defaults, ruleset
from egress.blocked import blocked_reason
from egress.names import AllowList, InvalidName, validate_agent, validate_interface
from egress.nft import JSONObject, Nft, NftError
from egress.ruleset import AgentNet
from nullbox.wire import ErrorCode, WireError, invalid

if TYPE_CHECKING:
    from egress.dnsproxy import DnsProxy

log = logging.getLogger("egress")

STATE_VERSION: Final = 1
IFF_LOOPBACK: Final = 0x8
MAX_QNAME_SHOWN: Final = 255
#: Expired grants are forgotten at most this often on the admission path (their elements are gone from the kernel
#: already; a stale grant only costs memory until then and is never trusted: expiries are always compared to now).
PRUNE_INTERVAL_S: Final = 10.0
#: Batches up to this many commands (one DNS answer's admission) run on the event loop: a thread hop costs more
#: than the transaction itself.
INLINE_COMMANDS: Final = 16

#: (address, port) an agent may connect to; in the kernel's allow set it is keyed by the agent's interface too.
Destination = tuple[IPv4Address, int]


class AdmissionLike(Protocol):
    """What the DNS proxy hands to :meth:`Controller.admit` (egress.dnsproxy.Admission)."""

    @property
    def address(self) -> IPv4Address: ...
    @property
    def port(self) -> int: ...
    @property
    def timeout_s(self) -> int: ...
    @property
    def name(self) -> str: ...


class Tables(Protocol):
    """What the controller needs of :class:`egress.nft.Nft`."""

    def apply(self, commands: Sequence[JSONObject]) -> None: ...
    def listing(self, kind: str, **names: str) -> list[JSONObject] | None: ...


class Proxy(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def set_allow(self, allow: AllowList) -> None: ...


Admit = Callable[[str, list[Any]], Awaitable[int | None]]
Denied = Callable[[str, str], None]
ProxyFactory = Callable[[str, IPv4Address, AllowList, Admit, Denied], Proxy]


@dataclass(frozen=True)
class ControllerConfig:
    uplink: str = defaults.UPLINK
    resolv_conf: Path = defaults.RESOLV_CONF
    state_dir: Path = defaults.STATE_DIR
    min_ttl: int = defaults.MIN_TTL
    max_ttl: int = defaults.MAX_TTL
    test_hooks: bool = False

    def __post_init__(self) -> None:
        validate_interface(self.uplink)
        if not 1 <= self.min_ttl <= self.max_ttl:
            raise ValueError(f"TTL bounds must satisfy 1 <= min <= max, not {self.min_ttl}..{self.max_ttl}")

    @property
    def state_file(self) -> Path:
        return self.state_dir / defaults.STATE_FILE


@dataclass
class Agent:
    net: AgentNet
    allow: AllowList
    proxy: Proxy
    #: destination -> {allowed name -> monotonic expiry}: why each element is in the set, and until when.
    grants: dict[Destination, dict[str, float]] = field(default_factory=dict)
    denied_names: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=defaults.DENIED_NAMES))
    pruned_at: float = 0.0

    @property
    def name(self) -> str:
        return self.net.agent

    def element(self, destination: Destination) -> ruleset.Element:
        return (self.net.interface, *destination)

    def record(self) -> dict[str, Any]:
        return {"agent": self.name, "interface": self.net.interface, "allow": self.allow.texts()}

    def prune_soon(self, now: float) -> None:
        """:meth:`prune` at most once per PRUNE_INTERVAL_S: the DNS fast path must not walk every grant each time."""
        if now - self.pruned_at >= PRUNE_INTERVAL_S:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Forget grants that have expired (the kernel has dropped their elements on its own)."""
        self.pruned_at = now
        for element in list(self.grants):
            names = {n: t for n, t in self.grants[element].items() if t > now}
            if names:
                self.grants[element] = names
            else:
                del self.grants[element]


def _invalid_name(exc: InvalidName) -> WireError:
    return invalid(str(exc))


def default_proxy_factory(config: ControllerConfig) -> ProxyFactory:
    """DnsProxy on (gateway, 53), asking the resolvers in the appliance's resolv.conf."""

    def make(agent: str, gateway: IPv4Address, allow: AllowList, admit: Admit, denied: Denied) -> DnsProxy:
        # Imported with the first agent: dnspython is not needed to put the base ruleset in force at boot.
        from egress.dnsproxy import DnsProxy, read_resolv_conf  # noqa: PLC0415

        return DnsProxy(
            agent,
            gateway,
            allow,
            lambda: read_resolv_conf(config.resolv_conf),
            admit,
            denied,
            min_ttl=config.min_ttl,
            max_ttl=config.max_ttl,
        )

    return make


async def gateway_of(interface: str) -> IPv4Address:
    """The appliance's IPv4 address on ``interface``: where the agent's DNS proxy listens."""
    try:
        return await _gateway_of(interface)
    except OSError as exc:
        raise WireError(ErrorCode.UNAVAILABLE, f"cannot read the addresses of {interface!r}: {exc}") from None


async def _gateway_of(interface: str) -> IPv4Address:
    from pyroute2.iproute.linux import AsyncIPRoute  # noqa: PLC0415 (with the first agent, off the boot path)

    async with AsyncIPRoute() as ipr:
        indices = await ipr.link_lookup(ifname=interface)
        if not indices:
            raise WireError(ErrorCode.NOT_FOUND, f"interface {interface!r} does not exist")
        index = indices[0]
        (link,) = await ipr.link("get", index=index)
        if link["flags"] & IFF_LOOPBACK:
            raise invalid(f"interface {interface!r} is a loopback interface, not an agent interface")
        addresses = [
            IPv4Address(str(msg.get("local") or msg.get("address")))
            async for msg in await ipr.addr("dump", index=index, family=socket.AF_INET)
            if msg["index"] == index and (msg.get("local") or msg.get("address"))
        ]
    if not addresses:
        raise invalid(f"interface {interface!r} has no IPv4 address; give it the agent's gateway address first")
    return addresses[0]


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        nft: Tables | None = None,
        proxy_factory: ProxyFactory | None = None,
        lookup: Callable[[str], Awaitable[IPv4Address]] = gateway_of,
    ) -> None:
        self.config = config
        self.nft: Tables = nft or Nft()
        self.agents: dict[str, Agent] = {}
        self._proxy_factory = proxy_factory or default_proxy_factory(config)
        self._lookup = lookup
        self._lock = asyncio.Lock()
        self._fail_next = False

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Replace any stale table with the base ruleset plus every restorable agent, in one batch."""
        async with self._lock:
            restored: list[Agent] = []
            for record in self._load_state():
                agent = await self._restore(record)
                if agent is None:
                    continue
                if any(a.name == agent.name or a.net.interface == agent.net.interface for a in restored):
                    log.error(
                        "state file: skipping a second record for agent %s or %s", agent.name, agent.net.interface
                    )
                    await self._close_proxies([agent])
                    continue
                restored.append(agent)
            try:
                await self._apply(ruleset.replace_table(self.config.uplink, [a.net for a in restored]))
            except WireError as exc:
                if not restored:
                    raise
                log.error("restoring %d agents failed (%s); starting with none", len(restored), exc.message)
                await self._close_proxies(restored)
                restored = []
                await self._apply(ruleset.replace_table(self.config.uplink))
            self.agents = {a.name: a for a in restored}
            self._save_state()
        log.info(
            "table %s %s in force (uplink %s, %d agents restored)",
            ruleset.FAMILY,
            ruleset.TABLE,
            self.config.uplink,
            len(self.agents),
        )

    async def close(self) -> None:
        """Stop the DNS proxies.  The table stays: without it, agent traffic would no longer be filtered at all."""
        async with self._lock:
            await self._close_proxies(list(self.agents.values()))

    async def _restore(self, record: dict[str, Any]) -> Agent | None:
        try:
            name = validate_agent(record.get("agent"))
            interface = validate_interface(record.get("interface"))
            allow = AllowList.parse(record.get("allow"))
        except InvalidName as exc:
            log.error("state file: skipping an invalid agent record: %s", exc)
            return None
        try:
            gateway = await self._lookup(interface)
        except WireError as exc:
            log.warning("not restoring agent %s: %s", name, exc.message)
            return None
        try:
            return await self._start_agent(AgentNet(name, interface, gateway), allow)
        except WireError as exc:
            log.error("not restoring agent %s: %s", name, exc.message)
            return None

    async def _start_agent(self, net: AgentNet, allow: AllowList) -> Agent:
        proxy = self._proxy_factory(net.agent, net.gateway, allow, self.admit, self.on_denied)
        try:
            await proxy.start()
        except OSError as exc:
            raise WireError(ErrorCode.UNAVAILABLE, f"agent {net.agent!r}: {exc.strerror or exc}") from None
        return Agent(net, allow, proxy)

    @staticmethod
    async def _close_proxies(agents: Iterable[Agent]) -> None:
        for agent in agents:
            try:
                await agent.proxy.close()
            except Exception:
                log.exception("closing the DNS proxy of agent %s failed", agent.name)

    # ------------------------------------------------------------------------------------------------- ops

    async def add_agent(self, agent: object, interface: object, allow: object) -> dict[str, Any]:
        try:
            name = validate_agent(agent)
            ifname = validate_interface(interface)
            allowed = AllowList.parse(allow)
        except InvalidName as exc:
            raise _invalid_name(exc) from None
        async with self._lock:
            if name in self.agents:
                raise WireError(ErrorCode.CONFLICT, f"agent {name!r} already exists")
            if ifname == self.config.uplink:
                raise WireError(ErrorCode.CONFLICT, f"interface {ifname!r} is the uplink, not an agent interface")
            for other in self.agents.values():
                if other.net.interface == ifname:
                    raise WireError(ErrorCode.CONFLICT, f"interface {ifname!r} is already used by agent {other.name!r}")
            gateway = await self._lookup(ifname)
            for other in self.agents.values():
                if other.net.gateway == gateway:
                    raise WireError(
                        ErrorCode.CONFLICT, f"gateway {gateway} of {ifname!r} is already agent {other.name!r}'s"
                    )
            entry = await self._start_agent(AgentNet(name, ifname, gateway), allowed)
            try:
                stale = await self._elements_of(ifname)
                await self._apply(ruleset.add_agent(entry.net, stale))
            except BaseException:
                await self._close_proxies([entry])
                raise
            self.agents[name] = entry
            self._save_state()
        log.info("agent %s added on %s (gateway %s), allow %s", name, ifname, gateway, allowed.texts())
        return self._describe(entry)

    async def remove_agent(self, agent: object) -> dict[str, Any]:
        async with self._lock:
            entry = self._get(agent)
            await self._apply(ruleset.remove_agent(entry.net, await self._elements_of(entry.net.interface)))
            del self.agents[entry.name]
            self._save_state()
            await self._close_proxies([entry])
        log.info("agent %s removed", entry.name)
        return {"agent": entry.name, "removed": True}

    async def update_agent(self, agent: object, allow: object) -> dict[str, Any]:
        try:
            allowed = AllowList.parse(allow)
        except InvalidName as exc:
            raise _invalid_name(exc) from None
        async with self._lock:
            entry = self._get(agent)
            now = time.monotonic()
            entry.prune(now)
            revoked: list[Destination] = []
            shortened: list[tuple[ruleset.Element, int]] = []
            grants: dict[Destination, dict[str, float]] = {}
            for destination, names in entry.grants.items():
                kept = {n: t for n, t in names.items() if destination[1] in allowed.ports_for(n)}
                if not kept:
                    revoked.append(destination)
                    continue
                grants[destination] = kept
                if max(kept.values()) < max(names.values()):
                    shortened.append((entry.element(destination), _seconds(max(kept.values()) - now)))
            await self._apply([*ruleset.revoke(entry.element(d) for d in revoked), *ruleset.admit(shortened)])
            entry.allow = allowed
            entry.grants = grants
            entry.proxy.set_allow(allowed)
            self._save_state()
        log.info("agent %s allow %s (%d addresses revoked)", entry.name, allowed.texts(), len(revoked))
        return {**self._describe(entry), "revoked": [_element_json(d) for d in sorted(revoked)]}

    def list_agents(self) -> dict[str, Any]:
        return {"agents": [self._describe(a) for a in sorted(self.agents.values(), key=lambda a: a.name)]}

    async def status(self, agent: object = None) -> dict[str, Any]:
        async with self._lock:
            chosen = [self._get(agent)] if agent is not None else sorted(self.agents.values(), key=lambda a: a.name)
            listing = await self._list_table()
        objects = _index(listing)
        now = time.monotonic()
        agents = [self._agent_status(a, objects, now) for a in chosen]
        if agent is not None:
            return {"agent": agents[0]}
        return {
            "table": f"{ruleset.FAMILY} {ruleset.TABLE}",
            "uplink": self.config.uplink,
            "ttl": {"min": self.config.min_ttl, "max": self.config.max_ttl},
            "agents": agents,
        }

    async def fail_next(self) -> dict[str, Any]:
        """Test hook: the next transaction carries a command the kernel rejects."""
        self._fail_next = True
        return {"armed": True}

    # ---------------------------------------------------------------------------------------- DNS proxy side

    async def admit(self, agent: str, admissions: Sequence[AdmissionLike]) -> int:
        """Put the addresses a DNS answer gave for an allowed name in the agent's set, before the agent sees them.

        Returns the seconds every admitted element is guaranteed to stay in the set: the proxy never hands out a TTL
        longer than that.  When every element already has at least half its requested timeout (and at least
        min_ttl) left, no transaction is made: popular names are answered without a kernel round trip, and the
        answer's TTL shrinks to what is left instead.

        Raises (so the proxy answers SERVFAIL) for an unknown agent, an admission its allow list does not justify,
        a blocked address, or a refused transaction.
        """
        async with self._lock:
            entry = self._get(agent)
            now = time.monotonic()
            entry.prune_soon(now)
            requested: dict[Destination, dict[str, int]] = {}
            for adm in admissions:
                if not isinstance(adm.address, IPv4Address):
                    raise invalid(f"admission address {adm.address!r} is not IPv4")
                reason = blocked_reason(adm.address)
                if reason is not None:
                    raise WireError(ErrorCode.FORBIDDEN, f"{adm.address} may not be admitted: {reason}")
                if adm.port not in entry.allow.ports_for(adm.name):
                    raise WireError(
                        ErrorCode.FORBIDDEN, f"agent {entry.name!r} is not allowed {adm.name!r} on port {adm.port}"
                    )
                timeout = min(max(int(adm.timeout_s), self.config.min_ttl), self.config.max_ttl)
                names = requested.setdefault((adm.address, adm.port), {})
                names[adm.name] = max(names.get(adm.name, 0), timeout)
            if not requested:
                return 0
            if all(self._covered(entry, d, names, now) for d, names in requested.items()):
                guaranteed = []
                for destination, names in requested.items():
                    granted = entry.grants[destination]
                    expiry = max(granted.values())
                    for name, timeout in names.items():  # each name justifies what its answer is told, no more
                        until = min(expiry, now + timeout)
                        granted[name] = max(granted.get(name, 0.0), until)
                        guaranteed.append(math.floor(until - now))
                return min(guaranteed)
            pending: dict[Destination, dict[str, float]] = {}
            for destination, names in requested.items():
                merged = pending.setdefault(destination, dict(entry.grants.get(destination, {})))
                for name, timeout in names.items():
                    merged[name] = max(merged.get(name, 0.0), now + timeout)
            self._check_limit(entry, pending, now)
            elements = [(entry.element(d), _seconds(max(names.values()) - now)) for d, names in pending.items()]
            await self._apply(ruleset.admit(elements))
            entry.grants.update(pending)
        log.debug("agent %s admitted %s", agent, [_element_json(d) for d in pending])
        return min(timeout for _, timeout in elements)

    @staticmethod
    def _check_limit(entry: Agent, pending: dict[Destination, dict[str, float]], now: float) -> None:
        """Refuse an admission that would give one agent more than its share of the (shared) allow set."""
        if len(entry.grants.keys() | pending.keys()) <= defaults.AGENT_ALLOW_LIMIT:
            return
        entry.prune(now)
        if len(entry.grants.keys() | pending.keys()) > defaults.AGENT_ALLOW_LIMIT:
            raise WireError(
                ErrorCode.FORBIDDEN,
                f"agent {entry.name!r} already holds {len(entry.grants)} addresses "
                f"(limit {defaults.AGENT_ALLOW_LIMIT}); not admitting more until some expire",
            )

    def _covered(self, entry: Agent, destination: Destination, names: dict[str, int], now: float) -> bool:
        """Whether ``destination`` already stays long enough that refreshing it would buy little."""
        granted = entry.grants.get(destination)
        if not granted:
            return False
        left = max(granted.values()) - now
        return left >= max(self.config.min_ttl, max(names.values()) / 2) and left >= 2

    def on_denied(self, agent: str, qname: str) -> None:
        entry = self.agents.get(agent)
        if entry is not None:
            entry.denied_names.append((qname[:MAX_QNAME_SHOWN], time.time()))

    # ------------------------------------------------------------------------------------------- plumbing

    def _get(self, agent: object) -> Agent:
        try:
            name = validate_agent(agent)
        except InvalidName as exc:
            raise _invalid_name(exc) from None
        entry = self.agents.get(name)
        if entry is None:
            raise WireError(ErrorCode.NOT_FOUND, f"no agent {name!r}")
        return entry

    async def _apply(self, commands: list[JSONObject]) -> None:
        """One transaction (caller holds the lock); a refusal becomes an error for the caller, nothing changes."""
        if self._fail_next:
            self._fail_next = False
            commands = [*commands, ruleset.forced_failure()]
        if not commands:
            return
        try:
            if len(commands) <= INLINE_COMMANDS:
                self.nft.apply(commands)
            else:
                await asyncio.to_thread(self.nft.apply, commands)
        except NftError as exc:
            log.error("nftables refused a transaction of %d commands: %s", len(commands), exc)
            raise WireError(
                ErrorCode.UNAVAILABLE, f"nftables refused the change; nothing was applied ({exc})"
            ) from None

    async def _elements_of(self, interface: str) -> list[tuple[str, ruleset.Element]]:
        """(set, element) of every allow and denied element the kernel holds for ``interface``."""
        found: list[tuple[str, ruleset.Element]] = []
        for name in (ruleset.ALLOW_SET, ruleset.DENIED_SET):
            try:
                listing = await asyncio.to_thread(
                    self.nft.listing, "set", family=ruleset.FAMILY, table=ruleset.TABLE, name=name
                )
            except NftError as exc:
                raise WireError(ErrorCode.UNAVAILABLE, f"cannot read set {name}: {exc}") from None
            for value, _ in _elements(_index(listing or []).get(("set", name))):
                element = _parse_element(value)
                if element is not None and element[0] == interface:
                    found.append((name, element))
        return found

    async def _list_table(self) -> list[JSONObject]:
        try:
            listing = await asyncio.to_thread(self.nft.listing, "table", family=ruleset.FAMILY, name=ruleset.TABLE)
        except NftError as exc:
            raise WireError(ErrorCode.UNAVAILABLE, f"cannot read table {ruleset.TABLE}: {exc}") from None
        if listing is None:
            raise WireError(ErrorCode.UNAVAILABLE, f"table {ruleset.FAMILY} {ruleset.TABLE} is missing")
        return listing

    def _describe(self, agent: Agent) -> dict[str, Any]:
        return {
            "agent": agent.name,
            "interface": agent.net.interface,
            "gateway": str(agent.net.gateway),
            "allow": agent.allow.texts(),
        }

    def _agent_status(self, agent: Agent, objects: dict[tuple[str, str], JSONObject], now: float) -> dict[str, Any]:
        agent.prune(now)
        interface = agent.net.interface
        addresses = []
        for value, expires in _elements(objects.get(("set", ruleset.ALLOW_SET))):
            element = _parse_element(value)
            if element is None or element[0] != interface:
                continue
            names = sorted(agent.grants.get(element[1:], {}))
            addresses.append({**_element_json(element[1:]), "expires_s": expires, "names": names})
        denied = []
        for value, expires in _elements(objects.get(("set", ruleset.DENIED_SET))):
            element = _parse_element(value)
            if element is not None and element[0] == interface:
                denied.append({**_element_json(element[1:]), "expires_s": expires})
        denied.sort(key=lambda d: -int(d["expires_s"] or 0))
        return {
            **self._describe(agent),
            "addresses": sorted(addresses, key=lambda a: (a["address"], a["port"])),
            "counters": {
                "accepted": _counter(objects.get(("set", ruleset.ACCEPTED_SET)), interface),
                "dropped": _counter(objects.get(("set", ruleset.DROPPED_SET)), interface),
            },
            "denied": denied[: defaults.DENIED_SHOWN],
            "denied_names": [{"name": n, "at": round(t, 3)} for n, t in reversed(agent.denied_names)],
        }

    # ---------------------------------------------------------------------------------------------- state

    def _load_state(self) -> list[dict[str, Any]]:
        path = self.config.state_file
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable state file %s: %s", path, exc)
            return []
        if (
            not isinstance(data, dict)
            or data.get("version") != STATE_VERSION
            or not isinstance(data.get("agents"), list)
        ):
            log.error("ignoring state file %s: not a version %d agent registry", path, STATE_VERSION)
            return []
        return [r for r in data["agents"] if isinstance(r, dict)]

    def _save_state(self) -> None:
        """Write the registry atomically (temporary file, fsync, rename): a crash leaves the old or the new one."""
        path = self.config.state_file
        records = [a.record() for a in sorted(self.agents.values(), key=lambda a: a.name)]
        text = json.dumps({"version": STATE_VERSION, "agents": records}, indent=1) + "\n"
        partial = path.with_name(path.name + ".new")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(path)
        except OSError as exc:
            # The ruleset is in force either way; only a restart would forget this change.
            log.error("cannot write the agent registry %s: %s", path, exc)


def _seconds(remaining: float) -> int:
    return max(1, math.ceil(remaining))


def _element_json(destination: Destination) -> dict[str, Any]:
    return {"address": str(destination[0]), "port": destination[1]}


def _index(listing: list[JSONObject]) -> dict[tuple[str, str], JSONObject]:
    objects: dict[tuple[str, str], JSONObject] = {}
    for item in listing:
        for kind, body in item.items():
            if isinstance(body, dict) and isinstance(body.get("name"), str):
                objects[(kind, body["name"])] = body
    return objects


def _elements(set_body: JSONObject | None) -> list[tuple[Any, int | None]]:
    """(value, seconds until expiry) of each element a set listing holds."""
    if set_body is None:
        return []
    result: list[tuple[Any, int | None]] = []
    for item in set_body.get("elem", []):
        if isinstance(item, dict) and "elem" in item:
            body = item["elem"]
            expires = body.get("expires")
            result.append((body.get("val"), int(expires) if isinstance(expires, int | float) else None))
        else:
            result.append((item, None))
    return result


def _parse_element(value: Any) -> ruleset.Element | None:
    """An allow or denied set element as listed: {"concat": [interface, address, port]}."""
    if not isinstance(value, dict):
        return None
    parts = value.get("concat")
    if not isinstance(parts, list) or len(parts) != 3:
        return None
    interface, address, port = parts
    with contextlib.suppress(ValueError, TypeError):
        if isinstance(interface, str) and isinstance(port, int):
            return interface, IPv4Address(str(address)), port
    return None


def _counter(set_body: JSONObject | None, interface: str) -> dict[str, int]:
    """The counter of ``interface``'s element in a counting set listing."""
    for item in (set_body or {}).get("elem", []):
        body = item.get("elem") if isinstance(item, dict) else None
        if isinstance(body, dict) and body.get("val") == interface:
            counter = body.get("counter") or {}
            return {"packets": int(counter.get("packets", 0)), "bytes": int(counter.get("bytes", 0))}
    return {"packets": 0, "bytes": 0}
