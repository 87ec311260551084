"""A local Ray keeps the worker processes of a build's small fractional tasks instead of starting new ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Run in a fresh process: the test session may hold a Ray of its own (the ray_local fixture), and init_ray
# returns at once when Ray is up.
_SCRIPT = """
import json, os, sys, tempfile, time
import ray
from bank_builder.ray_runtime import init_ray

init_ray(num_cpus=1)

@ray.remote(num_cpus=0.25)
def pid(folder):
    # a barrier: each task waits until all four have started, so the four run in four processes at once
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()

def four_at_once():
    folder = tempfile.mkdtemp(dir=sys.argv[1])
    return sorted(set(ray.get([pid.remote(folder) for _ in range(4)])))

first = four_at_once()
time.sleep(2.5)  # past Ray's idle-worker kill threshold (1 s), which its default applies beyond one worker a CPU
print(json.dumps({"first": first, "second": four_at_once()}))
ray.shutdown()
"""


def test_local_ray_keeps_the_workers_of_fractional_tasks(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(pids["first"]) == 4
    assert pids["second"] == pids["first"]  # the same four processes: no worker was started again
