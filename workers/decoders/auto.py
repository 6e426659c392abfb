"""Pick the text decoder by looking at the frame; the text port's default.

    {"device":"d1","temp":22.6}            -> json
    weather,device=d1 temp=22.6 1732260000 -> influx
    Soil: 512; temp: 22; from d1           -> kv
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from workers.decoders import influx, json, kv

if TYPE_CHECKING:
    from workers.decoders.base import Context
    from workers.core.envelope import Event, Reading

# measurement (no ':' ';' '='), optional tags, a space, then a key=value field
_LINE_PROTOCOL = re.compile(rb"^[^\s,:;=\\]+(?:\\.[^\s,:;=\\]*)*(?:,\S+)? +[^\s=]+=")


def decode(frame: bytes, ctx: "Context") -> list["Reading | Event"]:
    head = frame.lstrip()[:1]
    if head in (b"{", b"["):
        return json.decode(frame, ctx)
    if _LINE_PROTOCOL.match(frame.lstrip()):
        return influx.decode(frame, ctx)
    return kv.decode(frame, ctx)
