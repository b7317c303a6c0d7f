"""One `tramontane serve` of a scenario and its worker processes: start it on
loopback ports, find its workers among its children (to kill or stop
them), GET its endpoints, stop it and every worker it ever had.
"""

import json
import os
import re
import signal
import time

from benchlib import get, parse_samples, start, wait_healthy
from chaoslib import log


class Serve:
    """One `tramontane serve` on loopback ports, in its own session (a Ctrl-C
    at the terminal reaches this script, which stops it)."""

    started = []  # every Serve, for the cleanup on exit

    def __init__(self, binary, model, name, log_dir, args, api_key=None, startup_timeout=120.0, open_files=None):
        """`open_files`: serve and its workers run under `ulimit -n` of that many (soft and hard)."""
        self.name, self.api_key = name, api_key
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.workers_seen = set()
        limit = ["prlimit", f"--nofile={open_files}:{open_files}", "--"] if open_files else []
        self.process = start([*limit, binary, "serve", "--model", model, "--listen", "127.0.0.1:0",
                              "--http-listen", "127.0.0.1:0", "--drain-timeout", "5", *args],
                             log_path=self.log_path, new_session=True)
        self.pid = self.process.pid
        Serve.started.append(self)
        self.grpc = self.process.listening("tramontane router", startup_timeout)
        self.http = self.process.listening("tramontane http", startup_timeout)
        self.workers()  # remember the first ones

    def alive(self):
        return self.process.alive()

    def workers(self):
        """{worker index: pid} of serve's children now (indexes from their command lines)."""
        pids = []
        try:
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except OSError:
            return {}
        found = {}
        for pid in sorted(set(pids)):
            args = cmdline(pid)
            if "worker" not in args:
                continue
            self.workers_seen.add(pid)
            if "--worker-index" in args:
                index = int(args[args.index("--worker-index") + 1])
            elif "--experts" in args:
                index = min(expand_ids(args[args.index("--experts") + 1]))
            else:
                index = len(found)
            found[index] = pid
        return found

    def worker_pid(self, index, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.workers().get(index)
            if pid is not None:
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"no worker {index} among serve's children")

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path, timeout=5.0):
        """(status, body text) of GET path; status None when there was no answer."""
        return get(self.http, path, self.headers(), timeout)

    def metrics(self):
        """{(name, labels): value} of /metrics ({} when it does not answer)."""
        status, text = self.get("/metrics")
        return parse_samples(text) if status == 200 else {}

    def wait_healthy(self, timeout=60.0):
        wait_healthy(self.http, timeout, self.process, self.headers(), poll_s=0.2)

    def model_name(self):
        status, text = self.get("/v1/models")
        if status != 200:
            raise RuntimeError(f"GET /v1/models answered {status}: {text[:200]}")
        return json.loads(text)["data"][0]["id"]

    def stop(self):
        """SIGTERM (serve drains, then stops its workers), SIGKILL after 15 s; then any worker left."""
        workers = set(self.workers().values()) | self.workers_seen
        for pid in workers:  # a stopped worker could not stop
            signal_if_worker(pid, signal.SIGCONT)
        self.process.stop(grace_s=15)
        deadline = time.monotonic() + 5
        for pid in workers:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline and is_worker(pid):
                time.sleep(0.05)
            signal_if_worker(pid, signal.SIGKILL)


def stop_all():
    for serve in Serve.started:
        try:
            serve.stop()
        except Exception as error:  # noqa: BLE001 (cleanup goes on)
            log(f"cleanup of {serve.name}: {error}")
    Serve.started.clear()


def log_lines(log_path, pattern, limit=6):
    """The last `limit` lines of a serve log that match `pattern` (ANSI colours removed)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip()) for line in f]
    except OSError:
        return []
    return [line for line in lines if re.search(pattern, line)][-limit:]


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_worker(pid):
    args = cmdline(pid)
    return len(args) > 1 and os.path.basename(args[0]) == "tramontane" and args[1] == "worker"


def signal_if_worker(pid, sig):
    """Signals `pid` only while it is still one of our tramontane workers (pids get reused)."""
    if is_worker(pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def expand_ids(spec):
    ids = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        ids += range(int(a), int(b or a) + 1)
    return ids
