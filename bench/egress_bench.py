"""egress benchmark: ruleset transaction time, allow-set insertion rate and DNS proxy latency, in one run.

    .venv/bin/python -m bench.egress_bench            # full run (~40 s)
    .venv/bin/python -m bench.egress_bench --quick    # smoke run: few runs, few hundred samples

Everything runs against real kernel nftables in network namespaces this benchmark creates, never the host's.

Phases:
  (1) the start-up transaction, ``ruleset.replace_table`` (add table; delete table; base; every agent's elements in the
      dispatch, gateway and counting sets) for 100 agents, applied with one ``Nft.apply``, each run in a brand-
      new network namespace (``unshare(CLONE_NEWNET)`` in a worker process).  An agent's 20 allow-list names live in
      the controller; its allow set starts empty, so they add nothing to the transaction.  Baseline: the same
      transaction for 1 agent, runs interleaved.  Diagnostics: the base table alone, the userspace share (libnftables
      dry run: JSON parse, evaluation, cache fetch, no commit), replacing an existing 100-agent table (a restart), and
      100 incremental ``Controller.add_agent`` calls.
  (2) elements put into the allow set for one agent (``ifname . ipv4_addr . inet_service``, timeout 300 s), in a fresh
      namespace holding the 100-agent table: (a) one element per transaction (``ruleset.admit`` + ``Nft.apply``, the
      batch ``Controller.admit`` makes for one DNS answer), (b) 1000 elements per transaction.  Diagnostics: (a) with
      a 1-agent table; ``Controller.admit`` itself (lock, grant bookkeeping, asyncio.to_thread) for one element per
      call; and its no-transaction path (the element is live), with 1 grant tracked and with ~1,000.
  (3) DNS latency seen by a client in an agent namespace (tests.egress.topology: internet, appliance and agent
      namespaces, authoritative server at 198.51.100.53) talking to the real ``python -m egress serve`` in the
      appliance namespace: its DNS proxy forwards to that server and admits every answer into the real allow set
      before replying.  The baseline is the same question asked of 198.51.100.53 directly from the same namespace,
      through the same veths and the same agent forward chain (the benchmark inserts one rule there letting UDP to
      the server through; egress itself would drop it).  Direct and proxied questions alternate one by one, sent
      sequentially over two connected UDP sockets, timed on the client, after a warm-up.  Scenarios:
        (i)    one name asked again and again: its element is already in the set, no transaction
        (ii)   a new name under ``*.bench.test`` every question, each with its own address: one admission each
        (ii')  one name with TTL 1 (the daemon runs with --min-ttl 1): the element is re-added every question
        (i')   (i) again once the controller tracks ~1,100 live elements
        (ii@100), (i@100)  (ii) and (i) with 99 more agents (on veth pairs inside the appliance) in the table
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final

import dns.message
import dns.rcode
import dns.rdatatype
import dns.version
import nftables  # Debian's python3-nftables, as egress.nft uses it

from bench.common import Report, log, process_cpu_s, verdict
from egress import ruleset
from egress.controller import Admit, Controller, ControllerConfig, Denied
from egress.dnsproxy import Admission
from egress.names import AllowList
from egress.nft import JSONObject, Nft
from egress.ruleset import AgentNet
from nullbox.daemon import DaemonProcess
from nullbox.wire import Client
from tests.egress import topology

REPO: Final = Path(__file__).resolve().parents[1]
PYTHON: Final = sys.executable
CLONE_NEWNET: Final = 0x40000000

UPLINK: Final = topology.UPLINK
AGENTS: Final = 100
NAMES_PER_AGENT: Final = 20
PORT: Final = 443
ELEMENT_TIMEOUT_S: Final = 300
#: Element k of any set is (ELEMENT_BASE + k, 443): public unicast, outside every blocked range, never contacted.
ELEMENT_RANGE: Final = IPv4Network("11.0.0.0/8")
ELEMENT_BASE: Final = int(ELEMENT_RANGE.network_address)
BATCH: Final = 1000
DOMAIN: Final = "bench.test"
CACHED_NAME: Final = f"fast.{DOMAIN}"
CACHED_ADDRESS: Final = "192.0.2.10"
REFRESH_NAME: Final = f"short.{DOMAIN}"
REFRESH_ADDRESS: Final = "192.0.2.11"
QUERY_TIMEOUT_S: Final = 2.0
BENCH_AGENT: Final = "bench-agent-000"

TARGET_APPLY_MS: Final = 100.0
TARGET_ADDED_P50_MS: Final = 1.0


# ---------------------------------------------------------------------------------------------------- helpers


def percentile(ordered: Sequence[float], pct: int) -> float:
    """Nearest-rank percentile of already sorted samples: the smallest sample >= ``pct``% of all samples."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-pct * len(ordered) // 100))  # ceil(pct * n / 100) in integers
    return ordered[rank - 1]


