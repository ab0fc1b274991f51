"""ABI test of the libkrun backend (cage.libkrun + cage.launcher) against libkrun-recorder, a test double.

libkrun is not installable here, so tests/cage/krun_recorder.c — compiled once per session with gcc — exports the
krun_* functions with libkrun.h's prototypes and records every call and argument as a JSON line.  The launcher is
exec'ed exactly as cage runs it, with ``--library`` pointing at the double; its krun_start_enter records the
process's credentials, cmdline and environment, then _exit(0)s in place of the VM taking over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import pytest

from cage.launcher import VSOCK_CTXGRAPH_PORT, Exit, LibkrunBackend, launcher_argv, spawn
from cage.libkrun import PROTOTYPES, KrunError, Libkrun, LibkrunUnavailable, libkrun_usable
from cage.vmspec import DEFAULT_RLIMITS, Backend, Rlimit, Share, SpecError, VmSpec

RECORDER_SOURCE = Path(__file__).with_name("krun_recorder.c")
SECRET = "sk-live-0123456789abcdef-SECRET"
CANARY = "NULLBOX_TEST_CANARY"
AGENT_UID, AGENT_GID = 65534, 65533  # different numbers, so swapped ids show
IS_ROOT = os.geteuid() == 0


# ----------------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Recorder:
    """Paths of the compiled test doubles (not libkrun)."""

    full: Path  # every krun_* function the binding knows
    no_virtiofs3: Path  # as a libkrun older than 1.18


@pytest.fixture(scope="session")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build libkrun-recorder")
    out = tmp_path_factory.mktemp("libkrun-recorder")
    # World-readable: the launcher loads it as root, but keep the directory usable after a privilege drop too.
    out.chmod(0o755)
    built = {}
    for name, extra in (
        ("libkrun-recorder.so", []),
        ("libkrun-recorder-no-virtiofs3.so", ["-DKRUN_RECORDER_NO_VIRTIOFS3"]),
    ):
        target = out / name
        argv = [gcc, "-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra", "-Werror", *extra]
        subprocess.run([*argv, "-o", str(target), str(RECORDER_SOURCE)], check=True, timeout=120)
        built[name] = target
    return Recorder(built["libkrun-recorder.so"], built["libkrun-recorder-no-virtiofs3.so"])


@dataclass(frozen=True)
class Call:
    name: str
    args: dict[str, Any]
    ret: int
    process: dict[str, Any] | None

    def value(self, arg: str) -> Any:
        return self.args[arg]["value"]

    def ctype(self, arg: str) -> str:
        return str(self.args[arg]["type"])


def read_calls(log: Path) -> list[Call]:
    if not log.exists():
        return []
    calls = []
    for line in log.read_bytes().decode("utf-8", "surrogateescape").splitlines():
        record = json.loads(line)
        calls.append(Call(record["call"], record["args"], record["ret"], record.get("process")))
    return calls


@dataclass(frozen=True)
class Run:
    returncode: int
    calls: list[Call]
    stderr: str

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def one(self, name: str) -> Call:
        matches = [c for c in self.calls if c.name == name]
        assert len(matches) == 1, f"{name} was called {len(matches)} times: {self.names}"
        return matches[0]


def launcher_env(log: Path, **extra: str) -> dict[str, str]:
    """The launcher's own environment: the recorder's controls plus a canary that must never reach the guest."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KRUN_RECORDER_LOG": str(log), CANARY: "canary-value", **extra}


