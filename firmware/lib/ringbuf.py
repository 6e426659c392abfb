# Bounded buffers that keep the newest readings and count what they dropped.
#
# RingBuffer holds fixed-size records and serializes to bytes small enough for
# RTC memory (492 bytes on an ESP8266, 2048 on an ESP32), so readings survive
# deep sleep. Layout of to_bytes():
#   <HBBBHIH  magic, record_size, capacity, count, meta, dropped, checksum
#   then count records, oldest first.
# `meta` is one u16 the caller keeps with the buffer (the firmware keeps the
# number of wakes since the last send there). The checksum (Fletcher-16 over
# everything else) rejects the random contents of RTC memory after power-on.

import struct

MAGIC = 0x5342
_HEAD = "<HBBBHIH"
HEAD_SIZE = 13


class RingBuffer:
    def __init__(self, record_size, capacity):
        if capacity < 1 or capacity > 255:
            raise ValueError("capacity must be 1..255")
        self.record_size = record_size
        self.capacity = capacity
        self._data = bytearray(record_size * capacity)
        self._start = 0
        self.count = 0
        self.dropped = 0
        self.meta = 0

    def __len__(self):
        return self.count

    def append(self, record):
        size = self.record_size
        if len(record) != size:
            raise ValueError("record is %d bytes, not %d" % (len(record), size))
        if self.count == self.capacity:
            # full: the oldest slot is overwritten
            self._start = (self._start + 1) % self.capacity
            self.count -= 1
            self.dropped = (self.dropped + 1) & 0xFFFFFFFF
        slot = (self._start + self.count) % self.capacity
        self._data[slot * size:(slot + 1) * size] = record
        self.count += 1

    def records(self):
        # All records as one bytes object, oldest first.
        size = self.record_size
        end = self._start + self.count
        if end <= self.capacity:
            return bytes(self._data[self._start * size:end * size])
        wrap = end - self.capacity
        return bytes(self._data[self._start * size:]) + bytes(self._data[:wrap * size])

    def clear(self):
        # Only after the server acknowledged the records; `dropped` is kept.
        self._start = 0
        self.count = 0

    def to_bytes(self):
        body = self.records()
        head = struct.pack(_HEAD, MAGIC, self.record_size, self.capacity, self.count,
                           self.meta, self.dropped, 0)
        blob = bytearray(head + body)
        struct.pack_into("<H", blob, HEAD_SIZE - 2, fletcher16(blob))
        return bytes(blob)

    @classmethod
    def from_bytes(cls, blob, record_size, capacity):
        # A buffer restored from blob, or None when blob is not a valid buffer of
        # this record size. A smaller capacity than saved keeps the newest records.
        if blob is None or len(blob) < HEAD_SIZE:
            return None
        magic, size, _, count, meta, dropped, check = struct.unpack_from(_HEAD, blob, 0)
        if magic != MAGIC or size != record_size or len(blob) < HEAD_SIZE + count * size:
            return None
        zeroed = bytearray(blob[:HEAD_SIZE + count * size])
        struct.pack_into("<H", zeroed, HEAD_SIZE - 2, 0)
        if fletcher16(zeroed) != check:
            return None
        buf = cls(record_size, capacity)
        buf.meta = meta
        for i in range(count):
            start = HEAD_SIZE + i * size
            buf.append(blob[start:start + size])
        buf.dropped = dropped + buf.dropped
        return buf


def capacity_for(rtc_bytes, record_size):
    n = (rtc_bytes - HEAD_SIZE) // record_size
    return 255 if n > 255 else n


def fletcher16(data):
    a = 0
    b = 0
    for byte in data:
        a = (a + byte) % 255
        b = (b + a) % 255
    return (b << 8) | a


class Backlog:
    # Encoded frames waiting to be sent, oldest first, at most `limit` of them.

    def __init__(self, limit):
        self.limit = limit
        self.items = []
        self.dropped = 0

    def __len__(self):
        return len(self.items)

    def append(self, item):
        self.items.append(item)
        if len(self.items) > self.limit:
            self.items.pop(0)
            self.dropped += 1

    def peek(self):
        return self.items[0]

    def pop(self):
        return self.items.pop(0)
