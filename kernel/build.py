"""Build the NullBox kernels from Debian's linux-source-6.1: ``python -m kernel.build [appliance|guest|all]``.

Each variant is ``tinyconfig`` with kernel/<variant>.config merged over it (scripts/kconfig/merge_config.sh), then
``olddefconfig``; every option the fragment sets must come out exactly as asked, or the build stops.  Nothing is a
module (CONFIG_MODULES is off).

Inputs and caches, all under build/:
  cache/deb/linux-source-6.1_<ver>_all.deb    from ``apt-get download``, kept while its SHA-256 matches apt's index
  cache/linux-source/<ver>/linux-source-6.1/  the tarball inside it, extracted once (~1.5 GB) and shared read-only
Outputs, under build/kernel-nullbox/<variant>/:
  bzImage, vmlinux (guest only: QEMU's microvm boots it through its PVH note), .config, version (kernelrelease)
  obj/        the out-of-tree build directory (O=), kept so a changed fragment rebuilds only what it affects
  build.log   make's output
  config.json / build.json   the cache key of the last checked .config / the last complete build

The key is (source package version, fragment digest, this module's digest): a second run with nothing changed does
nothing.  ``--config-only`` stops after the checked .config (seconds, no compile).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from image.kernel import download_deb, sha256_file

REPO: Final = Path(__file__).resolve().parent.parent
KERNEL_DIR: Final = Path(__file__).resolve().parent
BUILD: Final = REPO / "build"

SOURCE_PACKAGE: Final = "linux-source-6.1"
SOURCE_TARBALL: Final = "usr/src/linux-source-6.1.tar.xz"  # inside the .deb
SOURCE_TOP: Final = "linux-source-6.1"  # the tarball's top directory
VARIANTS: Final = ("appliance", "guest")
ARCH: Final = "x86_64"  # not "x86": tinyconfig would then answer "no" to 64BIT and build an i386 kernel
# Debian packages the build runs: the compiler and make; flex and bison for kconfig's parser (6.1 no longer ships
# the generated files), bc for the timeconst header, libelf-dev for objtool (always built on x86_64), xz-utils to
# unpack the source tarball, zstd to compress the bzImage payload (CONFIG_KERNEL_ZSTD).  No libssl-dev: nothing
# here signs modules or embeds certificates.
BUILD_DEPS: Final = ("gcc", "make", "bc", "flex", "bison", "libelf-dev", "xz-utils", "zstd")
# Reproducible: the same timestamp, user and host in every build's version string (image builds use this epoch).
DEFAULT_SOURCE_DATE_EPOCH: Final = 1767225600
HEARTBEAT_S: Final = 30.0

_STARTED: Final = time.monotonic()


def log(message: str) -> None:
    print(f"[kernel {time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    pass


def run(argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run argv (a list, never a shell string) quietly; its output is returned, and shown only when it fails."""
    done = subprocess.run(
        list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-40:])
        raise BuildError(f"{' '.join(argv)} failed with status {done.returncode}:\n{tail}")
    return done.stdout


def probe(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run argv for its answer: output captured, a failure is the caller's to judge."""
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), so two runs do not download or extract the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------- build deps


def missing_build_deps(packages: Sequence[str] = BUILD_DEPS) -> list[str]:
    missing = []
    for package in packages:
        if probe(["dpkg-query", "-W", "-f=${db:Status-Status}", package]).stdout.strip() != "installed":
            missing.append(package)
    return missing


