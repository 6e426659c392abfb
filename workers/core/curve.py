"""CURVE between workers when an internal endpoint reaches beyond loopback (docs/security.md).

On 127.0.0.1 the internal sockets use PLAIN with ``pipeline.secret`` (``workers.core.runtime``): the
risk there is a stranger on the host connecting, not one reading the traffic. An endpoint whose host
is anything else (an address, ``*``, an interface name) is reachable from other hosts, so its traffic
is encrypted and both ends prove who they are with CURVE keys. The keys live in the data directory,
in pyzmq's certificate layout (``zmq.auth.create_certificates``: ``NAME.key`` holds the public key,
``NAME.key_secret`` both), every file 0600, made by ``sensorpipe keys init``::

    <data>/curve/server.key, server.key_secret    the workers' binding sockets
    <data>/curve/worker.key, worker.key_secret    the workers' connecting sockets (and the CLI's)
    <data>/curve/clients/NAME.key, .key_secret    programs elsewhere that ask the query and commands
                                                  workers; accepted only once [curve] clients lists them

A host that runs only connecting workers (a parser elsewhere) needs ``server.key`` and the worker pair;
a client program needs ``server.key`` and its own pair (``[curve] identity = "clients/NAME"``).
Every binding socket beyond loopback accepts the worker key; the query and commands endpoints also
accept the client keys listed in ``[curve] clients``; the ZAP handler refuses (and counts) any other.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import zmq

    from workers.core.config import Config

# zmq is imported where keys are made or read, not here: the configuration (which checks endpoints
# with this module) loads without the ZeroMQ library (tests/test_layers.py).

SERVER = "server"
WORKER = "worker"
CLIENTS = "clients"
WORKERS_DOMAIN = "sensorpipe-curve"             # ZAP domain of binding sockets only workers may reach
CLIENTS_DOMAIN = "sensorpipe-clients"           # the query and commands endpoints: workers and listed clients
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class CurveKeyError(Exception):
    """A key that is missing or cannot be read; the message says which file and what to run."""


def endpoint_host(endpoint: str) -> str | None:
    """The host part of a ``tcp://host:port`` endpoint, None for ipc://, inproc:// (never leave the host)."""
    if not endpoint.startswith(("tcp://", "ws://", "wss://")):
        return None
    rest = endpoint.split("://", 1)[1]
    if ";" in rest:                             # "tcp://source;host:port": the peer is what counts
        rest = rest.split(";", 1)[1]
    host = rest.rsplit(":", 1)[0].split("/", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def beyond_loopback(endpoint: str) -> bool:
    """True when a socket on ``endpoint`` may talk to another host: its traffic needs CURVE."""
    host = endpoint_host(endpoint)
    if host is None or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True                             # "*", a host or interface name: could be anything


@dataclass(frozen=True)
class Keys:
    """What this process's sockets need for CURVE. ``server_secret`` is None on a host that only
    connects (it then cannot bind beyond loopback)."""
    server_public: bytes
    server_secret: bytes | None
    public: bytes                               # the identity this process presents as a client
    secret: bytes
    worker_public: bytes                        # accepted on every binding socket
    clients: frozenset[bytes]                   # accepted on the query and commands endpoints too
    client_endpoints: frozenset[str]            # those endpoints


def keys_dir(data_dir: str | Path, configured: str) -> Path:
    path = Path(configured)
    return path if path.is_absolute() else Path(data_dir) / path


def _write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    import zmq.auth

    umask = os.umask(0o077)                     # the secret is never readable by others, not for an instant
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(umask)
    for path in (public, secret):
        os.chmod(path, 0o600)                   # also a pair written over one made by hand
    return Path(public), Path(secret)


def init_keys(directory: Path, clients: Iterable[str] = (), force: bool = False) -> list[Path]:
    """Write the server and worker keypairs (unless there, or ``force``) and one pair per client
    name; return the files written. A client pair that exists is kept unless ``force``."""
    written: list[Path] = []
    for name in (SERVER, WORKER):
        if force or not (directory / f"{name}.key_secret").exists():
            written.extend(_write_pair(directory, name))
    for client in clients:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", client) or client.startswith("."):
            raise CurveKeyError(f"client name {client!r}: letters, digits, '.', '_' and '-' only")
        if force or not (directory / CLIENTS / f"{client}.key_secret").exists():
            written.extend(_write_pair(directory / CLIENTS, client))
    return written


def read_pair(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise CurveKeyError(f"{path}: no such file (sensorpipe keys init makes the keys)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path}: {exc} (sensorpipe keys init makes the keys)") from None
    if need_secret and not secret:
        raise CurveKeyError(f"{path} holds no secret key (sensorpipe keys init makes the keys)")
    return public, secret


def public_key(entry: str, directory: Path) -> bytes:
    """A ``[curve] clients`` entry: a Z85 public key (40 characters), or a ``.key`` file (absolute, or
    relative to the keys directory, e.g. ``clients/dashboard.key``)."""
    from zmq.utils import z85

    if _Z85_KEY.fullmatch(entry):
        try:
            if len(z85.decode(entry)) == 32:
                return entry.encode()
        except Exception:
            pass
    path = Path(entry)
    return read_pair(path if path.is_absolute() else directory / path, need_secret=False)[0]


def load(data_dir: str | Path, configured_dir: str, identity: str, client_entries: Iterable[str],
         client_endpoints: Iterable[str]) -> Keys:
    """Read the keys this process needs; CurveKeyError names the missing file."""
    directory = keys_dir(data_dir, configured_dir)
    server_public, _ = read_pair(directory / f"{SERVER}.key", need_secret=False)
    server_secret_file = directory / f"{SERVER}.key_secret"
    server_secret = read_pair(server_secret_file, True)[1] if server_secret_file.exists() else None
    public, secret = read_pair(directory / f"{identity}.key_secret", need_secret=True)
    worker_file = directory / f"{WORKER}.key"
    worker_public = read_pair(worker_file, False)[0] if worker_file.exists() else public
    clients = frozenset(public_key(entry, directory) for entry in client_entries)
    assert secret is not None
    return Keys(server_public, server_secret, public, secret, worker_public, clients, frozenset(client_endpoints))


def for_config(cfg: Config, endpoints: Iterable[str]) -> Keys | None:
    """The keys a process of this configuration needs, or None when every endpoint in ``endpoints``
    (its internal endpoints) stays on loopback."""
    if not any(beyond_loopback(endpoint) for endpoint in endpoints):
        return None
    return load(cfg.data_dir, cfg.curve.keys_dir, cfg.curve.identity, cfg.curve.clients,
                (cfg.endpoints.query, cfg.endpoints.command))


class AllowedKeys:
    """pyzmq's CURVE credentials provider: the client keys each ZAP domain accepts."""

    def __init__(self, keys: Keys) -> None:
        self.allowed = {WORKERS_DOMAIN: {keys.worker_public},
                        CLIENTS_DOMAIN: {keys.worker_public, *keys.clients}}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed.get(domain, ())


def make_server(sock: zmq.Socket, keys: Keys, endpoint: str) -> None:
    if keys.server_secret is None:
        raise CurveKeyError(f"binding {endpoint} beyond loopback needs the server's secret key"
                        f" ({SERVER}.key_secret, from sensorpipe keys init, on the host that binds)")
    sock.curve_publickey = keys.server_public
    sock.curve_secretkey = keys.server_secret
    sock.curve_server = True
    sock.zap_domain = (CLIENTS_DOMAIN if endpoint in keys.client_endpoints else WORKERS_DOMAIN).encode()


def make_client(sock: zmq.Socket, keys: Keys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
