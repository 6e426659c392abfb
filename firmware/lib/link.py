# TCP to the server: the text connection (lines out, command lines in) and
# one-packet binary connections answered by the server's `A`.
#
# Every socket error surfaces as OSError; callers close and reconnect later.

import socket

EAGAIN = 11
ECONNRESET = 104
ETIMEDOUT = 110
MAX_LINE = 2048  # a longer command line is dropped (an update's manifest is the longest)


def _timed_out(e):
    # MicroPython: OSError(EAGAIN / ETIMEDOUT); CPython: socket.timeout,
    # BlockingIOError.
    code = e.args[0] if e.args else None
    return code in (EAGAIN, ETIMEDOUT, "timed out") or getattr(e, "errno", None) in (EAGAIN, ETIMEDOUT)


def _connect(host, port, timeout_s):
    addr = socket.getaddrinfo(host, port)[0][-1]
    sock = socket.socket()
    try:
        sock.settimeout(timeout_s)
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _send(sock, data):
    if hasattr(sock, "sendall"):
        sock.sendall(data)
    else:
        sock.write(data)


class TextLink:
    def __init__(self, host, port, timeout_s, hello=None):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.hello = hello  # the first line on each connection (lib/devauth.py), or None
        self.sock = None
        self._pending = b""

    def connected(self):
        return self.sock is not None

    def open(self):
        if self.sock is None:
            self.sock = _connect(self.host, self.port, self.timeout_s)
            self._pending = b""
            if self.hello:
                self._greet()

    def _greet(self):
        # The server answers the hello with one line before anything else.
        self.send(self.hello)
        answer = self.lines(self.timeout_s * 1000)
        if not answer or answer[0] != b'{"auth":"ok"}':
            self.close()
            raise OSError(ECONNRESET, "the server refused the hello")
        # a command line that came right behind the answer is not lost
        self._pending = b"\n".join(answer[1:]) + (b"\n" if len(answer) > 1 else b"") + self._pending

    def send(self, data):
        self.sock.settimeout(self.timeout_s)
        try:
            _send(self.sock, data)
        except OSError:
            self.close()
            raise

    def lines(self, wait_ms):
        # Command lines that arrive within wait_ms (0: only those already here).
        # Raises OSError when the server has closed the connection.
        out = []
        self.sock.settimeout(wait_ms / 1000 if wait_ms > 0 else 0)
        while True:
            try:
                chunk = self.sock.recv(256)
            except OSError as e:
                if _timed_out(e):
                    break
                self.close()
                raise
            if not chunk:
                self.close()
                raise OSError(ECONNRESET, "server closed the connection")
            self._pending += chunk
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                line = line.strip()
                if line:
                    out.append(line)
            if len(self._pending) > MAX_LINE:
                self._pending = b""
            if out:
                # got something: take only what is already here
                self.sock.settimeout(0)
        return out

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


def send_packet(host, port, packet, timeout_s, ack_timeout_s):
    # True once the server answered `A`; False when it closed without it.
    # OSError when it could not be reached.
    sock = _connect(host, port, timeout_s)
    try:
        _send(sock, packet)
        sock.settimeout(ack_timeout_s)
        try:
            reply = sock.recv(1)
        except OSError as e:
            if _timed_out(e):
                return False
            raise
        return reply == b"A"
    finally:
        sock.close()
