"""One command's execution state, shared by its attempts (the executor's and the kill
switch's)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.core.commands import Command
from worker.core.decisions import Progress
from worker.core.errors import PapiError
from worker.core.routes import CancelRequest, Route
from worker.exchange.accounts import Credentials


@dataclass
class Job:
    """Per-command state shared by the attempts."""

    command: Command
    creds: Credentials
    route: Route
    deadline: int
    cancel: CancelRequest  # built once, signed afresh at every attempt
    attempts: int = 0  # requests that reached (or may have reached) the exchange
    not_sent: int = 0
    resynced: bool = False
    last_error: PapiError | None = None
    maybe_landed: bool = False  # a cancel of this execution got an ambiguous answer
    landed_maybe: int = 0  # cancels of this execution that got an ambiguous answer

    @property
    def expires_at(self) -> int | None:
        return self.command.expires_at

    def progress(self) -> Progress:
        return Progress(
            self.command,
            self.route,
            self.attempts,
            maybe_landed=self.maybe_landed,
            last_error=self.last_error,
            not_sent=self.not_sent,
        )
