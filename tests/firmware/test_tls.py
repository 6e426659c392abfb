"""TLS in the firmware (issue 15): a board on MicroPython's unix port with ``TLS_CA`` set talks to a
pipeline whose text listener speaks only TLS and requires credentials: the token hello goes over TLS,
its readings are stored, a command reaches it and is acknowledged; the same board refuses a server
whose certificate its CA did not sign (nothing sent, the server counts a failed handshake)."""
from __future__ import annotations

import ssl
from pathlib import Path

from tests.firmware.harness import HERE
from tests.firmware.live_board import LiveBoard
from tests.firmware.test_devauth import readings
from tests.pipeline import COMMAND_ROLES, Pipeline, wait_for
from workers.tools import security

SCRIPT = HERE / "tls_board.py"


def der(pem: Path, out: Path) -> Path:
    out.write_bytes(ssl.PEM_cert_to_DER_cert(pem.read_text()))
    return out


def acked(p: Pipeline, device: str, command_id: str) -> bool:
    reply = p.command({"op": "commands", "device": device})
    return any(c["id"] == command_id and c["status"] == "acked" for c in reply["commands"])


def edge_counter(p: Pipeline, name: str) -> int:
    return p.query({"op": "status"})["workers"].get("edge", {}).get(name, 0)


def test_the_board_speaks_tls_and_refuses_a_server_it_does_not_trust(pipeline_factory, micropython_unix,
                                                                      tmp_path: Path) -> None:
    ca, _, cert, key = security.certs_init(tmp_path / "certs", ["127.0.0.1", "localhost"])
    _, other_ca_key, _, _ = security.certs_init(tmp_path / "other", ["127.0.0.1"])
    p = pipeline_factory(auth="required", text_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    p.start_all(COMMAND_ROLES)
    made = p.cli("devices", "add", "tls-1")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    ports = ("127.0.0.1", str(p.text_port), str(p.binary_port))

    board = LiveBoard(micropython_unix.binary, SCRIPT, "live", *ports, "tls-1", token,
                      str(der(ca, tmp_path / "ca.der")), cwd=tmp_path)
    try:
        wait_for(lambda: len(readings(p, "tls-1")) >= 3, timeout=30, message="readings sent over TLS")
        reply = p.command({"op": "send", "device": "tls-1", "id": "t1", "command": {"cmd": "interval", "value": 1}})
        assert reply["ok"], reply               # delivered, or queued until the next reading on a busy machine
        board.wait_line(lambda line: line == "applied interval", message="the command applied")
        wait_for(lambda: acked(p, "tls-1", "t1"), message="the command acknowledged over TLS")
    finally:
        board.close()
        print("board:", *board.output()[-20:], sep="\n  ")

    failed_before = edge_counter(p, "tls_failed")
    stored = len(readings(p, "tls-1"))
    output = micropython_unix.run(SCRIPT, "refused", *ports, "tls-1", token,
                                  str(der(other_ca_key.with_name("ca.pem"), tmp_path / "other.der")),
                                  cwd=tmp_path).splitlines()
    assert output[-1] == "backlog 3", output           # kept on the board, never sent
    assert any("TLS" in line and "not correctly signed" in line for line in output), output
    wait_for(lambda: edge_counter(p, "tls_failed") > failed_before, message="the refused handshake counted")
    assert len(readings(p, "tls-1")) == stored


def test_deploy_stages_the_ca_as_der_and_names_it_in_config(tmp_path: Path, capsys) -> None:
    from tests.firmware.test_cli import deploy_args, load_config
    from workers.tools import firmware as firmware_cli

    ca, *_ = security.certs_init(tmp_path / "certs", ["192.168.1.10"])
    stage = tmp_path / "stage"
    assert firmware_cli.main(deploy_args(stage, "--tls-ca", str(ca), "--key", "0" * 64, "--dry-run")) == 0
    assert (stage / "ca.der").read_bytes() == ssl.PEM_cert_to_DER_cert(ca.read_text())
    assert load_config(stage / "config.py").TLS_CA == "ca.der"
    assert f"fs cp {stage}/ca.der :ca.der + reset" in capsys.readouterr().out
    # deployed again without TLS: the staged certificate goes, so it is not copied by mistake
    assert firmware_cli.main(deploy_args(stage, "--key", "0" * 64, "--dry-run")) == 0
    assert not (stage / "ca.der").exists() and "ca.der" not in capsys.readouterr().out
    (tmp_path / "junk.pem").write_text("hello")
    assert firmware_cli.main(deploy_args(stage, "--tls-ca", str(tmp_path / "junk.pem"), "--dry-run")) == 2
    assert "--tls-ca:" in capsys.readouterr().err
