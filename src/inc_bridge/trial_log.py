"""``trials.jsonl``: every autotune event appended as one JSON line, flushed as it happens.

A run that is interrupted (Ctrl-C, a crash) leaves a valid file: at worst its last line is cut
short; reading ignores that line and the next append starts on a fresh line. ``resume=True`` reads
the file back so finished trials are not redone. The file is data, not trusted state: it is read
through ``safe_io`` (a regular file, size cap, bounded depth), every line is checked against the
event's schema (a SerializationError names the file and the line otherwise), and its first line
holds the run's fingerprint (``run_fingerprint``), which a resumed run must match.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import SerializationError
from .report import TrialRecord, typed_record
from .run_fingerprint import differences
from .safe_io import MiB, loads_json, read_bytes, shorten, write_atomic

MAX_LOG_BYTES = 256 * MiB  # a trial line is about 1 kB, a sensitivity line about 100 bytes a layer
_SENSITIVITY_METHODS = ("sqnr", "metric")


def trial_key(config: dict[str, Any], fallback: list[str]) -> str:
    return json.dumps([config, sorted(fallback)], sort_keys=True)


class TrialLog:
    """Append-only event log; in memory only when ``path`` is None.

    Args:
        path: ``trials.jsonl``, or None.
        resume: read the events of an earlier run from ``path`` (they must carry ``fingerprint``);
            otherwise an existing file is replaced by a fresh log.
        fingerprint: this run's fingerprint, written as the first line of a fresh log.
    Raises:
        SerializationError: the file cannot be read or written, a line is malformed, or (resuming)
            the log belongs to another model, recipe, tolerance or calibration set.
    """

    def __init__(self, path: Path | None, resume: bool, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self.resumed = False  # True when the events of an earlier run of this fingerprint were read
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if resume and os.path.lexists(path):
                    self.events = _read(path)
                elif os.path.lexists(path):
                    path.unlink()  # a fresh run starts a fresh log
            except OSError as exc:
                raise SerializationError(f"{path}: cannot prepare the trial log: {exc.strerror or exc}") from None
        if self.events:
            run = self.events[0] if self.events[0]["type"] == "run" else None
            if run is None:
                raise SerializationError(
                    f"{path}: has no run fingerprint on its first line (an older inc_bridge or another program "
                    "wrote it); resume=False starts afresh (replacing it), or use another output_dir"
                )
            changed = differences(run["fingerprint"], fingerprint)
            if changed:
                raise SerializationError(
                    f"{path}: records a run of another {', '.join(changed)}; resuming it would mix two runs. "
                    "resume=False starts afresh (replacing it), or use another output_dir"
                )
            self.resumed = True
        else:
            self.append("run", fingerprint=fingerprint)

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["type"] == kind), None)

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["type"] == kind), None)

    def finished_trials(self) -> dict[str, TrialRecord]:
        """Recorded trials by key (their ``within_tolerance`` is the caller's to recompute)."""
        out = {}
        for e in self.events:
            if e["type"] == "trial":
                record = TrialRecord(**{k: v for k, v in e.items() if k != "type"})
                out[trial_key(record.config, record.fallback)] = record
        return out

    def append(self, kind: str, **data: Any) -> None:
        event = {"type": kind, **data}
        line = json.dumps(event, allow_nan=False) + "\n"  # the reader refuses NaN/Infinity
        self.events.append(event)
        if self.path is None:
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SerializationError(f"{self.path}: the trial log is not a regular file; refusing to write")
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SerializationError(f"{self.path}: cannot append to the trial log: {exc.strerror or exc}") from None


def _read(path: Path) -> list[dict[str, Any]]:
    """The events of ``path``; a last line cut short by an interruption is dropped (and cut from
    the file, so the next append starts a line of its own)."""
    raw = read_bytes(path, max_bytes=MAX_LOG_BYTES, error=SerializationError, what="trial log", within=path.parent)
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    events = [_event(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if tail.strip():
        try:
            events.append(_event(path, len(lines) + 1, tail))
            tail_ok = True
        except SerializationError:
            tail_ok = False  # cut short by an interruption
        write_atomic(path, b"".join(line + b"\n" for line in lines) + (tail + b"\n" if tail_ok else b""))
    return events


def _event(path: Path, number: int, line: bytes) -> dict[str, Any]:
    where = f"{path}: line {number}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SerializationError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    event = loads_json(text, origin=where, error=SerializationError)
    if not isinstance(event, dict):
        raise SerializationError(f"{where}: expected a JSON object, got {type(event).__name__}")
    kind = event.get("type")
    check = _CHECKS.get(kind) if isinstance(kind, str) else None
    if check is None:
        raise SerializationError(f"{where}: unknown event type {shorten(kind, 60)}; expected one of {sorted(_CHECKS)}")
    check(event, where)
    return event


def _fields(event: dict[str, Any], where: str, **expected: type | tuple[type, ...]) -> None:
    extra = set(event) - set(expected) - {"type"}
    if extra:
        raise SerializationError(f"{where}: unknown field {shorten(sorted(extra)[0], 60)} in a {event['type']} event")
    for key, kind in expected.items():
        if key not in event:
            raise SerializationError(f"{where}: {event['type']} event has no {key!r}")
        if not isinstance(event[key], kind) or isinstance(event[key], bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            name = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise SerializationError(f"{where}: {key}: expected {name}, got {type(event[key]).__name__}")


def _finite(value: Any, where: str) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308 else math.nan
    if not math.isfinite(number):
        raise SerializationError(f"{where}: expected a finite number, got {shorten(value, 60)}")
    return number


def _check_run(event: dict[str, Any], where: str) -> None:
    _fields(event, where, fingerprint=dict)


def _check_baseline(event: dict[str, Any], where: str) -> None:
    _fields(event, where, metric=(int, float))
    event["metric"] = _finite(event["metric"], f"{where}: metric")


def _check_measurements(event: dict[str, Any], where: str) -> None:
    _fields(event, where, sha256=str)


def _check_trial(event: dict[str, Any], where: str) -> None:
    record = typed_record(TrialRecord, {k: v for k, v in event.items() if k != "type"}, where)
    if not all(isinstance(v, str) for v in record.config.values()):
        raise SerializationError(f"{where}: config: expected settings as strings, got {shorten(record.config, 80)}")
    if record.status not in ("ok", "error"):
        raise SerializationError(f"{where}: status: expected 'ok' or 'error', got {shorten(record.status, 60)}")
    if record.status == "ok" and record.metric is None:
        raise SerializationError(f"{where}: a trial with status 'ok' has no metric")
    event.update(record.__dict__)


def _check_sensitivity(event: dict[str, Any], where: str) -> None:
    _fields(event, where, config=dict, method=str, sqnr=dict)
    if event["method"] not in _SENSITIVITY_METHODS:
        raise SerializationError(f"{where}: method: expected one of {list(_SENSITIVITY_METHODS)}, got {shorten(event['method'], 60)}")
    event["sqnr"] = {name: _finite(v, f"{where}: sqnr.{shorten(name, 60)}") for name, v in event["sqnr"].items()}


_CHECKS = {"run": _check_run, "baseline": _check_baseline, "measurements": _check_measurements,
           "trial": _check_trial, "sensitivity": _check_sensitivity}