def ensure_build_deps() -> None:
    """Install missing BUILD_DEPS the way scripts/bootstrap.py installs its packages (root only)."""
    missing = missing_build_deps()
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing Debian packages {missing}: install them (as root) first")
    log(f"installing build dependencies {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


# ----------------------------------------------------------------------------------------------------- source


@dataclass(frozen=True)
class Source:
    version: str  # the Debian package version, e.g. 6.1.192-2
    tree: Path  # the extracted kernel tree


def package_record(package: str) -> dict[str, str]:
    """The candidate version's fields from apt's index (Version, SHA256, ...); apt-get update once if it is empty."""
    for attempt in range(2):
        shown = probe(["apt-cache", "show", "--no-all-versions", package])
        record: dict[str, str] = {}
        for line in shown.stdout.splitlines() if shown.returncode == 0 else []:
            key, sep, value = line.partition(": ")
            if sep and not key.startswith(" "):
                record.setdefault(key, value.strip())
        if record.get("Version"):
            return record
        if attempt == 0:  # a fresh machine: apt knows no packages until its index is fetched once
            log(f"apt-cache does not know {package}; running apt-get update once")
            run(["apt-get", "update", "-q"])
    raise BuildError(f"apt knows no {package} (is the Debian mirror reachable?)")


def fetch_source_deb(build: Path, record: dict[str, str]) -> Path:
    """build/cache/deb/<the .deb>, downloaded with `apt-get download` when missing or not matching apt's SHA-256."""
    version, expected = record["Version"], record.get("SHA256", "")
    cache = build / "cache" / "deb"
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{SOURCE_PACKAGE}_{version.replace(':', '%3a')}_all.deb"
    if cached.is_file() and (not expected or sha256_file(cached) == expected):
        return cached
    log(f"source: downloading {SOURCE_PACKAGE} {version}")
    try:
        download_deb(cached, SOURCE_PACKAGE, version, expected, lambda argv, cwd: run(argv, cwd=cwd))
    except BuildError:
        raise
    except RuntimeError as exc:
        raise BuildError(str(exc)) from None
    return cached


def prepare_source(build: Path = BUILD) -> Source:
    """The extracted tree of apt's candidate linux-source-6.1, fetched and extracted at most once per version."""
    cache = build / "cache" / "linux-source"
    with locked(cache / ".lock"):
        record = package_record(SOURCE_PACKAGE)
        version = record["Version"]
        home = cache / version.replace(":", "%3a")
        tree = home / SOURCE_TOP
        if (home / ".complete").is_file() and (tree / "Makefile").is_file():
            return Source(version, tree)
        deb = fetch_source_deb(build, record)
        started = time.monotonic()
        log(f"source: extracting {deb.name} (once per version)")
        if home.exists():
            shutil.rmtree(home)
        partial = cache / f".partial-{version.replace(':', '%3a')}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        inner = partial / "deb"
        run(["dpkg-deb", "-x", str(deb), str(inner)])  # the tarball and two doc files
        run(["tar", "-xJf", str(inner / SOURCE_TARBALL), "-C", str(partial)])
        shutil.rmtree(inner)
        if not (partial / SOURCE_TOP / "Makefile").is_file():
            raise BuildError(f"{deb.name}: its tarball has no {SOURCE_TOP}/Makefile")
        (partial / ".complete").write_text(f"{version}\n")
        partial.replace(home)
        for other in cache.iterdir():
            if other.is_dir() and other != home:
                shutil.rmtree(other)  # ~1.5 GB per old version
        log(f"source: {version} extracted in {time.monotonic() - started:.0f}s")
        return Source(version, tree)


# ----------------------------------------------------------------------------------------------------- config

_SET: Final = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_UNSET: Final = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


def parse_config(text: str, *, strict: bool = False) -> dict[str, str]:
    """``{"CONFIG_X": value}`` from .config syntax; "is not set" reads as "n".  ``strict`` (for fragments): any
    other non-comment line, or an option given twice, is an error."""
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        found = _SET.fullmatch(line) or _UNSET.fullmatch(line)
        if found is None:
            if strict and line and not line.startswith("#"):
                raise ValueError(f"line {number}: not an option: {raw!r}")
            continue
        name, value = found.group(1), found.group(2) if found.re is _SET else "n"
        if strict and name in options:
            raise ValueError(f"line {number}: {name} is set twice")
        options[name] = value
    return options


def check_config(wanted: dict[str, str], config: dict[str, str]) -> list[str]:
    """What in ``config`` differs from ``wanted`` (a fragment); an option absent from .config counts as not set."""
    problems = []
    for name, value in wanted.items():
        got = config.get(name, "n")
        if got != value:
            problems.append(f"{name}: asked {value}, got {got if name in config else 'n (not offered)'}")
    if config.get("CONFIG_MODULES", "n") != "n":
        problems.append("CONFIG_MODULES is set: the kernel must have no loadable modules")
    return problems


def fragment_path(variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r} (one of {', '.join(VARIANTS)})")
    return KERNEL_DIR / f"{variant}.config"


def fragment(variant: str) -> dict[str, str]:
    return parse_config(fragment_path(variant).read_text(), strict=True)


def cache_key(variant: str, source: Source | str) -> dict[str, str]:
    """(variant, source package version, fragment digest, this module's digest); ``source`` or its version."""
    return {
        "variant": variant,
        "source": source if isinstance(source, str) else source.version,
        "fragment": sha256_file(fragment_path(variant)),
        "builder": sha256_file(Path(__file__)),
    }


def _key_matches(path: Path, key: dict[str, str]) -> bool:
    try:
        return bool(json.loads(path.read_text()) == key)
    except (OSError, ValueError):
        return False


def make_env() -> dict[str, str]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH))
    stamp = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(epoch))
    return {
        **os.environ,
        "LC_ALL": "C",
        "KBUILD_BUILD_TIMESTAMP": stamp,
        "KBUILD_BUILD_USER": "nullbox",
        "KBUILD_BUILD_HOST": "nullbox",
    }


def make_argv(source: Source, obj: Path, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(source.tree), f"O={obj}", f"ARCH={ARCH}", f"-j{jobs}", *targets]


def _prepare_obj(obj: Path, source: Source) -> None:
    """The O= directory; emptied when it was built from another source version (file times would mislead make)."""
    marker = obj / ".nullbox-source"
    if obj.exists() and (not marker.is_file() or marker.read_text().strip() != source.version):
        shutil.rmtree(obj)
    obj.mkdir(parents=True, exist_ok=True)
    marker.write_text(source.version + "\n")


