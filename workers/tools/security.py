"""The user's security commands: device credentials (``sensorpipe devices add|revoke``) and
certificates (``sensorpipe certs init``). docs/security.md is the guide.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import socket
from pathlib import Path

from workers.core.config import Config
from workers.core.credentials import CredentialError, CredentialStore

CA_DAYS = 3650
SERVER_DAYS = 825                     # what browsers and most TLS stacks still accept for a leaf


class SecurityError(Exception):
    """Printed as ``sensorpipe: <message>`` by the CLI."""


def devices_add(cfg: Config, device: str, may_report: list[str], replace: bool) -> list[str]:
    """Lines to print; the token is the last one (scripts take ``| tail -1``)."""
    store = CredentialStore(cfg.data_dir)
    try:
        token = store.add(device, may_report, replace=replace)
    except CredentialError as exc:
        raise SecurityError(str(exc)) from None
    finally:
        store.close()
    lines = [f"sensorpipe: made a credential for {device}"
             + (f" (may also report for {', '.join(may_report)})" if may_report else "") + ".",
             "sensorpipe: its token follows; it is shown this once (the store keeps only a hash).",
             f"sensorpipe: text port hello: {{\"auth\":{{\"device\":\"{device}\",\"token\":\"<token>\"}}}}",
             token]
    return lines


def devices_revoke(cfg: Config, device: str) -> str:
    store = CredentialStore(cfg.data_dir)
    try:
        if not store.revoke(device):
            raise SecurityError(f"device {device} has no credential")
    finally:
        store.close()
    return f"sensorpipe: revoked {device}'s credential; its connections are closed within a second"


def credential_column(cfg: Config) -> dict[str, str]:
    """device -> what ``sensorpipe devices`` shows in its credential column."""
    path = Path(cfg.data_dir) / "credentials.db"
    if not path.exists():
        return {}
    store = CredentialStore(cfg.data_dir)
    try:
        return {c.device: "yes" + (f" (gateway: {', '.join(c.may_report)})" if c.may_report else "")
                for c in store.all()}
    finally:
        store.close()


# --------------------------------------------------------------------------- Mosquitto


def mosquitto_files(cfg: Config, passwords: Path, acl: Path) -> list[str]:
    """Write Mosquitto's password and ACL files from the credential store: each device logs in with
    its id and token, may publish only on its own uplink topics and read only its own downlink; the
    MQTT worker (``[mqtt] username``/``password``) reads every uplink and writes every downlink.
    Lines to print (the ``mosquitto.conf`` settings)."""
    from workers.core.credentials import mosquitto_hash
    from workers.core.templates import TopicTemplate

    subscriptions = [(TopicTemplate(s.topic), TopicTemplate(s.downlink) if s.downlink else None)
                     for s in cfg.mqtt.subscriptions]
    if not subscriptions:
        raise SecurityError("no [[mqtt.subscriptions]] in the configuration: no topics to give devices")
    store = CredentialStore(cfg.data_dir)
    try:
        held = store.all()
    finally:
        store.close()
    users: list[str] = []
    rules = ["# Written by `sensorpipe devices mosquitto`; written again after each `devices add|revoke`.", ""]
    notes: list[str] = []
    if cfg.mqtt.username and cfg.mqtt.password:
        users.append(f"{cfg.mqtt.username}:{mosquitto_hash(cfg.mqtt.password)}")
        rules.append(f"user {cfg.mqtt.username}")
        for up, down in subscriptions:
            rules.append(f"topic read {up.filter}")
            if down is not None:
                rules.append(f"topic write {down.filter}")
        rules.append("")
    else:
        notes.append("sensorpipe: [mqtt] has no username/password: the MQTT worker gets no account in these files")
    for credential in held:
        if cfg.mqtt.username and credential.device == cfg.mqtt.username:
            raise SecurityError(f"device {credential.device} has the MQTT worker's username")
        if not credential.mosquitto_hash:
            notes.append(f"sensorpipe: {credential.device}'s credential predates MQTT accounts: devices add --replace")
            continue
        users.append(f"{credential.device}:{credential.mosquitto_hash}")
        rules.append(f"user {credential.device}")
        for up, down in subscriptions:
            rules.append(f"topic write {up.topic(credential.device)}")
            if down is not None:
                rules.append(f"topic read {down.topic(credential.device)}")
        rules.append("")
    _write_private(passwords, "".join(u + "\n" for u in users))
    _write_private(acl, "\n".join(rules))
    return [*notes,
            f"sensorpipe: wrote {len(users)} accounts to {passwords} and their topics to {acl}; in mosquitto.conf:",
            "  allow_anonymous false",
            f"  password_file {passwords.resolve()}",
            f"  acl_file {acl.resolve()}",
            "sensorpipe: a running broker reads them again on SIGHUP (systemctl reload mosquitto)"]


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` whole (a broker reading it never sees half a file), readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- certificates


def certs_init(out_dir: Path, hosts: list[str], force: bool = False) -> list[Path]:
    """A CA (``ca.pem``, ``ca.key``) and a server certificate it signs (``server.pem``, ``server.key``)
    for ``hosts`` (names or IP addresses). Keys are written 0600."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise SecurityError("certs init needs the cryptography library: pip install 'sensorpipe[certs]'") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("ca.pem", "ca.key", "server.pem", "server.key")]
    if not force and any(p.exists() for p in paths):
        raise SecurityError(f"{out_dir} holds certificates already (--force writes over them; devices that"
                            " trust the old CA must be given the new one)")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sensorpipe CA {socket.gethostname()}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    for path, data, private in ((paths[0], ca.public_bytes(serialization.Encoding.PEM), False),
                                (paths[1], key_pem(ca_key), True),
                                (paths[2], server.public_bytes(serialization.Encoding.PEM), False),
                                (paths[3], key_pem(server_key), True)):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return paths


