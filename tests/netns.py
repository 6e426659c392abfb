"""Two hosts on one machine: two network namespaces made by the test, joined by a veth pair with
private addresses, torn down in ``finally`` (CI runs as root; ``ip`` is iproute2). Processes start in
one with ``Hosts.run``/``Hosts.popen`` (``ip netns exec``, which execs the command: the PID returned is
the program's own, so it can be ended by PID)."""
from __future__ import annotations

import os
import secrets
import subprocess
from contextlib import contextmanager
from typing import Iterator, Sequence


class Hosts:
    def __init__(self, tag: str) -> None:
        self.a = f"sp{tag}a"
        self.b = f"sp{tag}b"
        # A /30 in 10.0.0.0/8 picked at random: two test runs at once do not share a namespace anyway,
        # but a fixed range would look like a real network in logs.
        net = secrets.randbelow(250) + 2, secrets.randbelow(250) + 2, 4 * secrets.randbelow(60)
        self.addr_a = f"10.{net[0]}.{net[1]}.{net[2] + 1}"
        self.addr_b = f"10.{net[0]}.{net[1]}.{net[2] + 2}"

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host, *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), **kwargs)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Namespaces A and B, each with its loopback up, A's address and B's on one veth pair."""
    hosts = Hosts(f"{os.getpid() % 100000}{secrets.token_hex(2)}")
    made: list[str] = []
    try:
        for name in (hosts.a, hosts.b):
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", f"{hosts.a}v", "netns", hosts.a, "type", "veth", "peer", "name", f"{hosts.b}v",
            "netns", hosts.b)
        for name, addr in ((hosts.a, hosts.addr_a), (hosts.b, hosts.addr_b)):
            _ip("-n", name, "addr", "add", f"{addr}/30", "dev", f"{name}v")
            _ip("-n", name, "link", "set", f"{name}v", "up")
        yield hosts
    finally:
        for name in made:                       # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
