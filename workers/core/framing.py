"""Cutting a device's byte stream into frames. Pure: bytes in, frames and rejects out.

``AutoFramer`` (the text port) tells per connection, from the first frame, whether the device writes
newline-delimited lines (``\\r\\n`` tolerated) or bare JSON objects back to back with no delimiter;
``PacketFramer`` (the binary port) reads length-prefixed packets. Each ``feed`` returns the complete
frames so far and the rejects (reason, raw bytes); a frame split across any number of reads is
reassembled exactly. ``fatal`` is set when the stream cannot be resynchronised and the connection
should be closed.

Two invariants, checked by property tests (tests/test_framing_properties.py): the frames and rejects
do not depend on how the stream was cut into reads (a limit is never enforced by chance), and every
byte fed ends up in a frame, in a reject (``rejected_bytes`` counts the whole span a reject stands for,
its excerpt is at most ``REJECT_EXCERPT`` bytes), or is a delimiter or whitespace between frames.
"""
from __future__ import annotations

import re

from workers.core.packet import HEADER as PACKET_HEADER  # the one definition of the binary header

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
        self.rejected_bytes = 0
        # The excerpt of an over-long line is its first bytes up to the limit, so it is the same whether
        # the line was refused whole or while it was still arriving.
        self.excerpt = min(max_frame, REJECT_EXCERPT)

    @property
    def lines(self) -> "LineFramer":
        return self

    def whole_lines(self, data: bytes) -> Frames | None:
        """The frames ``feed`` would cut from ``data`` when ``data`` is whole lines, none over the
        limit, read with nothing held: a board's write, or a few of them. Nothing is held after it and
        nothing rejected. None: ``feed`` must take it (a partial line, a CR, a blank line among others,
        anything over the limit). A board's read then costs a call and a split, not the general loop."""
        if self.buffer or self.skipping or not data.endswith(b"\n"):
            return None
        if data.find(b"\n") == len(data) - 1:                 # one line: a fleet's every read
            if len(data) > self.max_frame + 1:
                return None
            line = data[:-2] if data.endswith(b"\r\n") else data[:-1]
            return [line] if line.strip() else []
        if b"\r" in data:
            return None
        lines = data.split(b"\n")
        lines.pop()
        if len(data) > self.max_frame + 1 and max(map(len, lines)) > self.max_frame:
            return None
        return lines if all(map(bytes.strip, lines)) else None

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
            self.rejected_bytes += len(lines.pop(0))
        max_frame = self.max_frame
        for line in lines:
            if len(line) > max_frame and (len(line) > max_frame + 1 or line[-1] != 0x0D):
                rejects.append((f"frame longer than {max_frame} bytes", line[:self.excerpt]))
                self.rejected_bytes += len(line)
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.strip():
                frames.append(line)
        self._hold(tail, rejects)
        return frames, rejects

    @property
    def held_bytes(self) -> int:
        """The unfinished frame kept between reads (at most ``max_frame`` + 1)."""
        return len(self.buffer)

    def finish(self) -> tuple[Frames, Rejects]:
        """The device hung up: a last line without its newline is still a frame."""
        tail, self.buffer = self.buffer.rstrip(b"\r"), b""
        return ([tail] if tail.strip() and not self.skipping else []), []

    def _hold(self, buffer: bytes, rejects: Rejects) -> None:
        # A line of exactly max_frame bytes may wait for its LF with its CR already read: the CR is not
        # part of the frame, so it does not count against the limit.
        if self.skipping:
            self.rejected_bytes += len(buffer)
            self.buffer = b""
        elif len(buffer) > self.max_frame and (len(buffer) > self.max_frame + 1 or buffer[-1] != 0x0D):
            rejects.append((f"frame longer than {self.max_frame} bytes", buffer[:self.excerpt]))
            self.rejected_bytes += len(buffer)
            self.buffer, self.skipping = b"", True
        else:
            self.buffer = buffer


