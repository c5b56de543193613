"""A watcher that removes a local Ray's processes when the job that started them dies without cleaning up.

A job stopped by SIGINT or SIGTERM shuts its Ray down through Ray's own driver handler. A SIGKILL (or
the kernel's out-of-memory killer) runs no handler: Ray's GCS and raylet exit with the driver (Ray
starts them fate-sharing), but its dashboard and runtime-env agents and its idle workers were measured
here to live on for about 90 seconds, orphaned. ``cli.init_ray`` therefore starts this watcher next to
every local Ray it starts: a small process in its own session (so a signal to the job's process group
does not reach it) that records the driver's descendants every ``poll_s`` seconds and, once the driver
is gone, sends each one still running SIGTERM, then SIGKILL after ``grace_s``. A process is identified
by its pid and its start time, so a reused pid is never signalled.

Processes started after the last poll are not recorded; Ray's own workers of that kind exit when they
lose their raylet. Under ``ray job submit`` the cluster owns its processes and no watcher is started.

    python -m mugato_ray.reaper DRIVER_PID [POLL_S]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def start_reaper(poll_s: float = POLL_S) -> subprocess.Popen:
    """Start the watcher of this process (the driver) and return it."""
    return subprocess.Popen(
        [sys.executable, "-m", "mugato_ray.reaper", str(os.getpid()), str(poll_s)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> list[int]:
    """Record ``driver_pid``'s descendants until it is gone, then stop those still running; their pids."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    me, seen = os.getpid(), {}
    while _alive(driver):
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)  # a Process remembers its start time
        except psutil.Error:
            pass
        seen = {pid: p for pid, p in seen.items() if _alive(p)}
        time.sleep(poll_s)
    left = [p for p in seen.values() if _alive(p)]
    for p in left:
        try:
            p.terminate()  # psutil checks the start time first: a reused pid is not signalled
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else POLL_S)