def launch(spec: VmSpec, library: Path, tmp_path: Path, **recorder_env: str) -> Run:
    """Start the launcher the way cage does (cage.launcher.spawn) and collect what the double recorded."""
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    proc = spawn(spec, library=library, environ=launcher_env(log, **recorder_env), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    return Run(proc.returncode, read_calls(log), err.decode("utf-8", "replace"))


def make_spec(tmp_path: Path, **changes: Any) -> VmSpec:
    base = VmSpec(
        agent="researcher",
        vcpus=2,
        memory_mib=512,
        rootfs=tmp_path / "agents/researcher/rootfs",
        rootfs_kind="dir",
        command=("/usr/bin/agent", "--serve", "two words"),
        env={"OPENAI_API_KEY": SECRET, "LANG": "C.UTF-8"},
        tap="nb-1a2b3c",
        mac="52:54:00:ab:cd:ef",
        ctxgraph_socket=Path("/run/nullbox/ctxgraph/agents/researcher.sock"),
        uid=AGENT_UID,
        gid=AGENT_GID,
        shares=(
            Share("shared", tmp_path / "agents/researcher/data/shared", read_only=True),
            Share("out", tmp_path / "agents/researcher/data/out", read_only=False),
        ),
        workdir="/home/agent",
    )
    return replace(base, **changes)


@pytest.fixture
def inproc(recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Libkrun, Path]]:
    """The double loaded into this process from a private copy (the double keeps its log fd per load)."""
    copy = tmp_path / "libkrun-recorder-copy.so"
    shutil.copyfile(recorder.full, copy)
    log = tmp_path / "inproc.jsonl"
    monkeypatch.setenv("KRUN_RECORDER_LOG", str(log))
    yield Libkrun.load(copy), log


needs_root = pytest.mark.skipif(not IS_ROOT, reason="the launcher drops privileges, which needs root")


# ----------------------------------------------------------------------------------------------- the prototypes

_C_TO_CTYPES: dict[str, Any] = {
    "uint32_t": ctypes.c_uint32,
    "uint8_t": ctypes.c_uint8,
    "uint64_t": ctypes.c_uint64,
    "bool": ctypes.c_bool,
    "constchar*": ctypes.c_char_p,
    "char*": ctypes.c_char_p,
    "constchar*const[]": ctypes.POINTER(ctypes.c_char_p),
    "uint8_t*const": ctypes.POINTER(ctypes.c_uint8),
}


def c_prototypes(source: str) -> dict[str, tuple[Any, ...]]:
    """krun_* definitions in the double's C source → their parameter types as ctypes."""
    found: dict[str, tuple[Any, ...]] = {}
    for match in re.finditer(r"^int32_t (krun_\w+)\(([^)]*)\)\s*\{", source, re.MULTILINE):
        params = [p.strip() for p in match.group(2).split(",")]
        types: list[Any] = []
        for param in params:
            if param == "void":
                continue
            decl = re.fullmatch(r"(.*?)\b\w+(\[\])?", " ".join(param.split()))
            assert decl is not None, param
            types.append(_C_TO_CTYPES[(decl.group(1) + (decl.group(2) or "")).replace(" ", "")])
        found[match.group(1)] = tuple(types)
    return found


def test_binding_prototypes_match_the_c_signatures() -> None:
    """The binding's argtypes/restype equal the libkrun.h prototypes the double was written from."""
    in_c = c_prototypes(RECORDER_SOURCE.read_text())
    assert set(PROTOTYPES) <= set(in_c), set(PROTOTYPES) - set(in_c)
    for name, (restype, argtypes) in PROTOTYPES.items():
        assert restype is ctypes.c_int32, name
        assert argtypes == in_c[name], f"{name}: binding {argtypes} vs C {in_c[name]}"
    # The widths that matter most, spelled out.
    assert PROTOTYPES["krun_set_vm_config"][1] == (ctypes.c_uint32, ctypes.c_uint8, ctypes.c_uint32)
    assert PROTOTYPES["krun_has_feature"][1] == (ctypes.c_uint64,)


def test_declared_argtypes_are_installed_on_the_functions(inproc: tuple[Libkrun, Path]) -> None:
    krun, _ = inproc
    krun.require(list(PROTOTYPES))
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(krun._lib, name)
        assert fn.restype is restype and tuple(fn.argtypes) == argtypes, name


