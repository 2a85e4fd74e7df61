"""``trials.jsonl``: every autotune event appended as one JSON line, flushed as it happens.

A run that is interrupted (Ctrl-C, a crash) leaves a valid file: at worst its last line is cut
short, and reading skips it. ``resume=True`` reads the file back so finished trials are not redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .report import TrialRecord


def trial_key(config: dict[str, Any], fallback: list[str]) -> str:
    return json.dumps([config, sorted(fallback)], sort_keys=True)


class TrialLog:
    """Append-only event log; in memory only when ``path`` is None."""

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.exists():
                self.events = _read(path)
            elif path.exists():
                path.unlink()  # a fresh run starts a fresh log

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("type") == kind), None)

    def finished_trials(self) -> dict[str, TrialRecord]:
        out = {}
        for e in self.events:
            if e.get("type") == "trial":
                record = TrialRecord(**{k: v for k, v in e.items() if k != "type"})
                out[trial_key(record.config, record.fallback)] = record
        return out

    def append(self, kind: str, **data: Any) -> None:
        event = {"type": kind, **data}
        self.events.append(event)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
        if isinstance(event, dict):
            events.append(event)
    return events
