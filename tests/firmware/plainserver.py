"""A plain stand-in for the server's device ports, for what the real edge does not do yet (commands).

Binds two listeners on free 127.0.0.1 ports: ``text_port`` records every line and, once a connection
has sent its first line, writes the queued ``commands`` to it (one per line, as the server will);
``binary_port`` reads one packet per connection and answers ``A`` (or nothing when ``ack`` is False).
"""
from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from typing import Any, Callable

HEADER = struct.Struct("<HHHBBB")


class PlainServer:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.packets: list[bytes] = []
        self.commands: list[bytes] = []
        self.ack = True
        self._lock = threading.Lock()
        owner = self

        class Text(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                pending = b""
                greeted = False
                self.request.settimeout(10)
                while True:
                    try:
                        chunk = self.request.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        return
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        with owner._lock:
                            owner.lines.append(line)
                            commands, owner.commands = (owner.commands, []) if not greeted else ([], owner.commands)
                        greeted = True
                        for command in commands:
                            self.request.sendall(command.rstrip(b"\n") + b"\n")

        class Binary(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(10)
                data = b""
                while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                with owner._lock:
                    owner.packets.append(data)
                if owner.ack:
                    self.request.sendall(b"A")

        self._servers = [_Server(("127.0.0.1", 0), Text), _Server(("127.0.0.1", 0), Binary)]
        self.text_port = self._servers[0].server_address[1]
        self.binary_port = self._servers[1].server_address[1]
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                         for s in self._servers]
        for thread in self._threads:
            thread.start()

    def send_commands(self, *commands: bytes) -> None:
        """Queue commands for the next text connection that sends a line."""
        with self._lock:
            self.commands.extend(commands)

    def wait(self, predicate: Callable[["PlainServer"], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                value = predicate(self)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out; lines: {self.lines!r}; packets: {self.packets!r}")

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: socket.socket, client_address: Any) -> None:
        pass  # a board that hangs up mid-line is not a test failure