def cmd_certs(args: argparse.Namespace) -> int:
    """Make a small CA and a server certificate for TLS listeners (sensorpipe certs init)."""
    from workers.tools.cli import CommandError, _load

    if args.action != "init":
        raise CommandError(f"certs: unknown action {args.action!r} (init)")
    out = Path(args.dir) if args.dir else Path(_load(args).data_dir) / "certs"
    hosts = args.host or [socket.gethostname(), "localhost", "127.0.0.1"]
    try:
        ca, _, cert, key = certs_init(out, hosts, args.force)
    except SecurityError as exc:
        raise CommandError(str(exc)) from None
    print(f"sensorpipe: wrote {ca} (give it to devices: they trust the server by it), {cert} and {key}"
          f" for {', '.join(hosts)}")
    print("sensorpipe: to use them, in each [[listeners]] entry:")
    print(f'  tls_cert = "{cert.resolve()}"')
    print(f'  tls_key = "{key.resolve()}"')
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make the CURVE keys for internal endpoints beyond loopback (sensorpipe keys init)."""
    from workers.core import config as config_mod
    from workers.core import curve
    from workers.tools.cli import CommandError

    try:
        cfg = config_mod.load(args.config, keys=False)       # the keys are what this makes
    except config_mod.ConfigError as exc:
        raise CommandError(f"configuration: {exc}") from None
    directory = curve.keys_dir(cfg.data_dir, cfg.curve.keys_dir)
    try:
        written = curve.init_keys(directory, args.client or (), args.force)
    except curve.CurveKeyError as exc:
        raise CommandError(str(exc)) from None
    if not written:
        print(f"sensorpipe: the keys in {directory} are there already (--force makes new ones; every host"
              " and client must then be given them again)")
    for path in written:
        print(f"sensorpipe: wrote {path}")
    for client in args.client or ():
        public, _ = curve.read_pair(directory / curve.CLIENTS / f"{client}.key", need_secret=False)
        print(f"sensorpipe: client {client}'s public key (list it in [curve] clients to let it ask the query"
              f" and commands workers): {public.decode()}")
    print(f"sensorpipe: a host that only connects needs {curve.SERVER}.key and {curve.WORKER}.key_secret;"
          f" a client program {curve.SERVER}.key and its own clients/NAME.key_secret (docs/security.md)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help=(cmd_keys.__doc__ or "").split("\n")[0])
    p.set_defaults(handler=cmd_keys)
    p.add_argument("action", choices=["init"])
    p.add_argument("--client", action="append", metavar="NAME",
                   help="also make a keypair for a client program that asks query/commands (repeatable)")
    p.add_argument("--force", action="store_true", help="make new keys over existing ones")
    p = sub.add_parser("certs", help=(cmd_certs.__doc__ or "").split("\n")[0])
    p.set_defaults(handler=cmd_certs)
    p.add_argument("action", choices=["init"])
    p.add_argument("--dir", help="where to write them (default: <data dir>/certs)")
    p.add_argument("--host", action="append", help="a name or IP address devices reach the server by"
                   " (repeatable; default: this host's name, localhost, 127.0.0.1)")
    p.add_argument("--force", action="store_true", help="write over existing certificates")