class JsonStreamFramer:
    """Bare JSON objects back to back (``{..}{..}``), whitespace between them allowed.

    An object over the limit is refused whether it arrived in one read or many: once it passes the
    limit its bytes are scanned (braces and strings, to find its end) but no longer kept, so memory
    stays bounded by ``max_frame``, and the stream resumes after it. Garbage between objects runs to
    the next newline or ``{``; a run over the limit is refused the same way."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buffer = bytearray()
        self.scan = 0              # where scanning resumes in buffer
        self.depth = 0
        self.in_string = False
        self.fatal: str | None = None
        self.rejected_bytes = 0
        self.excerpt = min(max_frame, REJECT_EXCERPT)
        self.oversized: bytes | None = None    # the excerpt of the object being skipped
        self.skipped = 0                       # bytes of it already dropped from buffer
        self.garbage: bytes | None = None      # the excerpt of an over-long garbage run being skipped
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
                if self.garbage is not None or (buf and buf[0] not in _WHITESPACE and buf[0] != 0x7B):
                    if self._garbage(buf, rejects):
                        continue
                    break
                start = _skip_whitespace(buf, 0)
                if start:
                    if self.objects and b"\n" in buf[:start]:
                        self.newline_after_object = True
                    del buf[:start]
                    if self.newline_after_object and not self.multiline_objects:
                        break      # JSON lines after all: AutoFramer hands the rest to the line framer
                    continue
                if not buf:
                    break
                self.scan, self.depth, self.in_string = 1, 1, False
                self.skipped = 0
            end = self._scan(buf)
            if end is None:
                if self.oversized is None and len(buf) > self.max_frame:
                    self.oversized = bytes(buf[:self.excerpt])
                if self.oversized is not None:      # keep scanning its bytes, not keeping them
                    drop = min(self.scan, len(buf))
                    del buf[:drop]
                    self.scan -= drop
                    self.skipped += drop
                break
            size = self.skipped + end
            if size > self.max_frame:
                excerpt = self.oversized if self.oversized is not None else bytes(buf[:self.excerpt])
                rejects.append((f"JSON object longer than {self.max_frame} bytes", excerpt))
                self.rejected_bytes += size
                self.oversized = None
            else:
                frame = bytes(buf[:end])
                if b"\n" in frame:
                    self.multiline_objects = True
                frames.append(frame)
                self.objects += 1
            del buf[:end]
            self.depth = 0
            self.skipped = 0
        return frames, rejects

    @property
    def held_bytes(self) -> int:
        return len(self.buffer)

    def _garbage(self, buf: bytearray, rejects: Rejects) -> bool:
        """Bytes at depth 0 that do not open an object: a run to the next newline (inclusive) or ``{``.
        True when the run was taken off ``buf`` (go on), False when its end has not arrived yet."""
        end = _garbage_end(buf)
        if self.garbage is None and end is not None and end <= self.max_frame:
            rejects.append(("not a JSON object", bytes(buf[:min(end, self.excerpt)])))
            self.rejected_bytes += end
            del buf[:end]
            return True
        if self.garbage is None:
            if len(buf) <= self.max_frame:
                return False                       # wait for its end
            self.garbage = bytes(buf[:self.excerpt])   # too long to keep: skip to its end
        stop = len(buf) if end is None else end
        self.rejected_bytes += stop
        del buf[:stop]
        if end is None:
            return False
        rejects.append(("not a JSON object", self.garbage))
        self.garbage = None
        return True

    def finish(self) -> tuple[Frames, Rejects]:
        held, self.buffer = bytes(self.buffer), bytearray()
        rest = held.strip()
        reason = "connection closed inside a JSON object" if self.depth else "not a JSON object"
        if self.garbage is not None or self.oversized is not None:
            self.rejected_bytes += len(held.rstrip()) if self.garbage is not None else len(held)
            rest = self.garbage if self.garbage is not None else self.oversized
            self.garbage = self.oversized = None
        elif rest:
            self.rejected_bytes += len(rest)
            rest = rest[:self.excerpt]
        self.depth = 0
        return [], ([(reason, rest)] if rest else [])

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
    ends = [e for e in (newline + 1 if newline >= 0 else -1, brace) if e >= 0]   # 0: a run skipped so far ends here
    return min(ends) if ends else None


class AutoFramer:
    """Text port framing: lines, or bare JSON objects, decided by what the device sends first."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.inner: LineFramer | JsonStreamFramer | None = None
        self._rejected_before = 0          # rejected_bytes of the JSON framer handed over from
        self._head = b""                   # whitespace read before the first frame

    @property
    def fatal(self) -> str | None:
        return self.inner.fatal if self.inner else None

    @property
    def held_bytes(self) -> int:
        return len(self._head) + (self.inner.held_bytes if self.inner else 0)

    @property
    def rejected_bytes(self) -> int:
        return self._rejected_before + (self.inner.rejected_bytes if self.inner else 0)

    @property
    def lines(self) -> LineFramer | None:
        """The line framer once the device turned out to write lines (``LineFramer.one_line``)."""
        return self.inner if type(self.inner) is LineFramer else None

    @property
    def mode(self) -> str:
        return {LineFramer: "lines", JsonStreamFramer: "json-stream"}.get(type(self.inner), "undecided")

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        if self.inner is None:
            # Whitespace before the first frame decides nothing, but in a line it belongs to the line:
            # it is held (after its last newline: blank lines are nothing in either framing) so that
            # the first frame is the same however the reads were cut.
            data = self._head + data
            head = data.lstrip(_WHITESPACE)
            if not head and len(data) - data.rfind(b"\n") - 1 <= self.max_frame:
                self._head = data[data.rfind(b"\n") + 1:]
                return [], []
            self._head = b""
            self.inner = JsonStreamFramer(self.max_frame) if head[:1] == b"{" else LineFramer(self.max_frame)
        frames, rejects = self.inner.feed(data)
        inner = self.inner
        if isinstance(inner, JsonStreamFramer) and inner.newline_after_object and not inner.multiline_objects:
            # JSON lines: hand over to the (much faster) line framer with what is left unparsed. The
            # buffer starts at the object being read (if any), so a read ending mid-object is fine.
            rest = bytes(inner.buffer)
            self._rejected_before += inner.rejected_bytes
            self.inner = LineFramer(self.max_frame)
            more, more_rejects = self.inner.feed(rest) if rest else ([], [])
            frames += more
            rejects += more_rejects
        return frames, rejects

    def finish(self) -> tuple[Frames, Rejects]:
        self._head = b""
        return self.inner.finish() if self.inner else ([], [])


class PacketFramer:
    """Binary port: 9-byte header with ``data_length``, then that many bytes. See decoders/binary.py.
    ``trailer``: bytes after the records (an authenticated packet's counter and MAC, core/guard.py)."""

    def __init__(self, max_frame: int, trailer: int = 0) -> None:
        self.max_frame = max_frame
        self.trailer = trailer
        self.buffer = b""
        self.fatal: str | None = None
        self.rejected_bytes = 0
        self.lines = None           # packets, never lines

    def feed(self, data: bytes) -> tuple[Frames, Rejects]:
        """After a bad header nothing more is read: what followed it is counted as rejected, and the
        reject's excerpt is the header alone, so it does not depend on how much had arrived."""
        frames: Frames = []
        rejects: Rejects = []
        if self.fatal:
            self.rejected_bytes += len(data)
            return frames, rejects
        buffer = self.buffer + data
        size = PACKET_HEADER.size
        while len(buffer) >= size and not self.fatal:
            length, _, _, per_record, _, count = PACKET_HEADER.unpack_from(buffer)
            if length != per_record * count:
                self.fatal = f"header: {count} records of {per_record} bytes do not make {length} bytes"
            elif length > self.max_frame:
                self.fatal = f"packet of {length} bytes is over the {self.max_frame}-byte limit"
            if self.fatal:
                rejects.append((self.fatal, buffer[:size]))
                self.rejected_bytes += len(buffer)
                buffer = b""
                break
            end = size + length + self.trailer
            if len(buffer) < end:
                break
            frames.append(buffer[:end])
            buffer = buffer[end:]
        self.buffer = buffer
        return frames, rejects

    @property
    def held_bytes(self) -> int:
        return len(self.buffer)

    def finish(self) -> tuple[Frames, Rejects]:
        # An incomplete packet was never acknowledged, so the board still has it and sends it again.
        self.rejected_bytes += len(self.buffer)
        self.buffer = b""
        return [], []


def make_framer(framing: str, max_frame: int, trailer: int = 0) -> AutoFramer | LineFramer | PacketFramer:
    if framing == "binary":
        return PacketFramer(max_frame, trailer)
    if framing == "lines":
        return LineFramer(max_frame)
    return AutoFramer(max_frame)
