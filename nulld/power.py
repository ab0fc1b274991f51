"""The end of the line as PID 1: kill what is left, sync, unmount, reboot(2)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from enum import StrEnum
from typing import Final

from nulld import mount, syscalls

log = logging.getLogger("nulld")

FINAL_TERM_GRACE: Final = 2.0


class PowerAction(StrEnum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    HALT = "halt"

    @property
    def command(self) -> int:
        return {
            PowerAction.POWEROFF: syscalls.RB_POWER_OFF,
            PowerAction.REBOOT: syscalls.RB_AUTOBOOT,
            PowerAction.HALT: syscalls.RB_HALT_SYSTEM,
        }[self]


def _reap_all() -> int:
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def kill_remaining(grace: float = FINAL_TERM_GRACE) -> None:
    """SIGTERM every process but ourselves, give them ``grace`` seconds, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_all()
        try:
            os.kill(-1, 0)
        except ProcessLookupError:
            return  # nobody left
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    time.sleep(0.05)
    _reap_all()


def power_down(action: PowerAction, *, unmount: bool) -> None:
    """Never returns on success.  Every step is attempted whatever the previous one did."""
    log.info("final stage: %s", action)
    try:
        kill_remaining()
    except Exception:
        log.exception("killing the remaining processes failed")
    os.sync()
    if unmount:
        try:
            mount.unmount_all()
        except Exception:
            log.exception("unmounting failed")
        os.sync()
    try:
        syscalls.reboot(action.command)
    except OSError as exc:
        log.critical("reboot(%s) failed: %s", action, exc)
