"""How often each worker has started, kept in the data directory so that it survives the restarts.

A worker's counters start from zero when supervisord restarts it, so a worker that dies every few
seconds looked fine in ``sensorpipe status``. Each worker process notes its start in
``<data>/workers/<name>.json`` (how many starts ever, and the times of the recent ones) and publishes
``starts`` and ``starts_recent`` (within ``CRASH_LOOP_WINDOW_S``) with its counters; ``status``
shows a worker restarted ``CRASH_LOOP_STARTS`` times or more in that window as a crash loop.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CRASH_LOOP_WINDOW_S = 600.0
CRASH_LOOP_STARTS = 3             # starts within the window that make a crash loop (the first is not one)
KEEP_RECENT = 50

_recorded: dict[str, dict[str, int]] = {}     # counters name -> what this process publishes


def record(data_dir: str | Path, worker: str, now: float | None = None) -> dict[str, int]:
    """Note that ``worker`` (its counters name: ``parser:0``, ``sink:sqlite``) starts now."""
    now = time.time() if now is None else now
    path = Path(data_dir) / "workers" / (worker.replace(":", "-") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        state = json.loads(path.read_text())
        starts, recent = int(state["starts"]), [float(t) for t in state["recent"]]
    except (OSError, ValueError, KeyError, TypeError):
        starts, recent = 0, []
    starts += 1
    recent = [t for t in recent if now - t < CRASH_LOOP_WINDOW_S][-KEEP_RECENT:] + [now]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"starts": starts, "recent": recent}))
    os.replace(tmp, path)
    _recorded[worker] = {"starts": starts, "starts_recent": len(recent)}
    return _recorded[worker]


def published(worker: str) -> dict[str, int]:
    """The start counts ``worker``'s counters carry (none if this process did not record it)."""
    return _recorded.get(worker, {})


def crash_loop(counters: dict) -> str | None:
    """What ``status`` says of a worker's restarts, or None when they are not a crash loop."""
    recent = counters.get("starts_recent", 0)
    if recent >= CRASH_LOOP_STARTS:
        return (f"CRASH LOOP? started {recent} times in the last {CRASH_LOOP_WINDOW_S / 60:.0f} minutes"
                f" ({counters.get('starts', recent)} in all); see its log")
    return None
