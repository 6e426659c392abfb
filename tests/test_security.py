"""Hostile peers against a pipeline whose listeners require credentials: real worker processes, real
sockets. Meanwhile a good device streams, and loses nothing."""
from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for
from workers.core import credentials

SECURE = dict(auth="required", per_address=8, rate=200, text_extra="auth_timeout_s = 1")
FLOOD_SOURCE = "127.0.0.2"          # the flooding peer's own source address (loopback); the target is 127.0.0.1


def add_device(p: Pipeline, device: str, *args: str) -> str:
    result = p.cli("devices", "add", device, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def edge_counter(p: Pipeline, name: str, worker: str = "edge") -> int:
    """A counter summed over the workers whose name starts with ``worker`` (parser:1, parser:2...)."""
    reply = p.query({"op": "status"})
    return sum(c.get(name, 0) for w, c in reply["workers"].items() if w.startswith(worker))


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (what it sends first is read and ignored)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


class Board:
    """A text-port device: a hello, then lines; reads what the server writes back."""

    def __init__(self, port: int, device: str | None = None, token: str | None = None,
                 source: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.buffer = b""
        if device is not None:
            self.send({"auth": {"device": device, "token": token}})

    def send(self, obj: dict) -> None:
        self.sock.sendall(orjson.dumps(obj) + b"\n")

    def line(self, timeout: float = 10) -> dict | None:
        """The next line, or None when the server closed the connection."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def closed_by_server(self, timeout: float = 10) -> bool:
        return closed_by_server(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


class Streamer(threading.Thread):
    """A good device writing one reading every 20 ms the whole time; what it sent must all arrive."""

    def __init__(self, port: int, device: str, token: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(daemon=True)
        self.board = Board(port, device, token, tls=tls)
        assert self.board.line() == {"auth": "ok"}
        self.device = device
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sent += 1
            self.board.send({"device": self.device, "n": self.sent})
            time.sleep(0.02)              # the device's pace, not a wait for the system under test

    def finish(self, p: Pipeline) -> None:
        self.stop.set()
        self.join()
        wait_for(lambda: p.count_rows("readings", "WHERE device = ? AND field = 'n'", (self.device,)) == self.sent,
                 message=f"all {self.sent} readings of the streaming device")
        self.board.close()


def dead_letters(p: Pipeline) -> list[dict]:
    result = p.cli("deadletters", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.startswith("[") else []


def test_text_port_credentials_against_hostile_peers(pipeline_factory) -> None:
    p = pipeline_factory(**SECURE)
    p.start_all(COMMAND_ROLES)
    good = add_device(p, "greenhouse-1")
    other = add_device(p, "victim")
    gateway = add_device(p, "gw-1", "--may-report", "greenhouse-*")
    doomed = add_device(p, "doomed")
    streamer = Streamer(p.text_port, "greenhouse-1", good)
    streamer.start()

    # no hello: the first frame is a reading; denied, closed, stored nowhere
    board = Board(p.text_port)
    board.send({"device": "victim", "temp": 99})
    assert board.line() == {"auth": "denied"} and board.closed_by_server()
    # a wrong token, an unknown device
    for device, token in (("victim", good), ("nobody", good), ("victim", "")):
        board = Board(p.text_port, device, token)
        assert board.line() == {"auth": "denied"}, device
    # a hello that never comes: closed at the deadline (1 s)
    silent = Board(p.text_port)
    assert silent.closed_by_server(timeout=5)

    # a device writing as another: dead-lettered with the reason, stored nowhere
    board = Board(p.text_port, "greenhouse-1", good)
    assert board.line() == {"auth": "ok"}
    board.send({"device": "victim", "temp": 99})
    board.send({"temp": 21.5})                    # names no device: it is greenhouse-1's own
    wait_for(lambda: p.latest("greenhouse-1").get("temp") == 21.5, message="own reading")
    letters = wait_for(lambda: [d for d in dead_letters(p) if "may not report for 'victim'" in d["reason"]],
                       message="the impostor's frame as a dead letter")
    assert letters[0]["reason"] == "connection authenticated as 'greenhouse-1' may not report for 'victim'"
    board.close()

    # a gateway reports for the devices its patterns name, not for others
    relay = Board(p.text_port, "gw-1", gateway)
    assert relay.line() == {"auth": "ok"}
    relay.send({"device": "greenhouse-7", "soil": 512})
    relay.send({"device": "barn-1", "soil": 1})
    wait_for(lambda: p.latest("greenhouse-7") == {"soil": 512}, message="relayed reading")
    wait_for(lambda: any("may not report for 'barn-1'" in d["reason"] for d in dead_letters(p)), message="barn-1 refused")

    # commands go only to the connection that authenticated as the device
    victim = Board(p.text_port, "victim", other)
    assert victim.line() == {"auth": "ok"}
    victim.send({"device": "victim", "temp": 20})
    wait_for(lambda: p.latest("victim") == {"temp": 20}, message="victim's own reading")
    result = p.cli("send", "victim", '{"cmd":"open"}', "--id", "c1", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "delivered", result.stderr
    assert victim.line() == {"id": "c1", "cmd": "open"}

    # revoked: the open connection is closed, and the token no longer opens one
    kept = Board(p.text_port, "doomed", doomed)
    assert kept.line() == {"auth": "ok"}
    result = p.cli("devices", "revoke", "doomed")
    assert result.returncode == 0, result.stderr
    assert kept.closed_by_server(timeout=5)
    again = Board(p.text_port, "doomed", doomed)
    assert again.line() == {"auth": "denied"}

    # sensorpipe feed: the hello first (its first: checked while the peer has already hung up)
    feeder = add_device(p, "feeder")
    result = p.cli("feed", "--device", "feeder", "--token", feeder, '{"temp": 23.5}', '{"temp": 23.6}')
    assert result.returncode == 0, result.stderr
    wait_for(lambda: p.latest("feeder") == {"temp": 23.6}, message="fed readings")
    result = p.cli("feed", "--device", "feeder", "--token", other, '{"temp": 1}')
    assert result.returncode == 2 and "refused the hello" in result.stderr, result.stderr
    result = p.cli("feed", '{"device": "feeder", "temp": 1}')
    assert result.returncode == 2 and "requires a hello" in result.stderr, result.stderr

    # a flood of connections from one address: 8 are held, the rest refused; others still connect
    flood = [socket.create_connection(("127.0.0.1", p.text_port), source_address=(FLOOD_SOURCE, 0))
             for _ in range(30)]
    wait_for(lambda: edge_counter(p, "refused_address_limit") >= 22, message="refused flood connections")
    late = Board(p.text_port, "victim", other)
    assert late.line() == {"auth": "ok"}
    for sock in flood:
        sock.close()

    # a burst over the rate (200 frames/s): the edge stops reading for a while; nothing is dropped
    burst = Board(p.text_port, "victim", other)
    assert burst.line() == {"auth": "ok"}
    burst.sock.sendall(b"".join(orjson.dumps({"device": "victim", "i": i}) + b"\n" for i in range(600)))
    wait_for(lambda: p.count_rows("readings", "WHERE device = 'victim' AND field = 'i'") == 600, timeout=20,
             message="the whole burst")
    streamer.finish(p)

    counters = wait_for(lambda: (lambda c: c if c.get("rate_limited") and c.get("closed_revoked") else None)(
        p.query({"op": "status"})["workers"]["edge"]), message="edge counters")
    assert counters["auth_missing"] == 2 and counters["auth_denied"] == 4 and counters["auth_timeouts"] >= 1
    assert edge_counter(p, "foreign_device_frames", "parser") == 2
    assert p.count_rows("readings", "WHERE device IN ('barn-1', 'nobody') OR (device = 'victim' AND field = 'temp'"
                        " AND value = 99)") == 0

    listing = p.cli("devices")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[2:]}
    assert "yes (gateway: greenhouse-*)" in rows["gw-1"] and "doomed" not in rows
    assert " no " in rows["greenhouse-7"] + " "


def balcony(light: int) -> bytes:
    data = struct.pack("<HHH", light, 30200, 25826)
    return struct.pack("<HHHBBB", len(data), 600, 60, 6, 1, 1) + data


def send_packet(p: Pipeline, packet: bytes, refused: bool) -> bytes:
    """What the edge answers: ``b"A"``, or nothing. Nothing is told apart from slowness by the dead
    letter the refused packet becomes: the edge answers a packet before the parsers see it."""
    before = len(dead_letters(p))
    with socket.create_connection(("127.0.0.1", p.binary_port), timeout=5) as sock:
        sock.sendall(packet)
        if refused:
            wait_for(lambda: len(dead_letters(p)) > before, message="the packet as a dead letter")
            sock.setblocking(False)
            try:
                return sock.recv(16)
            except BlockingIOError:
                return b""
        return sock.recv(1)


def test_binary_port_mac_and_replay(pipeline_factory) -> None:
    p = pipeline_factory(**SECURE)
    p.start_all()

    def accepted(packet: bytes) -> bool:
        return send_packet(p, packet, refused=False) == b"A"

    def refused(packet: bytes) -> bool:
        return send_packet(p, packet, refused=True) == b""

    key = credentials.mac_key_for(add_device(p, "balcony"))
    first = credentials.sign_packet(key, balcony(300), 1)
    assert accepted(first)
    wait_for(lambda: p.latest("balcony").get("light") == 300, message="authenticated packet stored")
    assert accepted(first)            # the newest packet again (its A lost): answered, stored nothing
    assert refused(credentials.sign_packet(credentials.mac_key_for("guess"), balcony(666), 2))   # forged
    tampered = bytearray(credentials.sign_packet(key, balcony(301), 3))
    tampered[9] ^= 0xFF
    assert refused(bytes(tampered))
    assert refused(balcony(302) + bytes(credentials.PACKET_TRAILER))     # a seed-style board: no MAC
    assert accepted(credentials.sign_packet(key, balcony(303), 2))
    wait_for(lambda: p.latest("balcony").get("light") == 303, message="the next counter")

    # the counter outlives an edge restart
    p.stop("edge:1")
    p.start("edge")
    wait_for(p._port_open, message="edge back")
    assert refused(first)                                                 # replayed: below the known one
    assert accepted(credentials.sign_packet(key, balcony(303), 2))        # the newest again: answered only
    assert accepted(credentials.sign_packet(key, balcony(305), 7))
    wait_for(lambda: p.latest("balcony").get("light") == 305, message="after the restart")

    reasons = [d["reason"] for d in dead_letters(p)]
    assert sum("replayed packet" in r for r in reasons) == 1
    assert sum("bad MAC" in r for r in reasons) == 3
    lights = [row[0] for row in p.db().execute(
        "SELECT value FROM readings WHERE device = 'balcony' AND field = 'light' ORDER BY value")]
    assert lights == [300, 303, 305]
    wait_for(lambda: edge_counter(p, "binary_replayed") == 1 and edge_counter(p, "binary_resent") == 1,
             message="the new edge's counters")


def test_tls_listener(pipeline_factory, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    from workers.tools.security import certs_init
    ca, _, cert, key = certs_init(certs, ["localhost", "127.0.0.1"])
    p = pipeline_factory(auth="required", text_extra=f'auth_timeout_s = 1\ntls_cert = "{cert}"\ntls_key = "{key}"')
    p.start("query")
    p.start("sink-sqlite")
    p.start("rollup")
    p.start("parser")
    p.start("edge")
    wait_for(lambda: p.query({"op": "ping"}, timeout=0.5).get("ok"), message="query worker")
    wait_for(p._port_open, message="edge listener")
    token = add_device(p, "greenhouse-1")
    trust = ssl.create_default_context(cafile=str(ca))
    streamer = Streamer(p.text_port, "greenhouse-1", token, tls=trust)
    streamer.start()

    # plain text, garbage, and a handshake that never finishes: each a counted, closed connection
    board = Board(p.text_port)
    board.send({"auth": {"device": "greenhouse-1", "token": token}})
    assert board.closed_by_server()
    junk = socket.create_connection(("127.0.0.1", p.text_port), timeout=5)
    junk.sendall(bytes(range(256)) * 4)
    assert closed_by_server(junk)
    stuck = socket.create_connection(("127.0.0.1", p.text_port), timeout=5)
    stuck.sendall(b"\x16\x03\x01\x00\xff")                              # the start of a ClientHello, then nothing
    assert closed_by_server(stuck, timeout=5)
    # a client that does not trust our CA gives up; the server counts it too
    with pytest.raises(ssl.SSLCertVerificationError):
        Board(p.text_port, tls=ssl.create_default_context())

    # sensorpipe feed speaks TLS with --ca
    result = p.cli("feed", "--device", "greenhouse-1", "--token", token, "--ca", str(ca), '{"temp": 22.5}')
    assert result.returncode == 0, result.stderr
    wait_for(lambda: p.latest("greenhouse-1").get("temp") == 22.5, message="a reading over TLS")
    streamer.finish(p)
    # the edge's stats come every 2 s: wait for a report made after the feed's handshake
    wait_for(lambda: edge_counter(p, "tls_failed") >= 4 and edge_counter(p, "tls_handshakes") >= 2,
             message="failed and good handshakes counted")


def client_certificate(ca_pem: Path, ca_key_pem: Path, out: Path, name: str) -> tuple[Path, Path]:
    """A client certificate signed by the CA ``certs init`` made (what a board would be given)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_client_certificates(pipeline_factory, tmp_path: Path) -> None:
    from workers.tools.security import certs_init

    ca, ca_key, cert, key = certs_init(tmp_path / "certs", ["localhost"])
    p = pipeline_factory(auth="required", text_extra=f'auth_timeout_s = 2\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                                                     f'tls_client_ca = "{ca}"')
    p.start_all(("query", "sink-sqlite", "rollup", "parser", "edge"))
    token = add_device(p, "greenhouse-1")
    board_cert, board_key = client_certificate(ca, ca_key, tmp_path, "greenhouse-1")
    with_cert = ssl.create_default_context(cafile=str(ca))
    with_cert.load_cert_chain(str(board_cert), str(board_key))
    board = Board(p.text_port, "greenhouse-1", token, tls=with_cert)
    assert board.line() == {"auth": "ok"}
    board.send({"temp": 19.5})
    wait_for(lambda: p.latest("greenhouse-1") == {"temp": 19.5}, message="a reading from a certified board")
    board.close()

    # no client certificate: the server ends the handshake (TLS 1.3 tells the client at its first read)
    without = Board(p.text_port, tls=ssl.create_default_context(cafile=str(ca)))
    try:
        without.send({"auth": {"device": "greenhouse-1", "token": token}})
    except OSError:                      # the alert may have come first (ssl.SSLError is an OSError)
        pass
    assert without.closed_by_server()
    wait_for(lambda: edge_counter(p, "tls_failed") >= 1, message="the refused handshake counted")


def test_binary_resend_is_stored_once(pipeline_factory) -> None:
    """A board that got no ``A`` sends the same packet again, byte for byte (docs/protocols.md): answered,
    stored once, also when the edge was SIGKILLed right after the first ``A`` (the known counters are
    written beside the journal before it, not once a second after it)."""
    p = pipeline_factory(**SECURE)
    p.start_all()
    key = credentials.mac_key_for(add_device(p, "balcony"))
    first = credentials.sign_packet(key, balcony(500), 1)
    assert send_packet(p, first, refused=False) == b"A"
    p.kill("edge:1")                                  # within the second the store is written in
    p.start("edge")
    wait_for(p._port_open, message="edge back")
    assert send_packet(p, first, refused=False) == b"A"
    # twice on one connection, the second right behind the first: one A each, in order, one row
    second = credentials.sign_packet(key, balcony(501), 2)
    with socket.create_connection(("127.0.0.1", p.binary_port), timeout=5) as sock:
        sock.sendall(second + second)
        replies = b""
        while len(replies) < 2:
            chunk = sock.recv(2)
            assert chunk, replies
            replies += chunk
    assert replies == b"AA"
    wait_for(lambda: p.latest("balcony").get("light") == 501, message="the second packet")
    wait_for(lambda: edge_counter(p, "binary_resent") + edge_counter(p, "binary_resent_waiting") >= 1,
             message="the resends counted")

    def lights() -> list:
        return [row[0] for row in p.db().execute(
            "SELECT value FROM readings WHERE device = 'balcony' AND field = 'light' ORDER BY value")]

    # the query worker may have the reading before the SQLite sink's commit: wait for the store
    wait_for(lambda: 501 in lights(), message="the second packet stored")
    assert lights() == [500, 501]
    assert not dead_letters(p)
