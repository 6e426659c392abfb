"""A firmware script running under MicroPython's unix port as a process the test talks to while it
runs: its stdout lines are collected as they come (a thread), its stdin paces battery wakes."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from tests.firmware.harness import FAKES, FIRMWARE_LIB, HERE
from tests.pipeline import wait_for


class LiveBoard:
    def __init__(self, binary: Path, script: Path | str, *args: str, cwd: Path,
                 path: tuple[Path, ...] = (FIRMWARE_LIB, FAKES, HERE)) -> None:
        env = {**os.environ, "MICROPYPATH": ":".join(str(p) for p in path)}
        self.proc = subprocess.Popen([str(binary), str(script), *args], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     bufsize=1)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def times(self, kind: str, *words: str) -> list[int]:
        """The epoch ms of every line ``kind [words...] MS``."""
        out = []
        for line in self.output():
            parts = line.split()
            if parts[:1 + len(words)] == [kind, *words] and len(parts) == 2 + len(words) and parts[-1].isdigit():
                out.append(int(parts[-1]))
        return out

    def wait_line(self, predicate, timeout: float = 15.0, message: str = "a line from the board") -> None:
        wait_for(lambda: any(predicate(line) for line in self.output()) or self._dead(), timeout=timeout,
                 message=message)
        if not any(predicate(line) for line in self.output()):
            raise AssertionError(f"{message}: the board stopped\n" + "\n".join(self.output()))

    def _dead(self) -> bool:
        return self.proc.poll() is not None

    def wake(self) -> None:
        """One battery wake; returns once the board is asleep again."""
        before = sum(1 for line in self.output() if line == "asleep")
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.wait_line_count("asleep", before + 1)

    def wait_line_count(self, text: str, count: int, timeout: float = 15.0) -> None:
        wait_for(lambda: sum(1 for line in self.output() if line == text) >= count or self._dead(),
                 timeout=timeout, message=f"{count} x {text!r}")
        if sum(1 for line in self.output() if line == text) < count:
            raise AssertionError(f"the board stopped:\n" + "\n".join(self.output()))

    def finish(self, timeout: float = 40.0) -> list[str]:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.output()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
