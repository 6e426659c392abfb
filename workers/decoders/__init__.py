"""Decoders: one module each, a pure function ``decode(frame, ctx) -> [Reading | Event]``.

Registered by name in ``REGISTRY``; a listener's ``decoder`` key chooses one. To add a format, write
``workers/decoders/<name>.py`` with a ``decode`` function whose docstring shows one real frame and what it
becomes, add it here, and add golden cases under ``tests/golden/<name>/``. Decoders raise
``DecodeError``; they never log. What they share is in ``base`` (this registry imports them, so
they import nothing from here), and each owns its options (``JsonOptions`` in ``json``...), which the
configuration composes.
"""
from __future__ import annotations

from workers.decoders import auto, binary, influx, json, kv
from workers.decoders.base import Context, DecodeError, Decoder, measurement

REGISTRY: dict[str, Decoder] = {
    "auto": auto.decode,
    "json": json.decode,
    "kv": kv.decode,
    "influx": influx.decode,
    "binary": binary.decode,
}

__all__ = ["REGISTRY", "Context", "DecodeError", "Decoder", "measurement"]
