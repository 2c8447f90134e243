"""A real single-node Slurm (Debian's munge + slurmctld + slurmd on loopback) for the tests.

The ``slurm`` fixture (session-scoped: started once, by the first test that asks, stopped at the end)
apt-get installs the packages when they are missing (CI runs as root) and fails with a clear message
when it cannot start Slurm. Its value is the environment (SLURM_CONF) the Slurm commands need.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

# The settings every test cluster shares: munge, no cgroups (a container), quick scheduling, root.
SETTINGS = """AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
MinJobAge=3600
KillWait=60
ReturnToService=2
SlurmUser=root
SlurmdUser=root"""

SLURM_CONF = """ClusterName=pretrain-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
{settings}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

def _fail(message):
    pytest.fail(f"cannot start the test Slurm: {message}", pytrace=False)


def install_slurm() -> None:
    """apt-get install munge and slurm-wlm when they are missing (CI runs as root)."""
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "munge", "slurm-wlm", "slurm-client"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                _fail(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def start_munge() -> bool:
    """A munge key and a running munged; True when this call started the daemon (so should stop it)."""
    if not Path("/etc/munge/munge.key").is_file():
        subprocess.run(["mungekey", "--create"], check=False)
        subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=False)
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
    started_munge = subprocess.run(["munge", "-n"], capture_output=True).returncode != 0
    if started_munge:
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    return started_munge


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        _fail("the Slurm tests install and start munge/slurmctld/slurmd and must run as root")
    install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=6917, d_port=6918, settings=SETTINGS))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = start_munge()
    try:
        _start_daemons(root, env)
        yield env
    finally:
        _stop_daemons(root, env, started_munge)


def _start_daemons(root, env):
    for daemon in ("slurmctld", "slurmd"):
        proc = subprocess.run([daemon], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            log = root / f"{daemon}.log"
            _fail(f"{daemon} exited {proc.returncode}: {proc.stderr[-2000:]}{log.read_text()[-2000:] if log.exists() else ''}")
    deadline = time.monotonic() + 60
    while True:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return
        if time.monotonic() > deadline:
            logs = "".join((root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (root / f).exists())
            _fail(f"node state {state!r} after 60 s\n{logs}")
        time.sleep(1)


def _stop_daemons(root, env, started_munge):
    pids = [(root / f).read_text().strip() for f in ("slurmd.pid", "slurmctld.pid") if (root / f).is_file()]
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
    for pid in pids:
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.2)
        else:
            os.kill(int(pid), 15)  # a daemon that never reached the controller
    if started_munge:
        subprocess.run(["/usr/sbin/munged", "-s"], capture_output=True)  # stops the daemon via its socket


