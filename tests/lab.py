"""Two hosts on one machine: network namespaces joined by a veth pair, optionally
shaped with `tc ... tbf`. A test rig, not part of the package: used by the demo
(scripts/demo.py), the benchmarks (bench/) and scripts/soak.py, which put tests/ on
sys.path and ``from lab import TwoHosts``.

Processes are put into a host with ``nsenter --net=/run/netns/NAME`` — only the network
namespace: `ip netns exec` would also give them a mount namespace of their own, which
CRIU then dumps too and here refuses to (docs/OPERATIONS.md, section 6).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from dataclasses import dataclass


class LabError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@dataclass
class Host:
    name: str       # network namespace name
    addr: str       # its address on the veth link

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's network namespace (and nothing else)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]


class TwoHosts:
    """``with TwoHosts(rate="1gbit") as lab:`` gives ``lab.source`` and ``lab.dest``.

    Names carry a random tag so parallel runs do not collide; everything is removed on
    exit (deleting a namespace deletes its end of the veth, and with it the pair).
    """

    def __init__(self, rate: str | None = None, subnet: str | None = None):
        if os.geteuid() != 0:
            raise LabError("network namespaces need root")
        self.rate = rate
        tag = secrets.token_hex(3)
        net = ipaddress.ip_network(subnet or f"10.{200 + secrets.randbelow(50)}."
                                             f"{secrets.randbelow(256)}.0/24")
        a, b = list(net.hosts())[:2]
        self.source = Host(f"dx-src-{tag}", str(a))
        self.dest = Host(f"dx-dst-{tag}", str(b))
        self._veth = (f"dxs{tag}", f"dxd{tag}")
        self._prefix = net.prefixlen
        self._up = False

    def __enter__(self) -> "TwoHosts":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        vs, vd = self._veth
        for h in (self.source, self.dest):
            _ip("netns", "add", h.name)
        self._up = True
        _ip("link", "add", vs, "type", "veth", "peer", "name", vd)
        for h, dev in ((self.source, vs), (self.dest, vd)):
            _ip("link", "set", dev, "netns", h.name)
            _ip("-n", h.name, "addr", "add", f"{h.addr}/{self._prefix}", "dev", dev)
            _ip("-n", h.name, "link", "set", dev, "up")
            _ip("-n", h.name, "link", "set", "lo", "up")
        if self.rate:
            # Shape both directions; tbf's burst must hold at least one jiffy of traffic.
            for h, dev in ((self.source, vs), (self.dest, vd)):
                proc = subprocess.run(["tc", "-n", h.name, "qdisc", "add", "dev", dev, "root",
                                       "tbf", "rate", self.rate, "burst", "1mb",
                                       "latency", "50ms"], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise LabError(f"tc tbf on {dev}: {proc.stderr.strip()}")

    def down(self) -> None:
        if not self._up:
            return
        for h in (self.source, self.dest):
            subprocess.run(["ip", "netns", "del", h.name], capture_output=True)
        self._up = False
