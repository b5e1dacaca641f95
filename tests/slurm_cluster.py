"""The local SLURM clusters of `scripts/local_slurm.sh` (one node, or `--nodes N` in namespaces) for the `slurm`
tests, and what those tests do with them: run a sweep through the SLURM launcher, read `sacct`, wait."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import subprocess_env
from flan_squad.utils.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "local_slurm.sh"
TESTS = Path(__file__).parent
# The launcher's defaults ask for a GPU node; here: one CPU and 2 GB a task.
CPU_JOBS = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=30"]


@contextlib.contextmanager
def local_cluster(nodes: int = 1) -> Iterator[dict[str, str]]:
    """The environment of a command that talks to the local cluster of `nodes` nodes: started here (and stopped
    after) unless it already runs. Without SLURM: skipped, naming what is missing, or failed under
    FLAN_SQUAD_REQUIRE_SLURM=1 (CI)."""
    script = [str(SCRIPT), "--nodes", str(nodes)]
    missing = subprocess.run([*script, "check"], capture_output=True, text=True)
    if missing.returncode != 0:
        if os.environ.get("FLAN_SQUAD_REQUIRE_SLURM"):
            pytest.fail(missing.stderr.strip())
        pytest.skip(missing.stderr.strip())
    conf = subprocess.run([*script, "conf"], capture_output=True, text=True, check=True).stdout.strip()
    env = subprocess_env(SLURM_CONF=conf, OMP_NUM_THREADS="1",
                         PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), str(TESTS)]))
    running = subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0
    if not running:
        subprocess.run([*script, "start"], check=True, timeout=180)
    try:
        yield env
    finally:
        if not running:
            subprocess.run([*script, "stop"], check=True, timeout=120)


def job_states(env, job_id: str) -> dict[str, tuple[str, str]]:
    """{job: (state, exit code)} of each job of an array once all have ended (the driver may end a little before
    SLURM has recorded the last one's end)."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "--parsable2", "-o", "JobID,State,ExitCode"],
                             env=env, capture_output=True, text=True, check=True).stdout
        states = {line.split("|")[0]: tuple(line.split("|")[1:]) for line in out.splitlines()}
        if time.time() > deadline or not any(s in ("PENDING", "RUNNING", "COMPLETING") for s, _ in states.values()):
            return states
        time.sleep(1)


def run_sweep(env, sweep_dir: Path, args: list[str], log: Path | None = None):
    """The sweep's driver (`python -m flan_squad.train -m hydra/launcher=slurm ...`); in the background with `log`."""
    command = [sys.executable, "-m", "flan_squad.train", "-m", *CPU_JOBS, *args, f"hydra.sweep.dir={sweep_dir}"]
    if log:
        with open(log, "w") as out:
            return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)


def job_dirs(sweep_dir: Path) -> list[str]:
    """submitit's folders, one per SLURM job: `<array id>_<index>`, or `<job id>` for a sweep of one job."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.replace("_", "").isdigit())


def array_id(sweep_dir: Path) -> str:
    return job_dirs(sweep_dir)[0].split("_")[0]


def wait_until(condition: Callable[[], bool], what: str, seconds: float, driver: subprocess.Popen, log: Path) -> None:
    """Until `condition()`, while the sweep's driver runs."""
    deadline = time.time() + seconds
    while not condition():
        assert driver.poll() is None, f"the sweep ended before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.5)


def slow_step(path: Path) -> int:
    """The step that `fault_injection.SlowSteps` last wrote to `path` (-1 before the first)."""
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else -1