def test_integer_widths_survive_the_call(inproc: tuple[Libkrun, Path]) -> None:
    """Boundary values arrive intact; a narrower argtype would have cut them (e.g. u64 feature to u32)."""
    krun, log = inproc
    krun.set_vm_config(4_294_967_295, 255, 4_294_967_295)
    krun.add_vsock_port(4_000_000_000, 4_294_967_295, "/run/x.sock")
    assert krun.has_feature(1 << 40) is False
    krun.add_virtiofs3(1, "t", "/srv", shm_size=(1 << 64) - 1, read_only=False)
    config, vsock, feature, fs3 = read_calls(log)
    assert (config.value("ctx_id"), config.value("num_vcpus"), config.value("ram_mib")) == (2**32 - 1, 255, 2**32 - 1)
    assert (config.ctype("num_vcpus"), config.ctype("ram_mib")) == ("u8", "u32")
    assert (vsock.value("ctx_id"), vsock.value("port")) == (4_000_000_000, 2**32 - 1)
    assert feature.value("feature") == 1 << 40 and feature.ctype("feature") == "u64"
    assert fs3.value("shm_size") == 2**64 - 1 and fs3.value("read_only") is False


def test_values_ctypes_would_silently_truncate_are_refused(inproc: tuple[Libkrun, Path]) -> None:
    krun, log = inproc
    assert ctypes.c_uint8(300).value == 44  # why the binding range-checks: ctypes itself does not
    with pytest.raises(ValueError, match="vcpus"):
        krun.set_vm_config(7, 256, 512)
    with pytest.raises(ValueError, match="ram_mib"):
        krun.set_vm_config(7, 2, 1 << 32)
    with pytest.raises(ValueError, match="ctx"):
        krun.free_ctx(-1)
    with pytest.raises(ValueError, match="NUL"):
        krun.set_root(7, "/srv/root\x00/etc")
    with pytest.raises(ValueError, match="MAC"):
        krun.add_net_tap(7, "nb-x", b"\x52\x54\x00")
    assert read_calls(log) == []


