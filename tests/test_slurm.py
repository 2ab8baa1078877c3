"""The batch scripts under a real Slurm: a single-node cluster on localhost, started and stopped here.

Needs Debian's slurm-wlm and munge (.ci/run installs them); skips only when they are absent or
the daemons cannot be started. The cluster is private: its own munge key and socket, slurm.conf,
state and spool folders under a temporary folder, free ports; nothing in /etc is touched.
"""
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_line() -> str:
    """This machine's real CPUs and memory, as slurmd sees them, for a node named localhost."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(f.split("=", 1) for f in out.splitlines()[0].split())
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + " State=UNKNOWN"


def slurm_conf(root: Path, munge_socket: Path) -> str:
    user = getpass.getuser()
    return f"""\
ClusterName=enginetest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
# Finished jobs stay visible to scontrol for 10 minutes (no accounting database for sacct).
MinJobAge=600
{node_line()}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(pid, timeout=15.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it lingers."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (no {', '.join(missing)}); `apt-get install slurm-wlm munge` (.ci/run does)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def stop_all():
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(_pid(root / f"{name}.pid"))

    problem = None
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={root}/munged.pid",
                        f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"], check=True, timeout=30)
        subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, timeout=30)
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], env=env, check=True, timeout=30)
        state, deadline = "", time.time() + 60
        while state != "idle" and time.time() < deadline:
            time.sleep(0.5)
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if state != "idle":
            problem = f"the node did not become idle (state '{state}')"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    except BaseException:
        stop_all()
        raise
    if problem is not None:
        logs = _logs(root)
        stop_all()
        pytest.skip(f"could not start a local Slurm cluster: {problem}\n{logs}")
    try:
        yield {"root": root, "env": env}
    finally:
        stop_all()


def submit_and_wait(slurm, tmp_path, size, job, *args, **env_vars):
    """submit.sh SIZE JOB ARGS with `sbatch --wait`; logs and results into tmp_path, not the repo."""
    cpus = re.search(r"CPUs=(\d+)", node_line()).group(1)
    env = {**slurm["env"], "ENGINE_OUTPUTS": str(tmp_path), "ENGINE_CPUS": str(min(int(cpus), 2)), "ENGINE_MEM": "4G",
           "ENGINE_TIME": "00:20:00", "SBATCH_EXTRA": f"--wait --output={tmp_path}/%x-%j.out", **env_vars}
    try:
        run = subprocess.run([str(REPO / "scripts/slurm/submit.sh"), size, job, *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env)
        raise
    job_id = re.search(r"Submitted batch job (\d+)", run.stdout).group(1)
    info = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    log = tmp_path / f"{job}-{job_id}.out"
    return run, info, log, job_id


def test_generate_job_on_a_local_cluster(slurm, tmp_path):
    run, info, log, job_id = submit_and_wait(slurm, tmp_path, "cpu", "generate", "--max_new_tokens", "4",
                                             "--temperature", "0", "--prompt", "The capital of France is")
    text = log.read_text() if log.exists() else "(no log)"
    assert run.returncode == 0, f"{run.stderr}\n{text}\n{info}\n{_logs(slurm['root'])}"
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    assert f"job {job_id} (generate)" in text
    assert "--device cpu" in text and "The capital of France is" in text
    assert "tokens/s" in text  # generate.py's stats line


def test_failing_job_reports_its_exit_state(slurm, tmp_path):
    run, info, log, _ = submit_and_wait(slurm, tmp_path, "cpu", "generate", "--max_new_tokens", "0")
    assert run.returncode != 0
    assert "JobState=FAILED" in info and "ExitCode=1:0" in info, info
    assert "--max_new_tokens must be positive" in log.read_text()
