"""Start a `tramontane` server, read where it listens, wait until it is
healthy, stop it; run a `tramontane` command that prints JSON.

Every server prints `tramontane <what> listening on ADDR` on stdout once it
accepts connections (worker, router, http, metrics, delay-proxy). Its stdout
is read on a thread, so it never blocks on a full pipe, and its stderr (the
logs) goes to a file, whose last lines an error shows.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time

LISTENING = "listening on "
# Bounds a start that never comes; a `bench` worker loads 1.5 GB first on a shared 2-core host.
DEFAULT_START_TIMEOUT_S = 600.0
TAIL_LINES = 20
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class StartError(RuntimeError):
    """A server that exited, or did not listen or answer in time, before it served."""


class CommandFailed(RuntimeError):
    """A command run to completion that exited non-zero; the message ends with its stderr."""


class Process:
    """One started `tramontane` subcommand: its stdout lines, its stderr log, its exit."""

    def __init__(self, command, env=None, log_path=None, new_session=False):
        self.command = [str(part) for part in command]
        self.name = " ".join([os.path.basename(self.command[0]), *self.command[1:2]])
        self.log_path = log_path  # None: a temporary file
        self.new_session = new_session
        self.log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile("w+b")
        self.log.write(("$ " + " ".join(self.command) + "\n").encode())
        self.log.flush()
        self.popen = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self.log, text=True, env=env, start_new_session=new_session)
        self.pid = self.popen.pid
        self.lines = []  # stdout so far; None once it closed
        self.new_line = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.popen.stdout:
            with self.new_line:
                self.lines.append(line)
                self.new_line.notify_all()
        with self.new_line:
            self.lines.append(None)
            self.new_line.notify_all()

    def listening(self, prefix="tramontane", timeout=DEFAULT_START_TIMEOUT_S):
        """The address of the first stdout line `PREFIX ... listening on ADDR`; StartError when
        the process exits first or prints none within `timeout` s."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.new_line:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise StartError(self.explain(f"exited with {self.exit_status()} before printing "
                                                      f"`{prefix} {LISTENING}ADDR`"))
                    seen += 1
                    if line.startswith(prefix) and LISTENING in line:
                        return line.strip().rsplit(LISTENING, 1)[1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StartError(self.explain(f"printed no `{prefix} {LISTENING}ADDR` in {timeout:.0f} s"))
                self.new_line.wait(left)

    def alive(self):
        return self.popen.poll() is None

    @property
    def returncode(self):
        return self.popen.poll()

    def exit_status(self):
        """Its exit status, once its closed stdout is followed by its exit (None if it lingers)."""
        try:
            return self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self, lines=TAIL_LINES):
        """The last `lines` lines of its stderr, colours removed ("" once stopped)."""
        if self.log.closed:
            return ""
        fd = self.log.fileno()
        size = os.fstat(fd).st_size
        # pread: the process writes at the shared offset, which a seek here would move.
        data = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024)).decode("utf-8", "replace")
        return tail(ANSI_COLOUR.sub("", data), lines)

    def explain(self, what):
        """`what` happened to this process, and where to read why: its log file, or its stderr's tail."""
        if self.log_path:
            return f"{self.name} {what}; see {self.log_path}"
        return f"{self.name} {what}; its stderr ends with:\n{self.stderr_tail()}"

    def stop(self, grace_s=0.0):
        """SIGKILL; with `grace_s`, SIGTERM first and SIGKILL only after `grace_s` s (to its whole
        session when it has one, which reaches the workers of a serve)."""
        if self.alive():
            if grace_s > 0:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self._kill()
            else:
                self._kill()
        self.popen.wait()
        if not self.log.closed:
            self.log.close()

    def _kill(self):
        try:
            if self.new_session:
                os.killpg(self.pid, signal.SIGKILL)
            else:
                self.popen.kill()
        except ProcessLookupError:
            pass


def tail(text, lines=TAIL_LINES):
    """The last `lines` lines of `text` before an error's backtrace (RUST_BACKTRACE=1 would fill them)."""
    text = text.split("\nStack backtrace:\n", 1)[0]
    return "\n".join(text.splitlines()[-lines:])


def start(command, env=None, log_path=None, new_session=False):
    """Starts `command` (a `tramontane` subcommand); read its address with `.listening(prefix)`.
    `new_session`: in its own session, so that stopping it reaches its children too."""
    return Process(command, env=env, log_path=log_path, new_session=new_session)


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def get(addr, path, headers=None, timeout=5.0):
    """(status, body text) of GET http://ADDR/PATH on a new connection; status None without an answer."""
    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        return None, f"{type(error).__name__}: {error}"
    finally:
        conn.close()


def wait_healthy(addr, timeout, process=None, headers=None, poll_s=0.5, request_timeout=2.0):
    """Polls GET /health until it answers 200 (503 until every expert has a live worker);
    StartError after `timeout` s, or as soon as `process` (the server) exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.alive():
            raise StartError(process.explain(f"exited with {process.returncode} before GET /health answered 200"))
        if get(addr, "/health", headers, request_timeout)[0] == 200:
            return
        if time.monotonic() >= deadline:
            what = f"answered no 200 to GET http://{addr}/health within {timeout:.0f} s"
            raise StartError(process.explain(what) if process is not None else f"the server {what}")
        time.sleep(poll_s)


def run_json(command, env=None):
    """Runs `command` to completion and parses its stdout as JSON; CommandFailed when it fails."""
    command = [str(part) for part in command]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CommandFailed(f"{' '.join(command)} exited with {done.returncode}:\n{tail(done.stderr)}")
    return json.loads(done.stdout)
