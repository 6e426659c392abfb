"""Cutting a device's byte stream into frames. Pure: bytes in, frames and rejects out.

``AutoFramer`` (the text port) tells per connection, from the first frame, whether the device writes
newline-delimited lines (``\\r\\n`` tolerated) or bare JSON objects back to back with no delimiter;
``PacketFramer`` (the binary port) reads length-prefixed packets. Each ``feed`` returns the complete
frames so far and the rejects (reason, raw bytes); a frame split across any number of reads is
reassembled exactly. ``fatal`` is set when the stream cannot be resynchronised and the connection
should be closed.
"""
from __future__ import annotations

import re
import struct

REJECT_EXCERPT = 4096          # bytes of an oversized frame kept with its dead letter

Frames = list[bytes]
Rejects = list[tuple[str, bytes]]

_JSON_TOKEN = re.compile(rb'[{}"\\]')
_WHITESPACE = b" \t\r\n"


class LineFramer:
    """Newline-delimited frames. An over-long line is rejected and skipped up to its newline."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buffer = b""
        self.skipping = False
        self.fatal: str | None = None

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        frames: Frames = []
        rejects: Rejects = []
        buffer = self.buffer + data if self.buffer else data
        if b"\n" not in data:
            self._hold(buffer, rejects)
            return frames, rejects
        lines = buffer.split(b"\n")
        tail = lines.pop()
        if self.skipping:
            self.skipping = False
            lines.pop(0)
        max_frame = self.max_frame
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > max_frame:
                rejects.append((f"frame longer than {max_frame} bytes", line[:REJECT_EXCERPT]))
            elif line.strip():
                frames.append(line)
        self._hold(tail, rejects)
        return frames, rejects

    def finish(self) -> tuple[Frames, Rejects]:
        """The device hung up: a last line without its newline is still a frame."""
        tail, self.buffer = self.buffer.rstrip(b"\r"), b""
        return ([tail] if tail.strip() and not self.skipping else []), []

    def _hold(self, buffer: bytes, rejects: Rejects) -> None:
        if self.skipping:
            self.buffer = b""
        elif len(buffer) > self.max_frame:
            rejects.append((f"frame longer than {self.max_frame} bytes", buffer[:REJECT_EXCERPT]))
            self.buffer, self.skipping = b"", True
        else:
            self.buffer = buffer


class JsonStreamFramer:
    """Bare JSON objects back to back (``{..}{..}``), whitespace between them allowed."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buffer = bytearray()
        self.scan = 0              # where scanning resumes in buffer
        self.depth = 0
        self.in_string = False
        self.fatal: str | None = None
        self.newline_after_object = False   # the device turned out to write JSON lines
        self.multiline_objects = False      # an object spanned lines (pretty-printed): never JSON lines
        self.objects = 0

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        frames: Frames = []
        rejects: Rejects = []
        buf = self.buffer
        buf += data
        while True:
            if self.depth == 0:
                start = _skip_whitespace(buf, 0)
                if start:
                    if self.objects and b"\n" in buf[:start]:
                        self.newline_after_object = True
                    del buf[:start]
                    if self.newline_after_object and not self.multiline_objects:
                        break      # JSON lines after all: AutoFramer hands the rest to the line framer
                if not buf:
                    break
                if buf[0] != 0x7B:                      # "{": anything else at depth 0 is garbage
                    end = _garbage_end(buf)
                    if end is None:
                        if len(buf) > self.max_frame:
                            rejects.append(("not a JSON object", bytes(buf[:REJECT_EXCERPT])))
                            buf.clear()
                        break
                    rejects.append(("not a JSON object", bytes(buf[:end])))
                    del buf[:end]
                    continue
                self.scan, self.depth, self.in_string = 1, 1, False
            end = self._scan(buf)
            if end is None:
                if len(buf) > self.max_frame:
                    rejects.append((f"JSON object longer than {self.max_frame} bytes", bytes(buf[:REJECT_EXCERPT])))
                    self.fatal = "oversized JSON object with no delimiter to resynchronise on"
                    buf.clear()
                break
            frame = bytes(buf[:end])
            if b"\n" in frame:
                self.multiline_objects = True
            frames.append(frame)
            del buf[:end]
            self.depth = 0
            self.objects += 1
        return frames, rejects

    def finish(self) -> tuple[Frames, Rejects]:
        rest, self.buffer = bytes(self.buffer).strip(), bytearray()
        return [], ([("connection closed inside a JSON object", rest[:REJECT_EXCERPT])] if rest else [])

    def _scan(self, buf: bytearray) -> int | None:
        """Advance through buf; return the end of the object or None if it is incomplete."""
        pos, depth, in_string = self.scan, self.depth, self.in_string
        for match in _JSON_TOKEN.finditer(buf, pos):
            i = match.start()
            if i < pos:                                 # the character after a backslash
                continue
            char = buf[i]
            if char == 0x5C:                            # backslash: skip the escaped character
                pos = i + 2
                continue
            pos = i + 1
            if char == 0x22:
                in_string = not in_string
            elif in_string:
                continue
            elif char == 0x7B:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i + 1
        self.scan, self.depth, self.in_string = max(pos, len(buf)), depth, in_string
        return None


