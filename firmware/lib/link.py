# TCP to the server: the text connection (lines out, command lines in) and
# one-packet binary connections answered by the server's `A`, over TLS when
# config.TLS_CA names a certificate (see Tls).
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


class Tls:
    # The server is trusted by one certificate in DER (the CA of
    # `sensorpipe certs init`, or a self-signed server certificate itself),
    # and must carry `host` as its name. Made once: on a small board loading
    # the certificate costs RAM and time, each connection then only wraps.
    def __init__(self, cadata, host):
        import ssl

        self.host = host
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            self.ctx.load_verify_locations(cadata=cadata)
        except ValueError as e:
            raise ValueError("config.TLS_CA: not a certificate in DER (%s)" % e)

    def wrap(self, sock):
        # A wrong certificate is a ValueError in MicroPython's ssl: an OSError
        # here, so the caller retries later like any other failed connection.
        try:
            return self.ctx.wrap_socket(sock, server_hostname=self.host)
        except ValueError as e:
            raise OSError(ECONNRESET, "TLS: %s" % str(e).strip())


def tls_from(ca_file, host):
    # config.TLS_CA (a file on the board) -> Tls, or None for plain TCP.
    if not ca_file:
        return None
    with open(ca_file, "rb") as f:
        return Tls(f.read(), host)


def _connect(host, port, timeout_s, tls=None):
    # (stream, raw): the stream to read and write (TLS or the socket itself)
    # and the socket whose timeout applies (MicroPython's TLS sockets have no
    # settimeout of their own; CPython's do, and their raw socket is spent).
    addr = socket.getaddrinfo(host, port)[0][-1]
    sock = socket.socket()
    try:
        sock.settimeout(timeout_s)
        sock.connect(addr)
        if tls is None:
            return sock, sock
        stream = tls.wrap(sock)
    except BaseException:
        sock.close()
        raise
    return stream, stream if hasattr(stream, "settimeout") else sock


def _send(sock, data):
    if hasattr(sock, "sendall"):
        sock.sendall(data)
    else:
        sock.write(data)


class TextLink:
    def __init__(self, host, port, timeout_s, hello=None, tls=None):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.hello = hello  # the first line on each connection (lib/devauth.py), or None
        self.tls = tls
        self.sock = None
        self.raw = None  # whose timeout applies (see _connect)
        self._pending = b""

    def connected(self):
        return self.sock is not None

    def open(self):
        if self.sock is None:
            self.sock, self.raw = _connect(self.host, self.port, self.timeout_s, self.tls)
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
        self.raw.settimeout(self.timeout_s)
        try:
            _send(self.sock, data)
        except OSError:
            self.close()
            raise

    def lines(self, wait_ms):
        # Command lines that arrive within wait_ms (0: only those already here).
        # Raises OSError when the server has closed the connection.
        out = []
        self.raw.settimeout(wait_ms / 1000 if wait_ms > 0 else 0)
        while True:
            try:
                chunk = self.sock.recv(256)
            except OSError as e:
                if _timed_out(e):
                    break
                self.close()
                raise
            if chunk is None:  # MicroPython's TLS socket, non-blocking, nothing to read
                break
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
                self.raw.settimeout(0)
        return out

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.raw = None


def send_packet(host, port, packet, timeout_s, ack_timeout_s, tls=None):
    # True once the server answered `A`; False when it closed without it.
    # OSError when it could not be reached.
    sock, raw = _connect(host, port, timeout_s, tls)
    try:
        _send(sock, packet)
        raw.settimeout(ack_timeout_s)
        try:
            reply = sock.recv(1)
        except OSError as e:
            if _timed_out(e):
                return False
            raise
        return reply == b"A"
    finally:
        sock.close()