def ms(ns: float) -> float:
    return ns / 1e6


def element(k: int) -> IPv4Address:
    return IPv4Address(ELEMENT_BASE + k)


def agent_name(i: int) -> str:
    return f"bench-agent-{i:03d}"


def allow_list(i: int) -> list[str]:
    """An agent's 20 allow entries: the benchmark's wildcard and 19 ordinary names."""
    return [f"*.{DOMAIN}", *(f"svc{j}.agent{i}.example.com" for j in range(NAMES_PER_AGENT - 1))]


# ------------------------------------------------------------------------ worker: phases (1) and (2), in-kernel


class FreshNamespaces:
    """Moves this worker into a brand-new, empty network namespace per measurement (unshare(CLONE_NEWNET)).

    unshare moves only the calling thread: the worker stays single-threaded, except for the executor threads of
    :func:`controller_phase`, which are created after its namespace change and inherit it.
    """

    def __init__(self) -> None:
        self.host = os.readlink("/proc/thread-self/ns/net")
        self.libc = ctypes.CDLL(None, use_errno=True)

    def enter(self) -> None:
        if self.libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"unshare(CLONE_NEWNET): {os.strerror(errno)}")
        if os.readlink("/proc/thread-self/ns/net") == self.host:
            raise RuntimeError("still in the starting network namespace after unshare")

    def nft(self) -> Nft:
        """An Nft context in a new namespace, warmed up (library used, socket open), with no nullbox table."""
        self.enter()
        nft = Nft()
        if nft.listing("table", family=ruleset.FAMILY, name=ruleset.TABLE) is not None:
            raise RuntimeError("a fresh namespace already holds the nullbox table")
        return nft


def timed_apply(nft: Nft, commands: list[JSONObject]) -> int:
    start = time.perf_counter_ns()
    nft.apply(commands)
    return time.perf_counter_ns() - start


def table_counts(nft: Nft) -> dict[str, int]:
    counts = {"chain": 0, "set": 0, "map": 0, "rule": 0, "counter": 0, "element": 0}
    for item in nft.listing("table", family=ruleset.FAMILY, name=ruleset.TABLE) or []:
        for kind in item:
            if kind in counts:
                counts[kind] += 1
            if kind == "set":
                counts["element"] += len(item[kind].get("elem", []))
    return counts


def allowed_count(nft: Nft, interface: str) -> int:
    """Elements of the allow set that belong to ``interface``'s agent."""
    listing = nft.listing("set", family=ruleset.FAMILY, table=ruleset.TABLE, name=ruleset.ALLOW_SET) or []
    return sum(
        1
        for item in listing
        if "set" in item
        for elem in item["set"].get("elem", [])
        if elem["elem"]["val"]["concat"][0] == interface
    )


def bench_nets() -> list[AgentNet]:
    return [AgentNet(agent_name(i), f"nb-b{i:03d}", IPv4Address(f"10.201.{i}.1")) for i in range(AGENTS)]


def dry_run_ns(namespaces: FreshNamespaces, commands: list[JSONObject]) -> int:
    """libnftables' whole userspace path for ``commands`` (parse, cache fetch, evaluation, batch), without a commit."""
    namespaces.enter()
    ctx = nftables.Nftables()
    ctx.set_json_output(True)
    ctx.json_cmd({"nftables": [{"list": {"tables": None}}]})  # warmed up like the Nft contexts
    ctx.set_dry_run(True)
    started = time.perf_counter_ns()
    rc, _, error = ctx.json_cmd({"nftables": commands})
    took = time.perf_counter_ns() - started
    if rc != 0:
        raise RuntimeError(f"dry run refused: {error}")
    return took