def _skip_whitespace(buf: bytearray, pos: int) -> int:
    while pos < len(buf) and buf[pos] in _WHITESPACE:
        pos += 1
    return pos


def _garbage_end(buf: bytearray) -> int | None:
    """Garbage runs to the next newline (inclusive) or the next '{'."""
    newline = buf.find(b"\n")
    brace = buf.find(b"{")
    ends = [e for e in (newline + 1 if newline >= 0 else -1, brace) if e > 0]
    return min(ends) if ends else None


class AutoFramer:
    """Text port framing: lines, or bare JSON objects, decided by what the device sends first."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.inner: LineFramer | JsonStreamFramer | None = None

    @property
    def fatal(self) -> str | None:
        return self.inner.fatal if self.inner else None

    @property
    def mode(self) -> str:
        return {LineFramer: "lines", JsonStreamFramer: "json-stream"}.get(type(self.inner), "undecided")

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        if self.inner is None:
            head = data.lstrip(_WHITESPACE)
            if not head:
                return [], []
            self.inner = JsonStreamFramer(self.max_frame) if head[:1] == b"{" else LineFramer(self.max_frame)
        frames, rejects = self.inner.feed(data)
        inner = self.inner
        if isinstance(inner, JsonStreamFramer) and inner.newline_after_object and not inner.multiline_objects:
            # JSON lines: hand over to the (much faster) line framer with what is left unparsed. The
            # buffer starts at the object being read (if any), so a read ending mid-object is fine.
            rest = bytes(inner.buffer)
            self.inner = LineFramer(self.max_frame)
            more, more_rejects = self.inner.feed(rest) if rest else ([], [])
            frames += more
            rejects += more_rejects
        return frames, rejects

    def finish(self) -> tuple[Frames, Rejects]:
        return self.inner.finish() if self.inner else ([], [])


PACKET_HEADER = struct.Struct("<HHHBBB")


class PacketFramer:
    """Binary port: 9-byte header with ``data_length``, then that many bytes. See decoders/binary.py.
    ``trailer``: bytes after the records (an authenticated packet's counter and MAC, core/guard.py)."""

    def __init__(self, max_frame: int, trailer: int = 0) -> None:
        self.max_frame = max_frame
        self.trailer = trailer
        self.buffer = b""
        self.fatal: str | None = None

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        frames: Frames = []
        rejects: Rejects = []
        buffer = self.buffer + data
        size = PACKET_HEADER.size
        while len(buffer) >= size and not self.fatal:
            length, _, _, per_record, _, count = PACKET_HEADER.unpack_from(buffer)
            if length != per_record * count:
                self.fatal = f"header: {count} records of {per_record} bytes do not make {length} bytes"
            elif length > self.max_frame:
                self.fatal = f"packet of {length} bytes is over the {self.max_frame}-byte limit"
            if self.fatal:
                rejects.append((self.fatal, buffer[:REJECT_EXCERPT]))
                buffer = b""
                break
            end = size + length + self.trailer
            if len(buffer) < end:
                break
            frames.append(buffer[:end])
            buffer = buffer[end:]
        self.buffer = buffer
        return frames, rejects

    def finish(self) -> tuple[Frames, Rejects]:
        # An incomplete packet was never acknowledged, so the board still has it and sends it again.
        self.buffer = b""
        return [], []


def make_framer(framing: str, max_frame: int, trailer: int = 0) -> AutoFramer | LineFramer | PacketFramer:
    if framing == "binary":
        return PacketFramer(max_frame, trailer)
    if framing == "lines":
        return LineFramer(max_frame)
    return AutoFramer(max_frame)
