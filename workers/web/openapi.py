"""The HTTP API described as OpenAPI 3.1, served at /openapi.json. Written by hand next to the routes;
tests/test_web.py fails when a route is missing here or a path here has no route."""
from __future__ import annotations

from typing import Any


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    return {"description": description, "content": {media: {"schema": schema or {"type": "object"}}}}


DEVICE = {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}, "description": "device id"}
COMMAND_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "command id"}
UNAVAILABLE = _error("the worker that answers this is not running (code `unavailable`)")
AUTH = {"401": _error("no valid token (code `unauthorized`)")}
ADMIN = {**AUTH, "403": _error("a read-only token (code `forbidden`)")}
MS = {"type": "integer", "description": "Unix epoch milliseconds"}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "sensorpipe HTTP API", "version": "1",
             "description": "Latest values, presence, history, commands, dead letters and status of a sensorpipe"
                            " pipeline; live streams as Server-Sent Events. Times are Unix epoch milliseconds."
                            " Errors are `{\"error\": {\"code\": ..., \"message\": ...}}`. See docs/web.md."},
    "security": [{"bearer": []}, {"query_token": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "a read or admin token from [http]"},
            "query_token": {"type": "apiKey", "in": "query", "name": "token",
                            "description": "the same token, for EventSource, which cannot set headers"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "examples": ["unknown_device", "bad_request", "unavailable"]},
                               "message": {"type": "string"}}}}},
            "Device": {"type": "object", "properties": {
                "device": {"type": "string"}, "last_seen": MS, "online": {"type": "boolean"},
                "via": {"type": "string"}, "peer": {"type": "string"}}},
            "Latest": {"type": "object", "properties": {
                "device": {"type": "string"},
                "fields": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "value": {}, "ts": MS}}}}},
            "History": {"type": "object", "properties": {
                "device": {"type": "string"}, "field": {"type": "string"}, "window": {"type": ["string", "null"]},
                "from": MS, "to": MS, "columns": {"type": "array", "items": {"type": "string"},
                                                  "description": "[ts, value], or [ts, count, min, max, mean, last]"},
                "points": {"type": "array", "items": {"type": "array"}}}},
            "Command": {"type": "object", "properties": {
                "id": {"type": "string"}, "device": {"type": "string"}, "command": {"type": "object"},
                "status": {"type": "string", "enum": ["queued", "delivered", "acked", "failed", "expired", "cancelled"]},
                "created": MS, "expires": MS, "attempts": {"type": "integer"}, "delivered": MS,
                "via": {"type": "string"}, "error": {"type": ["string", "null"]}}},
            "DeadLetter": {"type": "object", "properties": {
                "id": {"type": "integer"}, "created_ms": MS, "recv_ts": MS, "source": {"type": "string"},
                "listener": {"type": "string"}, "peer": {"type": "string"}, "device": {"type": "string"},
                "reason": {"type": "string"}, "raw": {"type": "string"}, "attempts": {"type": "integer"},
                "replayed_ms": {"type": ["integer", "null"]}}},
        },
    },
    "paths": {
        "/api/devices": {"get": {
            "summary": "Every device, online or not, with when it was last seen",
            "responses": {"200": _ok("devices", {"type": "object", "properties": {"devices": {
                "type": "array", "items": {"$ref": "#/components/schemas/Device"}}}}), **AUTH, "503": UNAVAILABLE}}},
        "/api/devices/{device}/latest": {"get": {
            "summary": "A device's newest value of every field", "parameters": [DEVICE],
            "responses": {"200": _ok("latest values", {"$ref": "#/components/schemas/Latest"}), **AUTH,
                          "404": _error("never seen (code `unknown_device`)"), "503": UNAVAILABLE}}},
        "/api/devices/{device}/history": {"get": {
            "summary": "Raw readings of one field, or its rollups over a configured window",
            "parameters": [DEVICE,
                           {"name": "field", "in": "query", "required": True, "schema": {"type": "string"}},
                           {"name": "window", "in": "query", "schema": {"type": "string", "examples": ["1m", "1h"]},
                            "description": "a configured rollup window; without it, the raw readings"},
                           {"name": "from", "in": "query", "schema": MS, "description": "default: a day before `to`"},
                           {"name": "to", "in": "query", "schema": MS, "description": "default: now"}],
            "responses": {"200": _ok("points, at most [query] history_max_points",
                                     {"$ref": "#/components/schemas/History"}),
                          "400": _error("bad range, unknown window, or more points than allowed"), **AUTH,
                          "503": UNAVAILABLE}}},
        "/api/devices/{device}/stream": {"get": {
            "summary": "Live: this device's readings, events and presence (Server-Sent Events)",
            "description": "Events `reading` ({device, ts, fields}), `event` ({device, ts, kind, body}) and"
                           " `seen` ({device, last_seen, via}). A client that lets [http] stream_queue chunks pile up"
                           " behind is disconnected; EventSource reconnects by itself.",
            "parameters": [DEVICE],
            "responses": {"200": _ok("an event stream", {"type": "string"}, "text/event-stream"), **AUTH}}},
        "/api/stream": {"get": {
            "summary": "Live: every device's readings, events and presence (Server-Sent Events)",
            "responses": {"200": _ok("an event stream", {"type": "string"}, "text/event-stream"), **AUTH}}},
        "/api/devices/{device}/commands": {
            "get": {"summary": "Commands sent to the device and what became of each, newest first",
                    "parameters": [DEVICE, {"name": "limit", "in": "query",
                                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                    "responses": {"200": _ok("commands", {"type": "object", "properties": {"commands": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Command"}}}}), **AUTH,
                        "503": UNAVAILABLE}},
            "post": {"summary": "Send a command (admin)", "parameters": [DEVICE],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["command"], "properties": {
                             "command": {"type": "object", "examples": [{"cmd": "interval", "value": 30}]},
                             "id": {"type": "string"}, "ttl_s": {"type": "number"},
                             "wait_s": {"type": "number", "maximum": 120}}}}}},
                     "responses": {"200": _ok("delivered ({id, device, status, via})"),
                                   "202": _ok("queued until the device connects ({id, device, status, expires, reason})"),
                                   "400": _error("not a command"), **ADMIN,
                                   "404": _error("never seen and not in [devices] (code `unknown_device`)"),
                                   "409": _error("expired while waiting (code `expired`)"), "503": UNAVAILABLE}}},
        "/api/devices/{device}/commands/{id}": {
            "get": {"summary": "Follow one command", "parameters": [DEVICE, COMMAND_ID],
                    "responses": {"200": _ok("the command", {"$ref": "#/components/schemas/Command"}), **AUTH,
                                  "404": _error("no such command"), "503": UNAVAILABLE}},
            "delete": {"summary": "Cancel a queued command (admin)", "parameters": [DEVICE, COMMAND_ID],
                       "responses": {"200": _ok("cancelled"), "400": _error("not queued"), **ADMIN,
                                     "503": UNAVAILABLE}}},
        "/api/deadletters": {"get": {
            "summary": "Frames and readings set aside (not decodable, refused by a server)",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                           {"name": "all", "in": "query", "schema": {"type": "boolean"},
                            "description": "include the ones replayed already"},
                           {"name": "source", "in": "query", "schema": {"type": "string"},
                            "description": "edge | parser | sink:<name>"}],
            "responses": {"200": _ok("dead letters", {"type": "object", "properties": {
                "total": {"type": "integer"},
                "deadletters": {"type": "array", "items": {"$ref": "#/components/schemas/DeadLetter"}}}}), **AUTH}}},
        "/api/deadletters/replay": {"post": {
            "summary": "Feed dead letters through the pipeline again (admin)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}},
                                                 "all": {"type": "boolean"}}}}}},
            "responses": {"200": _ok("{replayed: n}"), "400": _error("neither ids nor all"), **ADMIN,
                          "503": _error("the edge did not take them; nothing was marked replayed")}}},
        "/api/status": {"get": {
            "summary": "Every worker's counters and each sink's state, as `sensorpipe status` shows them",
            "responses": {"200": _ok("status: {sinks, workers, http}"), **AUTH, "503": UNAVAILABLE}}},
        "/metrics": {"get": {
            "summary": "Prometheus text exposition of every worker's counters",
            "responses": {"200": _ok("metrics", {"type": "string"}, "text/plain"), **AUTH}}},
        "/healthz": {"get": {"summary": "The HTTP worker answers", "security": [],
                             "responses": {"200": _ok("{ok: true}")}}},
        "/readyz": {"get": {
            "summary": "The edge accepts, the journal is writable, no enabled sink failing for longer than"
                       " [http] sink_failing_for_s", "security": [],
            "responses": {"200": _ok("{ok: true, checks}"), "503": _ok("{ok: false, checks}: what is wrong")}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": _ok("OpenAPI 3.1")}}},
        "/": {"get": {"summary": "The dashboard", "security": [],
                      "responses": {"200": _ok("HTML", {"type": "string"}, "text/html")}}},
    },
}