def transaction_phase(namespaces: FreshNamespaces, runs: int) -> dict[str, Any]:
    """(1): the arms interleaved, each run in new namespaces, after one untimed round (first use is slower)."""
    nets = bench_nets()
    full = ruleset.replace_table(UPLINK, nets)
    one = ruleset.replace_table(UPLINK, nets[:1])
    base = ruleset.replace_table(UPLINK)
    started = time.perf_counter_ns()
    ruleset.replace_table(UPLINK, nets)
    build_ns = time.perf_counter_ns() - started
    timings: dict[str, list[int]] = {"full": [], "one": [], "base": [], "dry": [], "replace": []}
    objects: dict[str, int] = {}
    for run in range(-1, runs):
        results: dict[str, int] = {}
        for arm, commands in (("full", full), ("one", one), ("base", base)):
            nft = namespaces.nft()
            results[arm] = timed_apply(nft, commands)
            if arm == "full":
                objects = table_counts(nft)
                results["replace"] = timed_apply(nft, full)  # what a restart does: the table exists already
        results["dry"] = dry_run_ns(namespaces, full)
        if run >= 0:
            for arm, took in results.items():
                timings[arm].append(took)
            log(f"  (1) run {run + 1}/{runs}: {AGENTS} agents {ms(results['full']):.1f} ms")
    return {
        "commands": {"full": len(full), "one": len(one), "base": len(base)},
        "json_bytes": len(json.dumps({"nftables": full})),
        "build_ns": build_ns,
        "objects": objects,
        "apply": timings,
    }


@dataclass(frozen=True)
class Insertions:
    """``count`` elements put in one allow set by ``transactions`` transactions in ``ns``; ``stored`` found after."""

    count: int
    transactions: int
    ns: int
    stored: int

    @property
    def rate(self) -> float:
        return self.count / (self.ns / 1e9)

    def checked(self, what: str) -> Insertions:
        if self.stored != self.count:
            raise RuntimeError(f"{what}: the allow set holds {self.stored} elements, not {self.count}")
        return self


def insert(nft: Nft, net: AgentNet, transactions: int, per_transaction: int) -> Insertions:
    """Distinct new elements, ``per_transaction`` in each ``ruleset.admit`` batch (built inside the timing)."""
    started = time.perf_counter_ns()
    for j in range(transactions):
        chunk = [
            ((net.interface, element(j * per_transaction + k), PORT), ELEMENT_TIMEOUT_S) for k in range(per_transaction)
        ]
        nft.apply(ruleset.admit(chunk))
    took = time.perf_counter_ns() - started
    return Insertions(transactions * per_transaction, transactions, took, allowed_count(nft, net.interface))


def insertion_phase(namespaces: FreshNamespaces, single: int, single_small: int, batches: int) -> dict[str, Any]:
    """(2): for agent 0 (a) and agent 1 (b) of a 100-agent table; (a') for the agent of a 1-agent table."""
    nets = bench_nets()
    nft = namespaces.nft()
    nft.apply(ruleset.replace_table(UPLINK, nets))
    one = insert(nft, nets[0], single, 1).checked("(2a)")
    log(f"  (2a) {single:,} one-element transactions")
    many = insert(nft, nets[1], batches, BATCH).checked("(2b)")
    log(f"  (2b) {batches} transactions of {BATCH} elements")
    nft = namespaces.nft()
    nft.apply(ruleset.replace_table(UPLINK, nets[:1]))
    small = insert(nft, nets[0], single_small, 1).checked("(2a')")
    log(f"  (2a') {single_small:,} one-element transactions, 1-agent table")
    return {"single": asdict(one), "batch": asdict(many), "small": asdict(small)}


