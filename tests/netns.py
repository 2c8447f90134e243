"""Two "hosts" on one machine for the multi-node tests: Linux network namespaces joined by a veth pair.

Each host has its own address (``10.78.0.1``, ``10.78.0.2``) on an interface named ``pt0`` in both
namespaces, and every command run on it (``command``) gets the host's hostname (a UTS namespace) and
an ``/etc/hosts`` naming both hosts (bind-mounted in a mount namespace of its own). So torchrun, Gloo
and Slurm resolve and reach the other node by name, as on a cluster. The rest of the filesystem is
shared, like a cluster's shared mount (and unlike ``ip netns exec``, /sys keeps its cgroup mounts,
which slurmd needs); ``command(..., private_dir=D)`` hides ``D`` behind a tmpfs on that host only, a
directory the other host does not see. Needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

INTERFACE = "pt0"  # the same name on both hosts, so one GLOO_SOCKET_IFNAME would fit both


class SetupError(RuntimeError):
    """The namespaces could not be made (not root, no iproute2, or a kernel without them)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Hosts:
    """``hosts.up()`` makes the namespaces, ``hosts.down()`` removes them; ``command`` runs on one."""

    def __init__(self, names=("mn1", "mn2"), subnet="10.78.0"):
        self.names = list(names)
        self.addresses = {name: f"{subnet}.{i}" for i, name in enumerate(self.names, start=1)}
        self.namespaces = {name: f"pretrain-{name}-{os.getpid()}" for name in self.names}
        self.etc: Path | None = None  # holds the hosts file every command sees as /etc/hosts

    def up(self) -> "Hosts":
        if os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "nsenter", "unshare")):
            raise SetupError("network namespaces need root, iproute2 (ip) and util-linux (nsenter, unshare)")
        self.etc = Path(tempfile.mkdtemp(prefix="pretrain-hosts-"))
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addresses.items()))
        a, b = (f"ptv{os.getpid() % 100000}{x}" for x in "ab")  # veth ends, renamed in their namespaces
        try:
            for name, ns in self.namespaces.items():
                _ip("netns", "add", ns)
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            for end, name in zip((a, b), self.names):
                ns = self.namespaces[name]
                _ip("link", "set", end, "netns", ns)
                _ip("-n", ns, "link", "set", end, "name", INTERFACE)
                _ip("-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", INTERFACE)
                _ip("-n", ns, "link", "set", INTERFACE, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove the namespaces (their veth ends go with them); safe to call twice or after a failed up."""
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.etc is not None:
            shutil.rmtree(self.etc, ignore_errors=True)

    def command(self, host: str, argv: list, private_dir: Path | None = None) -> list:
        """``argv`` as run on ``host``: in its network namespace, under its hostname, with the hosts
        file; with ``private_dir``, that directory is an empty tmpfs of this command's own."""
        enter = ["nsenter", f"--net=/run/netns/{self.namespaces[host]}",
                 "unshare", "--uts", "--mount", "--propagation", "private"]
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        if private_dir is None:
            return [*enter, "sh", "-c", script, "sh", host, str(self.etc / "hosts"), *map(str, argv)]
        script = script.replace("&& shift 2", '&& mount -t tmpfs private "$3" && shift 3')
        return [*enter, "sh", "-c", script, "sh", host, str(self.etc / "hosts"), str(private_dir), *map(str, argv)]