def test_envp_none_is_never_passed(inproc: tuple[Libkrun, Path]) -> None:
    """NULL envp makes libkrun copy the host environment into the guest; the binding has no way to send it."""
    krun, log = inproc
    with pytest.raises(TypeError):
        krun.set_exec(7, "/bin/true", [], None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        krun.set_env(7, None)  # type: ignore[arg-type]
    krun.set_exec(7, "/bin/true", [], [])
    (call,) = read_calls(log)
    assert call.value("envp") == [] and call.value("argv") == []


def test_negative_errno_becomes_an_error_naming_the_call(
    inproc: tuple[Libkrun, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    krun, _ = inproc
    monkeypatch.setenv("KRUN_RECORDER_FAIL", "krun_add_vsock_port:19")
    with pytest.raises(KrunError) as caught:
        krun.add_vsock_port(7, 7000, "/run/x.sock")
    assert caught.value.call == "krun_add_vsock_port" and caught.value.errno == 19
    assert str(caught.value) == "krun_add_vsock_port failed: No such device (ENODEV, errno 19)"


# ----------------------------------------------------------------------------------------------- the launcher

TYPICAL_SEQUENCE = [
    "krun_set_log_level",
    "krun_has_feature",
    "krun_create_ctx",
    "krun_set_vm_config",
    "krun_set_root",
    "krun_set_exec",
    "krun_set_workdir",
    "krun_add_net_tap",
    "krun_add_vsock_port",
    "krun_add_virtiofs3",
    "krun_add_virtiofs",
    "krun_set_rlimits",
    "krun_set_console_output",
    "krun_start_enter",
]


@needs_root
def test_typical_launch_records_the_expected_calls(recorder: Recorder, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, console_log=tmp_path / "console.log")
    run = launch(spec, recorder.full, tmp_path, KRUN_RECORDER_CTX="2147483000")
    assert run.returncode == 0, run.stderr
    assert run.names == TYPICAL_SEQUENCE
    ctx = 2_147_483_000
    assert all(c.value("ctx_id") == ctx for c in run.calls if "ctx_id" in c.args)
    assert run.one("krun_set_log_level").value("level") == 2
    assert run.one("krun_has_feature").value("feature") == 0  # NET
    config = run.one("krun_set_vm_config")
    assert (config.value("num_vcpus"), config.value("ram_mib")) == (2, 512)
    assert run.one("krun_set_root").value("root_path") == str(spec.rootfs)
    exec_ = run.one("krun_set_exec")
    assert exec_.value("exec_path") == "/usr/bin/agent"
    assert exec_.value("argv") == ["--serve", "two words"]  # without argv[0]
    assert run.one("krun_set_workdir").value("workdir_path") == "/home/agent"
    ro = run.one("krun_add_virtiofs3")
    assert (ro.value("c_tag"), ro.value("c_path"), ro.value("read_only")) == (
        "shared",
        str(spec.shares[0].host_path),
        True,
    )
    assert ro.value("shm_size") == 0
    rw = run.one("krun_add_virtiofs")
    assert (rw.value("c_tag"), rw.value("c_path")) == ("out", str(spec.shares[1].host_path))
    assert run.one("krun_set_rlimits").value("rlimits") == ["4=0:0", "7=4096:4096"]
    assert run.one("krun_set_console_output").value("c_filepath") == str(tmp_path / "console.log")
    assert "krun_free_ctx" not in run.names


@needs_root
def test_envp_is_exactly_the_spec_and_never_the_launchers_environment(recorder: Recorder, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, env={"B": "2", "A": "1 with spaces", "OPENAI_API_KEY": SECRET})
    run = launch(spec, recorder.full, tmp_path)
    assert run.returncode == 0, run.stderr
    envp = run.one("krun_set_exec").value("envp")
    assert envp == ["A=1 with spaces", "B=2", f"OPENAI_API_KEY={SECRET}"]
    launcher_environ = run.one("krun_start_enter").process["environ"]  # type: ignore[index]
    assert f"{CANARY}=canary-value" in launcher_environ  # the canary really was in the launcher's environment
    assert not any(entry.startswith((CANARY, "KRUN_RECORDER_", "PATH=")) for entry in envp)

    empty = launch(make_spec(tmp_path, env={}), recorder.full, tmp_path)
    assert empty.returncode == 0, empty.stderr
    assert empty.one("krun_set_exec").value("envp") == []  # an empty array, not NULL


@needs_root
def test_tap_mac_and_ctxgraph_vsock_port(recorder: Recorder, tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), recorder.full, tmp_path)
    assert run.returncode == 0, run.stderr
    tap = run.one("krun_add_net_tap")
    assert tap.value("c_tap_name") == "nb-1a2b3c"
    assert tap.value("c_mac") == [0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF] and tap.ctype("c_mac") == "u8[6]"
    assert (tap.value("features"), tap.value("flags")) == (0, 0)
    vsock = run.one("krun_add_vsock_port")
    assert vsock.value("port") == VSOCK_CTXGRAPH_PORT == 7000
    assert vsock.value("c_filepath") == "/run/nullbox/ctxgraph/agents/researcher.sock"
    # The NIC is added before the VM starts, so libkrun never falls back to TSI.
    assert run.names.index("krun_add_net_tap") < run.names.index("krun_start_enter")


@needs_root
def test_privileges_are_dropped_before_krun_start_enter(recorder: Recorder, tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), recorder.full, tmp_path)
    assert run.returncode == 0, run.stderr
    process = run.one("krun_start_enter").process
    assert process is not None
    assert process["uid"] == [AGENT_UID] * 3
    assert process["gid"] == [AGENT_GID] * 3
    assert process["groups"] == []
    assert int(process["cap_eff"], 16) == 0
    assert process["cwd"] == "/"


@needs_root
def test_launcher_is_a_fresh_exec_and_secrets_stay_off_argv_and_logs(recorder: Recorder, tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    run = launch(spec, recorder.full, tmp_path, NULLBOX_LOG_LEVEL="DEBUG")
    assert run.returncode == 0, run.stderr
    process = run.one("krun_start_enter").process
    assert process is not None
    cmdline: list[str] = process["cmdline"]
    # Exec'ed as `python -I -m cage.launcher ...`: a fork of the test runner would still show pytest's argv.
    assert cmdline[:4] == [sys.executable, "-I", "-m", "cage.launcher"]
    assert cmdline == launcher_argv(config_fd=int(cmdline[5]), library=str(recorder.full))
    assert not any(SECRET in arg for arg in cmdline)
    assert not any(SECRET in entry for entry in process["environ"])
    assert "agent researcher" in run.stderr  # it does log, at DEBUG even
    assert SECRET not in run.stderr
    assert SECRET not in repr(spec)


def test_launcher_reads_the_spec_from_stdin(recorder: Recorder, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    spec = make_spec(tmp_path)
    argv = [sys.executable, "-I", "-m", "cage.launcher", "--library", str(recorder.full)]
    done = subprocess.run(
        argv,
        input=json.dumps(spec.to_json()).encode(),
        env=launcher_env(log),
        capture_output=True,
        timeout=60,
        check=False,
    )
    names = [c.name for c in read_calls(log)]
    if IS_ROOT:
        assert done.returncode == 0, done.stderr
        assert names == [n for n in TYPICAL_SEQUENCE if n != "krun_set_console_output"]
    else:
        assert done.returncode == Exit.NOPERM and "krun_start_enter" not in names
    assert SECRET.encode() not in done.stderr


FAILING_CALLS = [
    "krun_create_ctx",
    "krun_set_vm_config",
    "krun_set_root",
    "krun_set_exec",
    "krun_add_net_tap",
    "krun_add_vsock_port",
    "krun_add_virtiofs3",
    "krun_set_rlimits",
]


@pytest.mark.parametrize("call", FAILING_CALLS)
def test_a_failing_krun_call_stops_the_launch(recorder: Recorder, tmp_path: Path, call: str) -> None:
    run = launch(make_spec(tmp_path), recorder.full, tmp_path, KRUN_RECORDER_FAIL=f"{call}:2")
    assert run.returncode == Exit.KRUN
    assert f"{call} failed: No such file or directory (ENOENT, errno 2)" in run.stderr
    assert run.names[-1] in (call, "krun_free_ctx")
    assert "krun_start_enter" not in run.names
    if call != "krun_create_ctx":
        assert run.names[-1] == "krun_free_ctx"  # the context is released, not leaked
    assert SECRET not in run.stderr


@needs_root
def test_krun_start_enter_returning_is_a_failure(recorder: Recorder, tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), recorder.full, tmp_path, KRUN_RECORDER_FAIL="krun_start_enter:2")
    assert run.returncode == Exit.KRUN
    assert "krun_start_enter failed: No such file or directory" in run.stderr
    assert run.names[-1] == "krun_start_enter"


def test_libkrun_without_virtio_net_is_refused_before_any_context(recorder: Recorder, tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), recorder.full, tmp_path, KRUN_RECORDER_FEATURES="1")
    assert run.returncode == Exit.UNAVAILABLE
    assert "without virtio-net" in run.stderr
    assert run.names == ["krun_set_log_level", "krun_has_feature"]


def test_read_only_share_without_virtiofs3_is_refused_not_made_writable(recorder: Recorder, tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), recorder.no_virtiofs3, tmp_path)
    assert run.returncode == Exit.UNAVAILABLE
    assert "krun_add_virtiofs3" in run.stderr
    assert run.calls == []  # refused before the first call


