"""Connection floods: many TCP connections to one address that never make a
request, either silent (an idle flood: not even HTTP/2's preface) or sending
one byte of a request head that never ends every 2-4 s (slowloris). A
connection the server closes is opened again at once, as an attacker would
keep the pressure on; how long each lived is recorded.
"""

import os
import random
import resource
import selectors
import socket
import threading
import time

from chaoslib.watch import Sampler

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
FILLER = b"X-Slow: 1\r\n"


class Flood:
    """`count` connections to `addr` ("host:port") for the with-block (start/stop); `slowloris` feeds each
    a byte every 2-4 s, else they stay silent."""

    def __init__(self, addr, count, slowloris, seed):
        host, _, port = addr.rpartition(":")
        self.target = (host, int(port))
        self.count, self.slowloris = count, slowloris
        self.rng = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.lifetimes = []  # seconds from connect to the server's close, of every closed connection
        self.opened = 0
        self.connect_errors = 0
        self.left_open = None  # connections the server had not closed by the end of stop()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        raise_open_file_limit(2 * count + 256)

    def start(self):
        self.thread.start()
        return self

    def stop(self, close_within):
        """Stops feeding and reopening, waits up to `close_within` s for the server to close what is
        left, closes the rest (counted in left_open)."""
        self.stopping.set()
        self.thread.join(close_within + 30)
        self.left_open = len(self.selector.get_map())
        for key in list(self.selector.get_map().values()):
            self._drop(key.fileobj)
        return self

    def _open(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(self.target)
        except OSError:
            self.connect_errors += 1
            s.close()
            return
        s.setblocking(False)
        self.opened += 1
        state = {"opened": time.monotonic(), "sent": 0, "next": time.monotonic() + self.rng.uniform(2, 4)}
        self.selector.register(s, selectors.EVENT_READ, state)

    def _drop(self, s):
        self.selector.unregister(s)
        s.close()

    def _closed_by_server(self, s, state):
        self.lifetimes.append(time.monotonic() - state["opened"])
        self._drop(s)

    def _feed(self, s, state, now):
        data = HEAD + FILLER * (1 + state["sent"] // len(FILLER))
        try:
            s.send(data[state["sent"]:state["sent"] + 1])
            state["sent"] += 1
        except OSError:
            self._closed_by_server(s, state)
            return
        state["next"] = now + self.rng.uniform(2, 4)

    def _run(self):
        drain_deadline = None
        while True:
            if self.stopping.is_set():
                drain_deadline = drain_deadline or time.monotonic() + 30
                if not self.selector.get_map() or time.monotonic() > drain_deadline:
                    return
            else:
                while len(self.selector.get_map()) < self.count and not self.stopping.is_set():
                    self._open()
            for key, _ in self.selector.select(timeout=0.1) if self.selector.get_map() else []:
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._closed_by_server(key.fileobj, key.data)
            if not self.selector.get_map():
                time.sleep(0.05)
            if self.slowloris and not self.stopping.is_set():
                now = time.monotonic()
                for key in list(self.selector.get_map().values()):
                    if key.data["next"] <= now:
                        self._feed(key.fileobj, key.data, now)


def raise_open_file_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))


def open_files(pid):
    """How many file descriptors `pid` holds now (None when it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class FdSampler(Sampler):
    """The most file descriptors each of some processes held, sampled every 100 ms."""

    def __init__(self, pids):
        super().__init__()
        self.max = {pid: 0 for pid in pids}

    def sample(self):
        for pid in self.max:
            n = open_files(pid)
            if n is not None:
                self.max[pid] = max(self.max[pid], n)

    def result(self):
        return self.max