class _IdleProxy:
    """Stands in for the DNS proxy when the controller is driven directly."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def set_allow(self, allow: AllowList) -> None:
        return None


async def covered_admits(controller: Controller, agent: str, admission: Admission, calls: int) -> int:
    """ns per Controller.admit of an element that is already in the set with most of its time left (no transaction)."""
    started = time.perf_counter_ns()
    for _ in range(calls):
        await controller.admit(agent, [admission])
    return (time.perf_counter_ns() - started) // calls


async def controller_phase(admits: int) -> dict[str, Any]:
    """(1f) 100 Controller.add_agent calls; (2c) Controller.admit, one new element per call; (2d) its no-op path."""
    nets = bench_nets()
    gateways = {net.interface: net.gateway for net in nets}

    async def lookup(interface: str) -> IPv4Address:
        return gateways[interface]

    def proxies(agent: str, gateway: IPv4Address, allow: AllowList, admit: Admit, denied: Denied) -> _IdleProxy:
        return _IdleProxy()

    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp:
        config = ControllerConfig(uplink=UPLINK, state_dir=Path(tmp), min_ttl=1, max_ttl=ELEMENT_TIMEOUT_S)
        controller = Controller(config, nft=Nft(), proxy_factory=proxies, lookup=lookup)
        await controller.start()
        started = time.perf_counter_ns()
        for i, net in enumerate(nets):
            await controller.add_agent(net.agent, net.interface, allow_list(i))
        add_ns = time.perf_counter_ns() - started
        agent = nets[0].agent
        admissions = [Admission(element(k), PORT, ELEMENT_TIMEOUT_S, new_name(k)) for k in range(admits + 1)]
        probe = admissions.pop()  # admitted first; asked again before and after the others
        await controller.admit(agent, [probe])
        covered_one = await covered_admits(controller, agent, probe, admits)
        started = time.perf_counter_ns()
        for admission in admissions:
            await controller.admit(agent, [admission])
        admit_ns = time.perf_counter_ns() - started
        covered_many = await covered_admits(controller, agent, probe, admits)
        status = await controller.status(agent)
    admitted = Insertions(admits, admits, admit_ns, len(status["agent"]["addresses"]) - 1).checked("(2c)")
    return {"add_ns": add_ns, "admit": asdict(admitted), "covered_one_ns": covered_one, "covered_many_ns": covered_many}


def tables_worker(settings: Settings) -> dict[str, Any]:
    """Phases (1) and (2), every measurement in a network namespace created for it; JSON-able results."""
    namespaces = FreshNamespaces()
    out = transaction_phase(namespaces, settings.runs)
    out["insertions"] = insertion_phase(namespaces, settings.single, settings.single_small, settings.batches)
    namespaces.enter()  # before asyncio.run, whose executor threads then start in this namespace
    out["controller"] = asyncio.run(controller_phase(settings.controller_admits))
    log(f"  (1f, 2c) Controller.add_agent x{AGENTS}, Controller.admit x{settings.controller_admits:,}")
    return out


# ------------------------------------------------------------------------ worker: the DNS client (agent netns)


def client_worker(plan_path: Path) -> dict[str, Any]:
    """Ask every question of the plan in order, one at a time; per arm, the latencies (ns) of the timed part."""
    plan = json.loads(plan_path.read_text())
    socks: dict[str, socket.socket] = {}
    for arm, server in plan["servers"].items():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((server, 53))
        sock.settimeout(QUERY_TIMEOUT_S)
        socks[arm] = sock
    rng = random.Random(7)

    def build(items: list[list[str]]) -> list[tuple[str, bytes, str]]:
        built = []
        for arm, name, expect in items:
            query = dns.message.make_query(name, "A")
            query.id = rng.randrange(1 << 16)
            built.append((arm, query.to_wire(), expect))
        return built

    def ask(arm: str, wire: bytes) -> tuple[int, bytes | None]:
        sock = socks[arm]
        start = time.perf_counter_ns()
        sock.send(wire)
        try:
            while True:
                data = sock.recv(4096)
                if data[:2] == wire[:2]:  # a late reply to an earlier, timed-out question is skipped
                    return time.perf_counter_ns() - start, data
        except TimeoutError:
            return time.perf_counter_ns() - start, None

    for arm, wire, _ in build(plan["warmup"]):
        ask(arm, wire)
    latencies: dict[str, list[int]] = {arm: [] for arm in socks}
    replies: list[tuple[str, bytes | None, str]] = []
    for arm, wire, expect in build(plan["samples"]):
        took, data = ask(arm, wire)
        latencies[arm].append(took)
        replies.append((arm, data, expect))
    problems: list[str] = []
    for arm, data, expect in replies:
        if data is None:
            problems.append(f"{arm}: no reply within {QUERY_TIMEOUT_S} s")
            continue
        reply = dns.message.from_wire(data)
        addresses = [rd.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]
        if reply.rcode() != dns.rcode.NOERROR or addresses != [expect]:
            problems.append(f"{arm}: {dns.rcode.to_text(reply.rcode())} {addresses}, expected {expect}")
    for sock in socks.values():
        sock.close()
    return {"latencies": latencies, "problems": problems[:20], "failed": len(problems)}


# ---------------------------------------------------------------------------------------------- orchestration


def run_worker(argv: list[str], netns: str | None = None, timeout: float = 300) -> Any:
    """Run this module as a worker (inside ``netns`` when given); the JSON it prints on stdout."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run(
        [*prefix, PYTHON, "-m", "bench.egress_bench", "--worker", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {argv[0]} failed with status {result.returncode}")
    return json.loads(result.stdout)


class EgressDaemon(DaemonProcess):
    """``python -m egress serve`` inside the appliance namespace, its socket, registry and resolv.conf in ``root``.

    --min-ttl 1 lets scenario (ii') ask for a 1-second element; every other name has TTL 300, clamped to 300.
    """

    name = "egress"

    def __init__(self, root: Path, netns: str) -> None:
        super().__init__(root)
        self.netns = netns
        self.socket = root / "egress.sock"
        self.resolv = root / "resolv.conf"
        root.mkdir(parents=True, exist_ok=True)
        self.resolv.write_text(f"nameserver {topology.DNS_SERVER}\n")

    def argv(self) -> list[str]:
        return [
            *("ip", "netns", "exec", self.netns, PYTHON, "-m", "egress", "serve"),
            *("--socket", str(self.socket), "--uplink", topology.UPLINK, "--resolv-conf", str(self.resolv)),
            *("--state-dir", str(self.root / "state"), "--min-ttl", "1", "--max-ttl", str(ELEMENT_TIMEOUT_S)),
        ]

    def client(self) -> Client:
        return Client(f"unix:{self.socket}", timeout=60)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        with self.client() as client:
            return client.call(op, **params)

    def errors(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines() if "ERROR" in line]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    note: str


SCENARIOS: Final = (
    Scenario("i", "(3i) cached", "one name asked again and again; its element is in the set: no nft transaction"),
    Scenario("ii", "(3ii) new element", "a new name under *.bench.test every question: one admission transaction"),
    Scenario("ii'", "(3ii') refresh", "one name with TTL 1: its element is re-added (add; delete; add) every question"),
    Scenario("i'", "(3i') cached, after (ii)", "as (i), once the controller tracks the elements (ii) admitted"),
    Scenario("ii@100", "(3ii@100) new element", "as (ii), with 100 agents in the table"),
    Scenario("i@100", "(3i@100) cached", "as (i), with 100 agents in the table"),
)


@dataclass(frozen=True)
class DnsResult:
    direct: list[int]
    proxy: list[int]
    failed: int
    problems: list[str]
    #: CPU seconds the daemon spent over the whole scenario (warm-up included), and the questions it answered.
    daemon_cpu_s: float
    proxied: int


def pairs(items: list[tuple[str, str]]) -> list[list[str]]:
    """Each (name, address) asked directly and through the proxy, back to back, which goes first alternating."""
    plan: list[list[str]] = []
    for index, (name, address) in enumerate(items):
        two = [["direct", name, address], ["proxy", name, address]]
        plan.extend(two if index % 2 == 0 else two[::-1])
    return plan


class DnsBench:
    def __init__(self, topo: topology.Topology, daemon: EgressDaemon, samples: int, warmup: int) -> None:
        self.topo = topo
        self.daemon = daemon
        self.link = topo.agent()
        self.samples = samples
        self.warmup = warmup
        self.next_name = 0
        self.results: dict[str, DnsResult] = {}

    def run(self, key: str, warmup: list[tuple[str, str]], samples: list[tuple[str, str]]) -> None:
        plan = {
            "servers": {"direct": str(topology.DNS_SERVER), "proxy": str(self.link.gateway)},
            "warmup": pairs(warmup),
            "samples": pairs(samples),
        }
        path = self.topo.dir / f"plan-{len(self.results)}.json"
        path.write_text(json.dumps(plan))
        cpu = process_cpu_s(self.daemon.pid)
        out = run_worker(["client", str(path)], netns=self.link.netns)
        cpu = process_cpu_s(self.daemon.pid) - cpu
        latencies = out["latencies"]
        result = DnsResult(
            sorted(latencies["direct"]),
            sorted(latencies["proxy"]),
            out["failed"],
            out["problems"],
            cpu,
            len(warmup) + len(samples),
        )
        self.results[key] = result
        added = ms(percentile(result.proxy, 50) - percentile(result.direct, 50))
        log(f"  ({key}) {len(samples):,} pairs, added p50 {added:.3f} ms, {result.failed} failed")

    def cached(self, key: str) -> None:
        item = (CACHED_NAME, CACHED_ADDRESS)
        self.run(key, [item] * self.warmup, [item] * self.samples)

    def refresh(self, key: str) -> None:
        item = (REFRESH_NAME, REFRESH_ADDRESS)
        self.run(key, [item] * self.warmup, [item] * self.samples)

    def new_names(self, key: str) -> int:
        """Scenario (ii): every question a name never asked before; how many elements the allow set gained."""
        first = self.next_name
        self.next_name += self.warmup + self.samples
        names = [(new_name(k), str(element(k))) for k in range(first, self.next_name)]
        before = self.admitted_names()
        self.run(key, names[: self.warmup], names[self.warmup :])
        return self.admitted_names() - before

    def admitted_names(self) -> int:
        """Elements of the new-name scenarios in the agent's allow set, as the kernel lists them (daemon status)."""
        addresses = self.daemon.call("status", agent=BENCH_AGENT)["agent"]["addresses"]
        return sum(IPv4Address(a["address"]) in ELEMENT_RANGE for a in addresses)


def new_name(k: int) -> str:
    return f"n{k}.{DOMAIN}"


def add_more_agents(topo: topology.Topology, daemon: EgressDaemon, count: int) -> float:
    """``count`` more agents on veth pairs inside the appliance (each gets its own DNS proxy); seconds taken.

    Veth rather than dummy links: the host kernel may lack the dummy link type.
    """
    lines: list[str] = []
    for i in range(1, count + 1):
        lines += [
            f"link add nbd{i} type veth peer name nbq{i}",
            f"addr add 10.201.{i}.1/30 dev nbd{i}",
            f"link set nbd{i} up",
            f"link set nbq{i} up",
        ]
    subprocess.run(
        ["ip", "-n", topo.appliance, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True, timeout=60
    )
    started = time.perf_counter()
    with daemon.client() as client:
        for i in range(1, count + 1):
            client.call("add_agent", agent=agent_name(i), interface=f"nbd{i}", allow=allow_list(i))
    return time.perf_counter() - started


def dns_phase(samples: int, warmup: int) -> tuple[dict[str, DnsResult], dict[str, Any]]:
    """(3): the topology, the daemon with one agent, then the scenarios in order."""
    zone: dict[str, list[tuple[str, str, int]]] = {
        CACHED_NAME: [("A", CACHED_ADDRESS, ELEMENT_TIMEOUT_S)],
        REFRESH_NAME: [("A", REFRESH_ADDRESS, 1)],
        **{new_name(k): [("A", str(element(k)), ELEMENT_TIMEOUT_S)] for k in range(2 * (warmup + samples))},
    }
    info: dict[str, Any] = {"new names": warmup + samples}
    with topology.Topology(zone=zone, agents=("a1",)) as topo:
        link = topo.agent()
        log(f"topology up: agent {link.netns}, appliance {topo.appliance}")
        daemon = EgressDaemon(topo.dir / "egress", topo.appliance)
        try:
            daemon.start()
            added = daemon.call("add_agent", agent=BENCH_AGENT, interface=link.iface, allow=allow_list(0))
            if added["interface"] != link.iface:
                raise RuntimeError(f"the daemon put the agent on {added['interface']}, not {link.iface}")
            # The direct arm's way out: egress drops UDP from an agent to anything but its gateway, so one rule at
            # the head of the agents' forward chain lets its questions to the upstream server through.
            accept = ["ip", "daddr", str(topology.DNS_SERVER), "udp", "dport", "53", "accept"]
            topology.run(
                topo.appliance, ["nft", "insert", "rule", ruleset.FAMILY, ruleset.TABLE, ruleset.FORWARD_CHAIN, *accept]
            )
            bench = DnsBench(topo, daemon, samples, warmup)
            bench.cached("i")
            bench.refresh("ii'")
            info["admitted ii"] = bench.new_names("ii")
            bench.cached("i'")
            log(f"adding {AGENTS - 1} agents on veth pairs inside the appliance")
            info["add_agents_s"] = add_more_agents(topo, daemon, AGENTS - 1)
            info["agents"] = len(daemon.call("list")["agents"])
            info["admitted ii@100"] = bench.new_names("ii@100")
            bench.cached("i@100")
            info["allow_set_final"] = bench.admitted_names()
        finally:
            daemon.close()
            info["daemon_errors"] = daemon.errors()[:5]
    return bench.results, info


# ------------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Settings:
    quick: bool
    runs: int
    single: int
    single_small: int
    batches: int
    controller_admits: int
    samples: int
    warmup: int


def parse_args(argv: list[str] | None) -> tuple[Settings, list[str] | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 runs, 200 DNS samples per scenario")
    parser.add_argument("--runs", type=int, default=None, help="timed runs of each (1) transaction (7)")
    parser.add_argument("--samples", type=int, default=None, help="timed DNS questions per arm and scenario (1,000)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick: bool = args.quick
    settings = Settings(
        quick=quick,
        runs=args.runs if args.runs is not None else (3 if quick else 7),
        single=300 if quick else 2_000,
        single_small=1_000 if quick else 5_000,
        batches=5 if quick else 30,
        controller_admits=300 if quick else 1_000,
        samples=args.samples if args.samples is not None else (200 if quick else 1_000),
        warmup=50 if quick else 100,
    )
    if settings.runs < 1 or settings.samples < 1:
        parser.error("--runs and --samples must be at least 1")
    worker: list[str] | None = args.worker
    return settings, worker


def machine_info() -> list[str]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return [
        f"nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {platform.machine()}, "
        f"kernel {platform.release()}",
        f"python {platform.python_version()} ({sys.executable}), {nft}, dnspython {dns.version.version}",
    ]


def median_ms(values: list[int]) -> float:
    return ms(statistics.median(values))


def spread(values: list[int]) -> str:
    return " ".join(f"{ms(v):.1f}" for v in values)


def transaction_rows(report: Report, out: dict[str, Any], runs: int) -> None:
    apply = out["apply"]
    full, one, base = median_ms(apply["full"]), median_ms(apply["one"]), median_ms(apply["base"])
    commands, objects = out["commands"], out["objects"]
    report.section(
        f"(1) one transaction: replace_table, Nft.apply, each run in a new network namespace, median of {runs}"
    )
    report.add(
        f"(1) {AGENTS} agents x {NAMES_PER_AGENT} names",
        f"{full:.1f}",
        "ms",
        f"{full / one:.1f} x (1b); target <= {TARGET_APPLY_MS:.0f} ms",
        verdict(full <= TARGET_APPLY_MS),
    )
    report.add("(1b) 1 agent (baseline)", f"{one:.2f}", "ms", "1.00 (baseline)")
    report.add(
        f"(1) ruleset size, {AGENTS} agents",
        f"{commands['full']:,}",
        "commands",
        f"{commands['one']} for 1 agent, {commands['base']} for none; {out['json_bytes'] / 1024:.0f} KiB of JSON",
    )
    report.add(
        f"(1) what the kernel holds, {AGENTS} agents",
        f"{objects['rule']:,}",
        "rules",
        f"{objects['chain']} chains, {objects['set']} sets, {objects['map']} maps, {objects['counter']} counters, "
        f"{objects['element']:,} set elements",
    )
    report.section("(1) diagnostics")
    report.add("(1c) base table only, no agent", f"{base:.2f}", "ms", f"{base / one:.2f} x (1b)")
    dry = median_ms(apply["dry"])
    report.add(f"(1d) {AGENTS} agents, libnftables dry run", f"{dry:.1f}", "ms", f"{dry / full:.2f} x (1)")
    replace = median_ms(apply["replace"])
    report.add(f"(1e) {AGENTS} agents over an existing one", f"{replace:.1f}", "ms", f"{replace / full:.2f} x (1)")
    report.add(
        "(1) building the command list (Python)",
        f"{ms(out['build_ns']):.1f}",
        "ms",
        f"{ms(out['build_ns']) / full:.2f} x (1)",
    )
    per_add = ms(out["controller"]["add_ns"]) / AGENTS
    report.add(
        f"(1f) Controller.add_agent x{AGENTS}, mean",
        f"{per_add:.2f}",
        "ms/agent",
        f"{per_add * AGENTS / full:.1f} x (1) in total",
    )
    report.notes.append(
        f"(1) the 20 names of an agent live in the controller's allow list: its allow set starts empty, so names add "
        f"nothing to the transaction. Runs, ms: {AGENTS} agents {spread(apply['full'])}; 1 agent {spread(apply['one'])}"
    )
    report.notes.append(
        "(1d) parse, cache fetch, evaluation and batch building in libnftables without the commit; "
        "(1e) the restart case: add; delete; rebuild over a table that holds 100 agents; "
        "(1f) 100 add_agent calls on a running Controller, one transaction and one registry fsync each"
    )


def insertion_rows(report: Report, out: dict[str, Any]) -> None:
    single, batch, small = (Insertions(**out["insertions"][k]) for k in ("single", "batch", "small"))
    via = Insertions(**out["controller"]["admit"])
    report.section(
        f"(2) allow-set elements for one agent (ifname . ipv4_addr . inet_service, timeout), {AGENTS}-agent table"
    )
    report.add(
        "(2a) 1 element per transaction",
        f"{single.rate:,.0f}",
        "elements/s",
        f"(a)/(b) = {single.rate / batch.rate:.3f}; {1e3 / single.rate:.2f} ms per transaction",
    )
    report.add(
        f"(2b) {BATCH} elements per transaction (baseline)", f"{batch.rate:,.0f}", "elements/s", "1.00 (baseline)"
    )
    report.section("(2) diagnostics")
    report.add(
        "(2a') 1 element per transaction, 1-agent table",
        f"{small.rate:,.0f}",
        "elements/s",
        f"{small.rate / single.rate:.1f} x (2a); {1e3 / small.rate:.2f} ms per transaction",
    )
    report.add(
        "(2c) Controller.admit, 1 element per call",
        f"{via.rate:,.0f}",
        "elements/s",
        f"{via.rate / single.rate:.2f} x (2a); {1e3 / via.rate:.2f} ms per call",
    )
    one, many = ms(out["controller"]["covered_one_ns"]), ms(out["controller"]["covered_many_ns"])
    report.add(
        "(2d) Controller.admit, no transaction, 1 grant",
        f"{one:.3f}",
        "ms/call",
        "element live in the set: the DNS fast path",
    )
    report.add(
        f"(2d) the same, {via.count + 1:,} grants tracked",
        f"{many:.3f}",
        "ms/call",
        f"{many / one:.0f} x 1 grant",
    )
    report.notes.append(
        f"(2) distinct new elements, each batch ruleset.admit's add; delete; add; (a) {single.count:,} transactions, "
        f"(b) {batch.transactions} x {BATCH}, (a') {small.count:,}, (c) {via.count:,}; every set's size checked after"
    )


def dns_rows(report: Report, results: dict[str, DnsResult], info: dict[str, Any], samples: int) -> None:
    report.section(
        f"(3) DNS over UDP from the agent namespace, {samples:,} questions per arm, direct and proxy alternating"
    )
    for scenario in SCENARIOS:
        result = results[scenario.key]
        d50, p50 = ms(percentile(result.direct, 50)), ms(percentile(result.proxy, 50))
        d99, p99 = ms(percentile(result.direct, 99)), ms(percentile(result.proxy, 99))
        cpu = result.daemon_cpu_s * 1e3 / result.proxied
        report.add(
            f"{scenario.title}: p50 direct / proxy",
            f"{d50:.3f} / {p50:.3f}",
            "ms",
            f"{p50 / d50:.2f} x direct; daemon CPU {cpu:.2f} ms/question",
        )
        report.add(
            f"{scenario.title}: added p50",
            f"{p50 - d50:.3f}",
            "ms",
            f"target <= {TARGET_ADDED_P50_MS:.0f} ms",
            verdict(p50 - d50 <= TARGET_ADDED_P50_MS),
        )
        report.add(f"{scenario.title}: p99 direct / proxy", f"{d99:.3f} / {p99:.3f}", "ms", f"added {p99 - d99:.3f} ms")
        report.notes.append(f"({scenario.key}) {scenario.note}")
    failed = sum(r.failed for r in results.values())
    report.notes.append(
        "(3) direct: the same question to 198.51.100.53 through the same veths, the agent's forward chain (one "
        "benchmark rule at its head lets the UDP through) and masquerade; proxy: the agent's gateway, answered by "
        "the daemon after admitting into the kernel set; added = proxy - direct; daemon CPU: user + system time of "
        "the egress process over the scenario (warm-up included, nft transactions included) per proxied question"
    )
    report.notes.append(
        f"(3) every reply checked (NOERROR, exactly the zone's address): {failed} failed; the allow set gained "
        f"{info['admitted ii']:,} elements in (ii) and {info['admitted ii@100']:,} in (ii@100), for "
        f"{info['new names']:,} new names each (warm-up included); "
        f"{info['allow_set_final']:,} such elements at the end; {info['agents']} agents for the @100 rows, "
        f"the other {AGENTS - 1} added over the socket in {info['add_agents_s']:.1f} s"
    )
    for result in results.values():
        for problem in result.problems[:3]:
            report.notes.append(f"(3) problem: {problem}")
    for line in info["daemon_errors"]:
        report.notes.append(f"(3) daemon: {line}")


def main(argv: list[str] | None = None) -> int:
    settings, worker = parse_args(argv)
    if worker is not None:
        if worker[0] == "tables":
            result = tables_worker(settings)
        elif worker[0] == "client" and len(worker) == 2:
            result = client_worker(Path(worker[1]))
        else:
            raise SystemExit(f"unknown worker {worker}")
        print(json.dumps(result))
        return 0
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        raise SystemExit("the egress benchmark needs root, ip(8) and nft(8): it creates network namespaces")
    started = time.perf_counter_ns()
    info = machine_info()
    for line in info:
        log(line)
    log(f"(1) + (2) in new network namespaces, {settings.runs} runs")
    quick = ["--quick"] if settings.quick else []
    tables = run_worker(["tables", "--runs", str(settings.runs), *quick])
    log(f"(3) DNS: {settings.samples:,} questions per arm and scenario")
    results, dns_info = dns_phase(settings.samples, settings.warmup)
    report = Report()
    transaction_rows(report, tables, settings.runs)
    insertion_rows(report, tables)
    dns_rows(report, results, dns_info, settings.samples)
    elapsed = (time.perf_counter_ns() - started) / 1e9
    report.show("egress benchmark", info, f"total run time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