def test_missing_library_is_unavailable(tmp_path: Path) -> None:
    run = launch(make_spec(tmp_path), tmp_path / "no-such-libkrun.so.1", tmp_path)
    assert run.returncode == Exit.UNAVAILABLE
    assert "cannot be loaded" in run.stderr


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"agent": "x"}', "invalid VM spec"),
        (b"[]", "must be a JSON object"),
    ],
)
def test_unreadable_spec_exits_with_the_config_status(
    recorder: Recorder, tmp_path: Path, document: bytes, message: str
) -> None:
    log = tmp_path / "calls.jsonl"
    argv = [sys.executable, "-I", "-m", "cage.launcher", "--library", str(recorder.full)]
    done = subprocess.run(argv, input=document, env=launcher_env(log), capture_output=True, timeout=60, check=False)
    assert done.returncode == Exit.CONFIG
    assert message in done.stderr.decode()
    assert not log.exists()


def test_invalid_values_are_refused_before_libkrun_is_touched(recorder: Recorder, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    data = make_spec(tmp_path).to_json()
    for key, value in [("vcpus", 256), ("memory_mib", 1 << 32), ("uid", 0), ("rootfs_kind", "squashfs")]:
        bad = dict(data, **{key: value})
        argv = [sys.executable, "-I", "-m", "cage.launcher", "--library", str(recorder.full)]
        done = subprocess.run(
            argv, input=json.dumps(bad).encode(), env=launcher_env(log), capture_output=True, timeout=60, check=False
        )
        assert done.returncode == Exit.CONFIG, key
        assert not log.exists(), key
        assert SECRET.encode() not in done.stderr


def test_bad_launcher_arguments_are_a_usage_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-I", "-m", "cage.launcher", "--no-such-option"]
    done = subprocess.run(
        argv, input=b"", env=launcher_env(tmp_path / "x"), capture_output=True, timeout=60, check=False
    )
    assert done.returncode == Exit.USAGE


def test_exit_statuses_are_distinct_and_clear_of_libkrun_and_success() -> None:
    values = [int(e) for e in Exit]
    assert len(set(values)) == len(values)
    assert not set(values) & {0, 1, 2, 125, 126, 127}


@needs_root
def test_console_log_is_created_for_the_agent_and_symlinks_are_refused(recorder: Recorder, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    run = launch(make_spec(tmp_path, console_log=console), recorder.full, tmp_path)
    assert run.returncode == 0, run.stderr
    st = console.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (AGENT_UID, AGENT_GID, 0o600)

    victim = tmp_path / "victim"
    victim.write_text("root's file")
    trap = tmp_path / "trap.log"
    trap.symlink_to(victim)
    run = launch(make_spec(tmp_path, console_log=trap), recorder.full, tmp_path)
    assert run.returncode == Exit.HOST
    assert "krun_start_enter" not in run.names and run.names[-1] == "krun_free_ctx"
    assert victim.stat().st_uid == 0


UNPRIVILEGED_UID: Final = 1000  # neither root nor the spec's agent uid


def test_without_root_the_privilege_drop_fails_closed(
    recorder: Recorder, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """As a normal user the launcher cannot drop to the agent's ids and must not start the VM anyway.

    Under root (CI), the launcher's interpreter is started through a wrapper that first becomes an ordinary user,
    so this runs everywhere instead of being skipped where the suite runs.
    """
    # Outside pytest's temporary root, which only root may enter; the unprivileged launcher writes the log here.
    work = Path(tempfile.mkdtemp(prefix="krun-unprivileged-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    work.chmod(0o777)
    python = sys.executable
    library = work / recorder.full.name  # pytest's own temporary root is private to root
    shutil.copy2(recorder.full, library)
    if IS_ROOT:
        wrapper = work / "python-as-user"
        wrapper.write_text(
            f"#!{python}\nimport os, sys\nos.setgroups([])\nos.setgid({UNPRIVILEGED_UID})\n"
            f"os.setuid({UNPRIVILEGED_UID})\nos.execv({python!r}, [{python!r}, *sys.argv[1:]])\n"
        )
        wrapper.chmod(0o755)
        python = str(wrapper)
    log = work / "calls.jsonl"
    proc = spawn(make_spec(tmp_path), library=library, python=python, environ=launcher_env(log), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    names = [call.name for call in read_calls(log)]
    assert proc.returncode == Exit.NOPERM, err.decode("utf-8", "replace")
    assert "krun_create_ctx" in names and "krun_start_enter" not in names
    assert names[-1] == "krun_free_ctx"


# ------------------------------------------------------------------------------------------------- VmSpec


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, console_log=tmp_path / "c.log", rlimits=(Rlimit("NPROC", 64, 128),))
    assert VmSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert make_spec(tmp_path).rlimits == DEFAULT_RLIMITS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agent": "../etc"}, "agent"),
        ({"vcpus": 0}, "vcpus"),
        ({"mac": "53:54:00:00:00:01"}, "unicast"),
        ({"tap": "a-name-longer-than-15"}, "tap"),
        ({"command": ("relative/agent",)}, "absolute"),
        ({"shares": (Share("x", Path("/a"), True), Share("x", Path("/b"), False))}, "twice"),
        ({"rootfs": Path("/srv/../etc")}, "rootfs"),
        ({"env": {"KEY": 'with "quote" ' + SECRET}}, "KEY"),
        ({"env": {"BAD=NAME": "v"}}, "env names"),
    ],
)
def test_spec_validation_names_the_field_never_the_secret(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        make_spec(tmp_path, **change)
    assert SECRET not in str(caught.value)


def test_spec_refuses_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unknown"):
        VmSpec.from_json(dict(make_spec(tmp_path).to_json(), vpcus=2))


# --------------------------------------------------------------------------------------------- backend selection


def test_libkrun_is_not_usable_on_this_host() -> None:
    """No libkrun.so.1 here, and /dev/kvm (PVM) cannot run ordinary guests: False, with the reasons."""
    ok, reason = libkrun_usable()
    assert ok is False
    assert reason.startswith("libkrun is not usable: ")
    if ctypes.util.find_library("krun") is None:
        assert "libkrun.so.1 cannot be loaded" in reason
    assert "KVM" in reason


def test_a_loadable_library_is_not_enough_without_real_kvm(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRUN_RECORDER_LOG", os.devnull)
    flags = {
        w for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags") for w in line.split()
    }
    if flags & {"vmx", "svm"} and not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("this host may have real KVM")
    ok, reason = libkrun_usable(recorder.full)
    assert ok is False
    assert "loads with virtio-net" not in reason or "KVM cannot run ordinary guests" in reason
    assert "vmx" in reason or "kvm_pvm" in reason or "cannot be opened" in reason


def test_libkrun_usable_needs_both_halves(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRUN_RECORDER_LOG", os.devnull)
    real_kvm = lambda: (True, "KVM runs guests: (stubbed)")  # noqa: E731
    ok, reason = libkrun_usable(recorder.full, kvm_probe=real_kvm)
    assert ok is True, reason
    monkeypatch.setenv("KRUN_RECORDER_FEATURES", "1")
    ok, reason = libkrun_usable(recorder.full, kvm_probe=real_kvm)
    assert ok is False and "virtio-net" in reason
    ok, reason = libkrun_usable("/nonexistent/libkrun.so.1", kvm_probe=real_kvm)
    assert ok is False and "cannot be loaded" in reason


def test_backend_object(recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRUN_RECORDER_LOG", os.devnull)
    backend: Backend = LibkrunBackend(library=str(recorder.full))  # mypy checks it satisfies the protocol
    assert backend.name == "libkrun"
    assert backend.usable()[0] is False  # the double loads, but KVM here is not real
    with pytest.raises(LibkrunUnavailable, match="cannot be loaded"):
        Libkrun.load(tmp_path / "missing.so")
