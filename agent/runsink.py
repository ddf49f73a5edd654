"""What a job run hands to whatever keeps its records: the contract between ``jobrun`` and the
exporters (JSONL/CSV files today). ``jobrun`` depends on this module only, never on an exporter.

A sink never raises from ``write``: a record it cannot store now is kept in memory and retried
at the next ``write`` (each checkpoint), and ``close`` puts whatever is still pending somewhere
safe and says where, once. So nothing measured is lost and the child's exit code always wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from .model import WindowResult


@dataclass(frozen=True)
class RunIdentity:
    """Who ran what: the same on every record of one run."""

    run_id: str
    job: str
    hostname: str
    command: str
    labels: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFacts:
    """What a run adds to its window's ``WindowResult``: identity, outcome and extras."""

    ident: RunIdentity
    status: str                          # running | completed | failed | killed | not_found
    exit_code: int | None                # None while running
    checkpoint: bool = False
    carbon: Mapping[str, Any] | None = None
    timeline: Mapping[str, Any] | None = None
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SinkClose:
    """What ``RunSink.close`` did with records it could not write where asked."""

    pending: int = 0                     # records that were still unwritten at close
    fallback: str | None = None          # where they went: a file path, or "stderr"
    reason: str = ""                     # the last error that kept them from the target

    @property
    def warning(self) -> str | None:
        """The one line to show the user, or None when everything was written."""
        if not self.pending:
            return None
        what = "record" if self.pending == 1 else f"{self.pending} records"
        where = "stderr (as JSON)" if self.fallback == "stderr" else (self.fallback or "nowhere")
        return f"{what} could not be written ({self.reason}); saved to {where}"


class RunSink(Protocol):
    """Receives a run's checkpoint and final records. Implementations: exporters.records."""

    def write(self, result: WindowResult, facts: RunFacts) -> None:
        """Store (or keep for retry) one record. Never raises."""

    def close(self) -> SinkClose:
        """Retry what is pending one last time, then save it to a fallback. Never raises."""
