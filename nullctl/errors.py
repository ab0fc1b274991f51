"""nullctl's failures, each with its exit status: 1 the operation failed, 2 usage error, 3 cannot connect."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs startup time (mypy treats the name the same)
if TYPE_CHECKING:
    from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONNECT: Final = 3
EXIT_INTERRUPTED: Final = 130


class CliError(Exception):
    """A failure reported as one line on stderr (``nullctl: <message>``) and an exit status."""

    status = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def lines(self) -> list[str]:
        return [self.message]


class Failed(CliError):
    """The operation was refused or failed (the appliance's error, or a local check such as a bad manifest)."""

    def __init__(self, message: str, code: str | None = None, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or []

    def lines(self) -> list[str]:
        """The message, then one line per problem (a manifest's problems are all reported at once)."""
        return [self.message, *self.details]


class UsageError(CliError):
    status = EXIT_USAGE


class CannotConnect(CliError):
    status = EXIT_CONNECT