def configure(variant: str, source: Source, out: Path) -> Path:
    """out/.config for ``variant``: tinyconfig + the fragment + olddefconfig, checked; reused while its key holds."""
    key = cache_key(variant, source)
    obj, config = out / "obj", out / ".config"
    if _key_matches(out / "config.json", key) and config.is_file() and (obj / ".config").is_file():
        log(f"{variant}: .config up to date")
        return config
    started = time.monotonic()
    (out / "config.json").unlink(missing_ok=True)
    (out / "build.json").unlink(missing_ok=True)
    _prepare_obj(obj, source)
    env = make_env()
    log(f"{variant}: make tinyconfig")
    run(make_argv(source, obj, "tinyconfig"), env=env)
    log(f"{variant}: merge {fragment_path(variant).relative_to(REPO)}")
    merge = source.tree / "scripts" / "kconfig" / "merge_config.sh"
    run([str(merge), "-m", "-O", str(obj), str(obj / ".config"), str(fragment_path(variant))], cwd=obj, env=env)
    log(f"{variant}: make olddefconfig")
    run(make_argv(source, obj, "olddefconfig"), env=env)
    problems = check_config(fragment(variant), parse_config((obj / ".config").read_text()))
    if problems:
        raise BuildError(f"{variant}: the .config is not what the fragment asks:\n  " + "\n  ".join(problems))
    shutil.copyfile(obj / ".config", config)
    (out / "config.json").write_text(json.dumps(key, indent=1) + "\n")
    log(f"{variant}: .config checked ({len(fragment(variant))} options as asked) in {time.monotonic() - started:.0f}s")
    return config


def outputs(variant: str) -> tuple[str, ...]:
    """What a complete build leaves in the variant's directory."""
    return ("bzImage", ".config", "version") + (("vmlinux",) if variant == "guest" else ())


def _compile(argv: list[str], env: dict[str, str], logfile: Path, what: str) -> None:
    """Run make with its output in ``logfile``; a progress line every HEARTBEAT_S seconds."""
    started = time.monotonic()
    with logfile.open("w") as f, subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env) as proc:
        while True:
            try:
                status = proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                done = len(re.findall(r"^\s+(?:CC|AS)\s", logfile.read_text(errors="replace"), re.MULTILINE))
                log(f"{what}: {done} objects compiled ({time.monotonic() - started:.0f}s)")
    if status != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"{what} failed (status {status}); the end of {logfile}:\n{tail}")


def is_built(variant: str, out: Path, source: Source | None = None) -> bool:
    """Whether ``out`` holds a complete build of ``variant`` (build.json and every output) from today's fragment
    and builder: of ``source`` when given, else of the source version the build recorded (no apt call, so users
    of the outputs such as cage.guestimage can ask cheaply; apt offering a newer linux-source does not count)."""
    try:
        recorded = json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict):
        return False
    version = source.version if source is not None else recorded.get("source")
    return (
        isinstance(version, str)
        and recorded == cache_key(variant, version)
        and all((out / name).is_file() for name in outputs(variant))
    )


def build(variant: str, source: Source, out: Path, *, jobs: int) -> None:
    """out/bzImage (+ vmlinux for the guest), compiled unless the last build had the same key."""
    key = cache_key(variant, source)
    if is_built(variant, out, source):
        log(f"{variant}: up to date ({(out / 'bzImage').stat().st_size // 1024} KiB bzImage)")
        return
    configure(variant, source, out)
    (out / "build.json").unlink(missing_ok=True)
    obj = out / "obj"
    started = time.monotonic()
    log(
        f"{variant}: make -j{jobs} bzImage (output in {out.relative_to(REPO) if out.is_relative_to(REPO) else out}"
        "/build.log)"
    )
    _compile(make_argv(source, obj, "bzImage", jobs=jobs), make_env(), out / "build.log", f"{variant}: compile")
    for name, built in (("bzImage", obj / "arch" / "x86" / "boot" / "bzImage"), ("vmlinux", obj / "vmlinux")):
        if name in outputs(variant):
            partial = out / f".{name}.partial"
            shutil.copyfile(built, partial)
            partial.replace(out / name)
    release = (obj / "include" / "config" / "kernel.release").read_text().strip()
    (out / "version").write_text(release + "\n")
    (out / "build.json").write_text(json.dumps(key, indent=1) + "\n")
    sizes = ", ".join(
        f"{name} {(out / name).stat().st_size // 1024} KiB"
        for name in ("bzImage", "vmlinux")
        if name in outputs(variant)
    )
    log(f"{variant}: built {release} in {time.monotonic() - started:.0f}s: {sizes}")


def variant_dir(variant: str, build_dir: Path = BUILD) -> Path:
    return build_dir / "kernel-nullbox" / variant


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernel.build", description=__doc__.split("\n")[0])
    parser.add_argument("variant", nargs="?", default="all", choices=[*VARIANTS, "all"])
    parser.add_argument("--config-only", action="store_true", help="produce and check the .config, compile nothing")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    try:
        ensure_build_deps()
        source = prepare_source()
        log(f"source: {SOURCE_PACKAGE} {source.version} in {source.tree.relative_to(REPO)}")
        for variant in variants:
            out = variant_dir(variant)
            out.mkdir(parents=True, exist_ok=True)
            if args.config_only:
                configure(variant, source, out)
            else:
                build(variant, source, out, jobs=args.jobs)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
