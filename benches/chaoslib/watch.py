"""What runs beside a scenario's load: /health and /metrics polled into
timelines, serve's RSS sampled, the host's accept-queue overflows; and
waiting for a condition.
"""

import threading
import time


class Sampler:
    """Calls `sample()` every `interval_s` on a thread of its own, from start() to stop(); stop()
    waits up to `join_s` for the thread and returns `result()`."""

    def __init__(self, interval_s=0.1, join_s=5.0):
        self.interval_s, self.join_s = interval_s, join_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval_s)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(self.join_s)
        return self.result()


class Monitor(Sampler):
    """Polls /health every 50 ms (and /metrics every 200 ms) into timelines."""

    def __init__(self, serve, metrics=True):
        super().__init__(interval_s=0.05, join_s=10.0)
        self.serve, self.want_metrics = serve, metrics
        self.health = []  # (t, status)
        self.metrics = []  # (t, values)
        self.last_metrics = 0.0

    def sample(self):
        now = time.monotonic()
        self.health.append((now, self.serve.get("/health", timeout=2)[0]))
        if self.want_metrics and now - self.last_metrics >= 0.2:
            self.last_metrics = now
            self.metrics.append((time.monotonic(), self.serve.metrics()))

    def result(self):
        return None

    def health_down_then_up(self, since):
        """(first non-200 after `since`, first 200 after the last non-200 after `since`) or Nones."""
        points = [(t, s) for t, s in list(self.health) if t >= since]
        down = [t for t, s in points if s != 200]
        if not down:
            return None, None
        up = [t for t, s in points if s == 200 and t > down[-1]]
        return down[0], (up[0] if up else None)

    def wait_health_up(self, since, timeout):
        """Waits for /health to have gone down after `since` and be 200 again; returns the times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            down, up = self.health_down_then_up(since)
            if up is not None:
                return down, up
            time.sleep(0.05)
        return self.health_down_then_up(since)


class RssSampler(Sampler):
    """VmRSS of one process every 100 ms; stop() returns the most, in MiB."""

    def __init__(self, pid):
        super().__init__()
        self.pid = pid
        self.samples = []  # (t, MiB)

    def read(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def sample(self):
        rss = self.read()
        if rss is not None:
            self.samples.append((time.monotonic(), rss))

    def result(self):
        return max((m for _, m in self.samples), default=None)


def listen_overflows():
    """TcpExtListenOverflows of this host (/proc/net/netstat): SYNs dropped for a full accept queue."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return None


def wait_until(predicate, timeout, step=0.05):
    """The first true value of `predicate()` within `timeout` s (polled every `step` s), else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None
