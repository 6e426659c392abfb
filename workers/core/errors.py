"""The stable codes a failed reply carries beside its message, named in one place (docs/query-protocol.md).

Every REQ/REP worker (query, commands) answers a request it cannot serve with
``{"ok": false, "code": "<code>", "error": "<message for a person>"}``. The message may be reworded
from one release to the next; the code may not: programs branch on the code, people read the message.
Add a code here, and to the table in docs/query-protocol.md, rather than reuse one that means something
else.
"""
from __future__ import annotations

BAD_REQUEST = "bad_request"            # not JSON, not an object, or larger than a request may be
UNKNOWN_OP = "unknown_op"              # "op" names nothing this worker does
INVALID_ARGUMENT = "invalid_argument"  # a member is missing or has the wrong type or value
UNKNOWN_DEVICE = "unknown_device"      # the device has never been seen (and is not configured)
NOT_FOUND = "not_found"                # what was asked for does not exist: a command id, a rollup window
CONFLICT = "conflict"                  # the request contradicts the state: an id used already, a finished command
LIMIT_EXCEEDED = "limit_exceeded"      # over a configured bound: history points, commands queued per device
UNAVAILABLE = "unavailable"            # cannot be answered now or with this configuration: no store yet
EXPIRED = "expired"                    # commands: the command's ttl passed before its device showed up
INTERNAL = "internal"                  # a bug in the worker; logged with its traceback

CODES = (BAD_REQUEST, UNKNOWN_OP, INVALID_ARGUMENT, UNKNOWN_DEVICE, NOT_FOUND, CONFLICT, LIMIT_EXCEEDED,
         UNAVAILABLE, EXPIRED, INTERNAL)


def failure(code: str, message: str, **members: object) -> dict:
    """A failed reply: ``{"ok": false, "code": code, "error": message, **members}``."""
    return {"ok": False, "code": code, "error": message, **members}
