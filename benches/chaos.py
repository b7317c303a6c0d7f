"""Chaos run: `tramontane serve` under load while its workers are killed,
stopped, flooded and fed garbage, with a verdict per scenario.

Every scenario starts its own `serve` (loopback ports, the tiny checkpoint
generated once into target/chaos-model) and keeps it under load the whole
time: --concurrency threads (32), each sending, one after the other, a
seeded mix of streaming and non-streaming /v1/completions and
/v1/chat/completions requests with real text prompts (the server
tokenizes), max_tokens 16-32, temperature 0 and ignore_eos, over plain
HTTP/1.1 (http.client, a new connection per request). A request succeeds
when it answers 200 and generates exactly max_tokens tokens (a stream: no
error event, a finish_reason, the usage chunk and `data: [DONE]`); else its
cause is kept: the HTTP status with the error's type and message, the error
event that ended a stream, a stream cut short, or a connection error.

1. kill -9 worker 0 with every expert on both workers (a placement file):
   no request fails; serve starts the worker again
   (tramontane_serve_worker_restarts_total) and the router uses it again.
2. kill -9 worker 0 under the default placement: the requests it breaks fail
   with a 503 (or a stream's error event) naming the worker; /health turns
   503; serve starts the worker again and the cluster serves again
   (recovery: from the kill to the first success of a request sent after
   it, and to /health 200 again).
3. SIGSTOP worker 0 for 10 s (serve --dispatch-timeout-ms 2000): the
   requests it holds fail with a 5xx within about the deadline (their
   latency is bounded by the deadline plus the p99 of a request before the
   stop plus 1 s); then SIGCONT, and recovery as in 2, from the SIGCONT.
4. 10x overload: serve --queue 16 --max-running 8 under 10x the concurrency
   (320 threads; after a 429 a thread waits 0.25-1 s, under the Retry-After
   of 1 s): 429s, each with a Retry-After of whole seconds, no 5xx, every
   accepted request completes; the serve process's RSS (VmRSS), sampled
   every 100 ms, grows by at most --max-rss-growth-mib over its baseline.
5. With --api-key: a few hundred seeded-random malformed bodies (wrong
   types, missing fields, out-of-range / huge / NaN-like numbers, nested
   garbage, invalid UTF-8, truncated JSON, wrong content types, stop lists
   over the cap, more than 64 prompts, bodies over 1 MiB, ...; each invalid
   by construction), requests without the key or with a wrong one (401),
   and raw garbage on the router's and the workers' gRPC ports: only 4xx,
   never a 5xx or a connection closed without an answer; the load beside
   them does not fail, and afterwards /health is 200, a completion
   succeeds over HTTP and over gRPC (`tramontane generate --server`), and
   no worker was restarted.

Prints one row per scenario (requests sent, succeeded, the others by cause,
p99 latency of all and of the failures, max RSS, recovery time, PASS/FAIL),
then each scenario's checks and error messages; --json prints the same as
JSON. Exits 1 when a scenario fails (3 when the whole run passes --timeout).
serve's logs go to --log-dir, and every request of scenario N (its start,
latency, outcome, cause and message) to N-requests.jsonl there.

Usage: python benches/chaos.py --bin target/release/tramontane [--model target/chaos-model]
           [--concurrency 32] [--seed 0] [--malformed 300] [--only 1,3] [--json]
"""

import argparse
import atexit
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

PROMPTS = [
    "The tramontane is a cold wind from the north that",
    "Write a short poem about the sea at night.",
    "Explain how a mixture-of-experts layer routes each token.",
    "Once upon a time, in a village between two mountains,",
    "List three reasons why the sky looks blue.",
    "The quick brown fox jumps over the lazy dog because",
    "Translate into French: the weather is lovely today.",
    "What is the capital of Catalonia, and what is it known for?",
    "In 1889 the Eiffel Tower opened to the public, and",
    "Summarize the plot of a detective story in two sentences.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les vents du nord soufflent sur la plaine et",
    "Describe the smell of bread baking in the morning.",
    "A router process dispatches hidden states to expert workers over gRPC;",
    "Why do cats sleep so much? Give a careful answer.",
    "Ein kalter Wind weht über die Berge, und",
]
OK, FAILED = "ok", "failed"


def log(message):
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


class Timeout(Exception):
    """The whole run took longer than --timeout."""


# ----------------------------------------------------------------------------
# serve and its workers


class Serve:
    """One `tramontane serve` on loopback ports, in its own session (a Ctrl-C
    at the terminal reaches this script, which stops it)."""

    started = []  # every Serve, for the cleanup on exit

    def __init__(self, binary, model, name, log_dir, args, api_key=None, startup_timeout=120.0):
        self.binary, self.name, self.api_key = binary, name, api_key
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        self.workers_seen = set()
        cmd = [binary, "serve", "--model", model, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
               "--drain-timeout", "5", *args]
        self.log_file.write("$ " + " ".join(cmd) + "\n")
        self.log_file.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_file,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid
        Serve.started.append(self)
        self.lines = []
        self.got_line = threading.Condition()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.grpc = self._listening("tramontane router", startup_timeout)
        self.http = self._listening("tramontane http", startup_timeout)
        self.workers()  # remember the first ones

    def _read_stdout(self):
        for line in self.proc.stdout:
            with self.got_line:
                self.lines.append(line)
                self.got_line.notify_all()
        with self.got_line:
            self.lines.append(None)
            self.got_line.notify_all()

    def _listening(self, prefix, timeout):
        deadline = time.monotonic() + timeout
        seen = 0
        with self.got_line:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise RuntimeError(f"serve exited with {self.proc.wait()} before `{prefix} listening`; "
                                           f"see {self.log_path}")
                    seen += 1
                    if line.startswith(prefix) and "listening on " in line:
                        return line.strip().rsplit("listening on ", 1)[1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"serve printed no `{prefix} listening` in {timeout:.0f} s; see {self.log_path}")
                self.got_line.wait(left)

    def alive(self):
        return self.proc.poll() is None

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
        host, port = split_addr(self.http)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers=self.headers())
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as error:
            return None, f"{type(error).__name__}: {error}"
        finally:
            conn.close()

    def metrics(self):
        """{(name, labels): value} of /metrics ({} when it does not answer)."""
        status, text = self.get("/metrics")
        return parse_metrics(text) if status == 200 else {}

    def wait_healthy(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"serve exited with {self.proc.returncode}; see {self.log_path}")
            if self.get("/health", timeout=2)[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"/health not 200 within {timeout:.0f} s")

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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        for pid in workers:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline and is_worker(pid):
                time.sleep(0.05)
            signal_if_worker(pid, signal.SIGKILL)
        if not self.log_file.closed:
            self.log_file.close()



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


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def parse_metrics(text):
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
            try:
                values[(m.group(1), labels)] = float(m.group(3))
            except ValueError:
                pass
    return values


def metric(values, name, **labels):
    want = tuple(sorted((k, str(v)) for k, v in labels.items()))
    return sum(v for (n, ls), v in values.items() if n == name and all(x in ls for x in want))


def stop_all():
    for serve in Serve.started:
        try:
            serve.stop()
        except Exception as error:  # noqa: BLE001 (cleanup goes on)
            log(f"cleanup of {serve.name}: {error}")
    Serve.started.clear()


# ----------------------------------------------------------------------------
# requests


@dataclass
class Result:
    start: float  # time.monotonic()
    end: float
    outcome: str  # OK or FAILED
    cause: str = ""  # for the table, e.g. "503 server_error: layer # expert # has no live worker"
    message: str = ""  # the whole error message
    status: int = None  # HTTP status; None without an answer
    retry_after: str = None
    label: str = ""  # what was sent
    error_type: str = ""  # the `type` of an OpenAI error body or error event

    @property
    def latency(self):
        return self.end - self.start


def normalize(message, limit=64):
    """The first clause of a message, without what is in parentheses, numbers and addresses made
    generic: what the table counts causes by (the whole messages are kept beside)."""
    message = re.sub(r"\s*\([^)]*\)", "", message.split(";")[0]).strip()
    message = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", message)
    message = re.sub(r"\d+(\.\d+)?", "#", message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def error_of(data):
    """(type, message) of an OpenAI error body, or None when it is not one."""
    try:
        body = json.loads(data)
        error = body["error"]
        return str(error.get("type")), str(error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def send(addr, method, path, body=b"", headers=None, timeout=30.0):
    """One request on a new connection: (status, headers, body bytes), or raises OSError/HTTPException."""
    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) before reading it all: read the answer
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def load_request(addr, model, rng, api_key=None, timeout=30.0):
    """One request of the load mix; a Result."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    max_tokens = rng.randint(16, 32)
    text = rng.choice(PROMPTS)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    label = f"{'chat' if chat else 'completions'}{' stream' if stream else ''}"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.monotonic()

    def done(outcome, cause="", message="", status=None, retry_after=None, error_type=""):
        return Result(start, time.monotonic(), outcome, cause, message, status, retry_after, label, error_type)

    host, port = split_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            data = response.read()
            error = error_of(data)
            kind, message = error or ("", data.decode("utf-8", "replace")[:300])
            cause = (f"{response.status} {kind}: {normalize(message)}" if error
                     else f"{response.status} (not an error body)")
            return done(FAILED, cause, message, response.status, response.getheader("Retry-After"), kind)
        if not stream:
            data = json.loads(response.read())
            got = data.get("usage", {}).get("completion_tokens")
            finish = data["choices"][0].get("finish_reason")
            if got != max_tokens or finish != "length":
                return done(FAILED, "200 incomplete", f"{got} of {max_tokens} tokens, finish_reason {finish}", 200)
            return done(OK, status=200)
        usage, finish, finished = None, None, False
        while True:
            line = response.readline()
            if not line:
                break
            line = line.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            event = json.loads(data)
            if "error" in event:
                kind, message = error_of(data) or ("", data)
                return done(FAILED, f"stream error event ({kind}): {normalize(message)}", message, 200,
                            error_type=kind)
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                finish = choice.get("finish_reason") or finish
        if not finished:
            return done(FAILED, "stream cut (no [DONE])", "the stream ended without data: [DONE]", 200)
        if usage != max_tokens or finish != "length":
            return done(FAILED, "200 incomplete", f"stream: {usage} of {max_tokens} tokens, finish_reason {finish}",
                        200)
        return done(OK, status=200)
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as error:
        kind = "timeout" if isinstance(error, socket.timeout) else type(error).__name__
        return done(FAILED, f"connection error: {kind}", f"{type(error).__name__}: {error}")
    finally:
        conn.close()


class Load:
    """`threads` threads sending the load mix, each one request after the other, until stop()."""

    def __init__(self, addr, model, threads, seed, api_key=None, backoff_429=None, timeout=30.0):
        self.addr, self.model, self.api_key, self.timeout = addr, model, api_key, timeout
        self.backoff_429 = backoff_429
        self.results = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.in_flight = {}  # thread index -> start of its request
        self.threads = [threading.Thread(target=self._run, args=(i, seed * 1000 + i), daemon=True)
                        for i in range(threads)]

    def _run(self, index, seed):
        rng = random.Random(seed)
        while not self.stopping.is_set():
            self.in_flight[index] = time.monotonic()
            result = load_request(self.addr, self.model, rng, self.api_key, self.timeout)
            self.in_flight.pop(index, None)
            with self.lock:
                self.results.append(result)
            if result.status == 429 and self.backoff_429:
                self.stopping.wait(rng.uniform(*self.backoff_429))

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self, join_timeout=45.0):
        """Stops and waits for the requests in flight; one left after `join_timeout` counts as hung."""
        self.stopping.set()
        deadline = time.monotonic() + join_timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        with self.lock:
            for start in list(self.in_flight.values()):
                self.results.append(Result(start, now, FAILED, "hung (no answer when the load stopped)",
                                           f"no answer after {now - start:.1f} s"))
        return self.results

    def snapshot(self):
        with self.lock:
            return list(self.results)


class Monitor:
    """Polls /health every 50 ms (and /metrics every 200 ms) into timelines."""

    def __init__(self, serve, metrics=True):
        self.serve, self.want_metrics = serve, metrics
        self.health = []  # (t, status)
        self.metrics = []  # (t, values)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        last_metrics = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            self.health.append((now, self.serve.get("/health", timeout=2)[0]))
            if self.want_metrics and now - last_metrics >= 0.2:
                last_metrics = now
                self.metrics.append((time.monotonic(), self.serve.metrics()))
            self.stopping.wait(0.05)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(10)

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


class RssSampler:
    """VmRSS of one process every 100 ms."""

    def __init__(self, pid):
        self.pid = pid
        self.samples = []  # (t, MiB)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def read(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self):
        while not self.stopping.is_set():
            rss = self.read()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stopping.wait(0.1)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
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


def warm_up(serve, model):
    """One request of each kind of the mix, which must succeed (the first steps are slower)."""
    rng = random.Random(12345)
    for _ in range(6):
        result = load_request(serve.http, model, rng, serve.api_key, timeout=60)
        if result.outcome != OK:
            raise RuntimeError(f"warm-up request failed: {result.cause} ({result.message})")


def wait_until(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


# ----------------------------------------------------------------------------
# reports


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


class Report:
    def __init__(self, number, title):
        self.number, self.title = number, title
        self.results = []
        self.checks = []  # (passed, what, detail)
        self.notes = []
        self.recovery = None  # text for the table
        self.recovery_s = {}  # for --json
        self.max_rss_mib = None
        self.rss_growth_mib = None
        self.messages = {}  # a failure's whole message, numbers made generic -> [an example, count]
        self.log_path = None
        self.log_excerpt = []
        self.error = None  # a scenario that could not run
        self.t0 = time.monotonic()
        self.events = {}  # what the scenario did -> when (time.monotonic())

    def write_requests(self, path):
        """Every request as a JSON line (times in s from the scenario's start), after a line of the events."""
        with open(path, "w") as f:
            f.write(json.dumps({"events": {k: round(t - self.t0, 4) for k, t in self.events.items()}}) + "\n")
            for r in sorted(self.results, key=lambda r: r.start):
                f.write(json.dumps({"start": round(r.start - self.t0, 4), "latency": round(r.latency, 4),
                                    "outcome": r.outcome, "status": r.status, "sent": r.label, "cause": r.cause,
                                    "message": r.message, "retry_after": r.retry_after}) + "\n")

    def check(self, passed, what, detail=""):
        self.checks.append((bool(passed), what, detail))
        return passed

    @property
    def passed(self):
        return self.error is None and bool(self.checks) and all(p for p, _, _ in self.checks)

    def causes(self):
        counts = {}
        self.messages = {}
        for r in self.results:
            if r.outcome != OK:
                counts[r.cause] = counts.get(r.cause, 0) + 1
                key = (r.cause.split(":")[0], re.sub(r"\d+", "#", r.message))
                self.messages.setdefault(key, [f"{key[0]}: {r.message}", 0])[1] += 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self):
        failed = [r for r in self.results if r.outcome != OK]
        p99_all = percentile([r.latency for r in self.results], 99)
        p99_failed = percentile([r.latency for r in failed], 99)
        causes = self.causes()
        return {
            "scenario": self.number,
            "title": self.title,
            "sent": len(self.results),
            "succeeded": len(self.results) - len(failed),
            "failed": len(failed),
            "failed_by_cause": causes,
            "p99_latency_s": p99_all,
            "p99_failed_latency_s": p99_failed,
            "max_failed_latency_s": max((r.latency for r in failed), default=None),
            "max_rss_mib": self.max_rss_mib,
            "rss_growth_mib": self.rss_growth_mib,
            "recovery": self.recovery,
            "recovery_s": self.recovery_s,
            "verdict": "PASS" if self.passed else "FAIL",
            "checks": [{"passed": p, "check": w, "detail": d} for p, w, d in self.checks],
            "notes": self.notes,
            "error": self.error,
            # Each distinct message (numbers aside), one example of it and how many times it came.
            "messages": sorted(([m, n] for m, n in self.messages.values()), key=lambda mn: -mn[1]),
            "serve_log": self.log_path,
            "serve_log_excerpt": self.log_excerpt,
        }


def fmt(value, spec=".2f", none="-"):
    return none if value is None else format(value, spec)


def print_table(summaries):
    heads = ["#", "scenario", "sent", "ok", "not ok, by cause", "p99 all/failed (s)", "max RSS (MiB)",
             "recovery (s)", "verdict"]
    rows = []
    for s in summaries:
        causes = [f"{c}: {n}" for c, n in s["failed_by_cause"].items()] or ["-"]
        if len(causes) > 8:
            rest = sum(list(s["failed_by_cause"].values())[7:])
            causes = causes[:7] + [f"... {len(causes) - 7} more causes ({rest})"]
        rss = fmt(s["max_rss_mib"], ".0f")
        if s["rss_growth_mib"] is not None:
            rss += f" (+{s['rss_growth_mib']:.0f})"
        first = [str(s["scenario"]), s["title"], str(s["sent"]), str(s["succeeded"]), causes[0],
                 f"{fmt(s['p99_latency_s'])} / {fmt(s['p99_failed_latency_s'])}", rss, s["recovery"] or "-",
                 s["verdict"]]
        rows.append(first)
        for extra in causes[1:]:
            rows.append(["", "", "", "", extra, "", "", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(line(heads))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def print_details(summaries):
    for s in summaries:
        print()
        print(f"{s['scenario']}. {s['title']}: {s['verdict']}")
        if s["error"]:
            print(f"   could not run: {s['error']}")
        for c in s["checks"]:
            print(f"   [{'x' if c['passed'] else ' '}] {c['check']}" + (f": {c['detail']}" if c["detail"] else ""))
        for n in s["notes"]:
            print(f"   - {n}")
        for message, count in s["messages"][:8]:
            print(f"   {count:6d} x {message[:300]}")
        if len(s["messages"]) > 8:
            print(f"   ... and {len(s['messages']) - 8} more distinct messages (--json has them all)")
        if s["verdict"] != "PASS":
            if s["serve_log"]:
                print(f"   serve log: {s['serve_log']}")
            for line in s["serve_log_excerpt"]:
                print(f"   | {line[:400]}")


# ----------------------------------------------------------------------------
# scenarios


class Ctx:
    def __init__(self, args):
        self.args = args
        with open(os.path.join(args.model, "config.json")) as f:
            config = json.load(f)
        self.layers = config["num_hidden_layers"]
        self.experts = config["num_local_experts"]

    def serve(self, name, extra, api_key=None):
        keys = ["--api-key", api_key] if api_key else []
        return Serve(self.args.bin, self.args.model, name, self.args.log_dir, ["--workers", "2", *keys, *extra],
                     api_key)


def clear_failure(r):
    """A failure that names its cause: an OpenAI error body (or stream error event) of a 5xx server_error."""
    if r.error_type != "server_error":
        return False
    return r.cause.startswith("stream error event") or r.status is not None and 500 <= r.status < 600


def failures(results):
    return [r for r in results if r.outcome != OK]


def scenario_kill_replicated(ctx, report):
    path = os.path.join(ctx.args.log_dir, "placement-replicated.json")
    with open(path, "w") as f:
        json.dump({"workers": 2, "experts": [[[0, 1] for _ in range(ctx.experts)] for _ in range(ctx.layers)]}, f)
    serve = ctx.serve("1-kill-replicated", ["--placement", path])
    report.log_path = serve.log_path
    serve.wait_healthy()
    model = serve.model_name()
    warm_up(serve, model)
    rss = RssSampler(serve.pid).start()
    monitor = Monitor(serve).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed).start()
    try:
        time.sleep(ctx.args.warm_s)
        victim = serve.worker_pid(0)
        kill_at = report.events["kill -9 worker 0"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        log(f"1: kill -9 worker 0 (pid {victim})")

        def back():
            values = serve.metrics()
            restarted = metric(values, "tramontane_serve_worker_restarts_total", worker=0) >= 1
            up = metric(values, "tramontane_router_worker_up", worker=0) == 1
            pid = serve.workers().get(0)
            return restarted and up and pid is not None and pid != victim and time.monotonic()

        back_at = wait_until(back, 30, step=0.1)
        pairs_before = metric(serve.metrics(), "tramontane_router_worker_expert_pairs_total", worker=0)
        time.sleep(ctx.args.after_s)
    finally:
        report.results = load.stop()
        monitor.stop()
        report.max_rss_mib = rss.stop()
    values = serve.metrics()
    restarts = metric(values, "tramontane_serve_worker_restarts_total", worker=0)
    pairs_after = metric(values, "tramontane_router_worker_expert_pairs_total", worker=0)
    if back_at:
        report.events["worker 0 back"] = back_at
        report.recovery_s["worker_back"] = back_at - kill_at
        report.recovery = f"worker {back_at - kill_at:.2f}"
    down = [t for t, s in monitor.health if t >= kill_at and s != 200]
    report.notes.append(f"/health non-200 polls after the kill: {len(down)} (every expert has a replica)")
    fails = failures(report.results)
    report.check(len(report.results) > 0, "requests were sent", f"{len(report.results)}")
    report.check(not fails, "no request failed", f"{len(fails)} failed")
    report.check(restarts >= 1, "serve started worker 0 again (tramontane_serve_worker_restarts_total)",
                 f"{restarts:.0f}")
    report.check(back_at is not None, "worker 0 back (restarted, tramontane_router_worker_up 1) within 30 s",
                 fmt(report.recovery_s.get("worker_back")) + " s")
    report.check(pairs_after > pairs_before, "the router sends work to the restarted worker 0",
                 f"tramontane_router_worker_expert_pairs_total{{worker=\"0\"}} {pairs_before:.0f} -> {pairs_after:.0f}")
    report.check(serve.get("/health")[0] == 200, "/health 200 at the end")
    return serve


def kill_or_stop_scenario(ctx, report, stop_s=None):
    """2 (stop_s None: kill -9 worker 0) or 3 (SIGSTOP worker 0 for stop_s, then SIGCONT)."""
    deadline_ms = ctx.args.dispatch_timeout_ms
    extra = ["--dispatch-timeout-ms", str(deadline_ms)] if stop_s else []
    serve = ctx.serve("3-sigstop" if stop_s else "2-kill-unreplicated", extra)
    report.log_path = serve.log_path
    serve.wait_healthy()
    model = serve.model_name()
    warm_up(serve, model)
    rss = RssSampler(serve.pid).start()
    monitor = Monitor(serve).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed).start()
    try:
        time.sleep(ctx.args.warm_s)
        victim = serve.worker_pid(0)
        fault_at = report.events["SIGSTOP worker 0" if stop_s else "kill -9 worker 0"] = time.monotonic()
        before = list(load.snapshot())
        if stop_s:
            os.kill(victim, signal.SIGSTOP)
            log(f"3: SIGSTOP worker 0 (pid {victim}) for {stop_s:.0f} s")
            time.sleep(stop_s)
            signal_if_worker(victim, signal.SIGCONT)
            report.events["SIGCONT worker 0"] = time.monotonic()
            log("3: SIGCONT")
        else:
            os.kill(victim, signal.SIGKILL)
            log(f"2: kill -9 worker 0 (pid {victim})")
        since = time.monotonic() if stop_s else fault_at  # recovery counts from the SIGCONT or the kill

        def first_success():
            ok = [r.end for r in load.snapshot() if r.outcome == OK and r.start >= since]
            return min(ok) if ok else None

        down_at, up_at = monitor.wait_health_up(fault_at, 30)
        success_at = wait_until(first_success, 30)
        time.sleep(ctx.args.after_s)
    finally:
        report.results = load.stop()
        monitor.stop()
        report.max_rss_mib = rss.stop()
    success_at = min((r.end for r in report.results if r.outcome == OK and r.start >= since), default=None)
    for name, t in (("/health non-200", down_at), ("/health 200 again", up_at), ("first success", success_at)):
        if t is not None:
            report.events[name] = t
    values = serve.metrics()
    restarts = metric(values, "tramontane_serve_worker_restarts_total", worker=0)
    fails = failures(report.results)
    unclear = [r for r in fails if not clear_failure(r)]
    names_worker = [r for r in fails if "worker 0" in r.message]
    report.recovery_s = {"first_success": None if success_at is None else success_at - since,
                         "health_200": None if up_at is None else up_at - since,
                         "health_down_after_fault": None if down_at is None else down_at - fault_at}
    report.recovery = (f"ok {fmt(report.recovery_s['first_success'])} / health {fmt(report.recovery_s['health_200'])}"
                       + (" (from SIGCONT)" if stop_s else ""))
    report.check(len(report.results) > 0, "requests were sent", f"{len(report.results)}")
    report.check(fails, "the fault broke requests (the load reached worker 0)", f"{len(fails)} failed")
    report.check(not unclear, "every failure is a 5xx (or a stream's error event) with a server_error body",
                 "; ".join(sorted({r.cause for r in unclear}))[:300] or f"{len(fails)} of {len(fails)}")
    report.check(len(names_worker) == len(fails), "every failure's message names worker 0",
                 f"{len(names_worker)} of {len(fails)}")
    report.check(down_at is not None, "/health turned non-200 while worker 0 was out",
                 f"{fmt(report.recovery_s['health_down_after_fault'])} s after the fault")
    report.check(up_at is not None, "/health 200 again within 30 s", fmt(report.recovery_s["health_200"]) + " s")
    report.check(success_at is not None, "a request sent after it succeeded within 30 s",
                 fmt(report.recovery_s["first_success"]) + " s")
    if up_at is not None:
        late = [r for r in fails if r.start >= up_at]
        report.check(not late, "no request sent after /health was 200 again failed",
                     f"{len(late)}" + (f": {late[0].cause}" if late else ""))
    if stop_s:
        normal = percentile([r.latency for r in before if r.outcome == OK], 99) or 0.0
        bound = deadline_ms / 1000 + normal + 1.0
        slowest = max((r.latency for r in fails), default=0.0)
        report.check(slowest <= bound, f"every failure answered within the deadline ({deadline_ms} ms) + the p99 "
                     f"before the stop ({normal:.2f} s) + 1 s = {bound:.2f} s", f"slowest {slowest:.2f} s")
        during = [r for r in report.results if fault_at <= r.start < fault_at + stop_s]
        report.notes.append(f"requests sent during the stop: {len(during)}, {len(failures(during))} failed, "
                            f"p99 latency {fmt(percentile([r.latency for r in during], 99))} s")
        report.notes.append(f"worker restarts by serve: {restarts:.0f} (a stopped worker is not dead)")
    else:
        report.check(restarts >= 1, "serve started worker 0 again (tramontane_serve_worker_restarts_total)",
                     f"{restarts:.0f}")
    report.check(serve.get("/health")[0] == 200, "/health 200 at the end")
    report.notes.append(f"failed latency p50 {fmt(percentile([r.latency for r in fails], 50))} s, "
                        f"max {fmt(max((r.latency for r in fails), default=None))} s")
    return serve


def scenario_overload(ctx, report):
    serve = ctx.serve("4-overload", ["--queue", "16", "--max-running", "8"])
    report.log_path = serve.log_path
    serve.wait_healthy()
    model = serve.model_name()
    warm_up(serve, model)
    rss = RssSampler(serve.pid)
    time.sleep(0.5)
    baseline = rss.read()
    rss.start()
    overflows = listen_overflows()
    threads = 10 * ctx.args.concurrency
    load = Load(serve.http, model, threads, ctx.args.seed, backoff_429=(0.25, 1.0), timeout=60.0).start()
    log(f"4: {threads} threads against --queue 16 --max-running 8")
    try:
        time.sleep(ctx.args.overload_s)
    finally:
        report.results = load.stop(join_timeout=60.0)
        max_rss = rss.stop()
    if overflows is not None:
        report.notes.append(f"accept-queue overflows on this host during the run (TcpExtListenOverflows, each "
                            f"a SYN the client sends again after 1 s): {listen_overflows() - overflows}")
    report.max_rss_mib = max_rss
    report.rss_growth_mib = None if max_rss is None or baseline is None else max_rss - baseline
    results = report.results
    refused = [r for r in results if r.status == 429]
    bad_retry = [r for r in refused if not (r.retry_after or "").strip().isdigit() or int(r.retry_after) < 1]
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    other = [r for r in results if r.outcome != OK and r.status != 429]
    accepted = [r for r in results if r.status == 200]
    retry_values = sorted({r.retry_after for r in refused if r.retry_after})
    report.check(refused, "the overload was refused with 429", f"{len(refused)} of {len(results)}")
    report.check(not bad_retry, "every 429 has a Retry-After of whole seconds",
                 f"{len(bad_retry)} without; values seen {retry_values}")
    report.check(not server_errors, "no 5xx", f"{len(server_errors)}")
    report.check(not other, "every request not refused completed (no error, no cut stream, no hang)",
                 f"{len(other)}" + (f": {other[0].cause}" if other else ""))
    report.check(accepted, "requests were accepted and served", f"{len(accepted)}")
    report.check(report.rss_growth_mib is not None and report.rss_growth_mib <= ctx.args.max_rss_growth_mib,
                 f"serve's RSS grew by at most {ctx.args.max_rss_growth_mib} MiB",
                 f"baseline {fmt(baseline, '.0f')} MiB, max {fmt(max_rss, '.0f')} MiB")
    report.check(wait_until(lambda: serve.get("/health")[0] == 200, 10), "/health 200 after the overload")
    report.notes.append(f"{threads} threads for {ctx.args.overload_s:.0f} s; p99 latency of the accepted "
                        f"{fmt(percentile([r.latency for r in accepted], 99))} s, of the 429s "
                        f"{fmt(percentile([r.latency for r in refused], 99), '.3f')} s")
    return serve


# ---- scenario 5: malformed input


class Case:
    def __init__(self, kind, path, body, content_type="application/json", method="POST", key=True,
                 expect=(400, 499)):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()  # NaN and Infinity as their (invalid) literals
        self.kind, self.path, self.body, self.content_type = kind, path, body, content_type
        self.method, self.key, self.expect = method, key, expect


def garbage_value(rng, depth=0):
    """Random nested JSON garbage."""
    pick = rng.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**30, 7])
    if pick == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.14, -0.0])
    if pick == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF), 0x1F600]))
                       for _ in range(rng.randrange(0, 12)))
    if pick == 5:
        return ""
    if pick in (6, 7):
        return [garbage_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {f"k{rng.randrange(100)}": garbage_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


# Values of the wrong JSON type for each field (serde refuses them all).
WRONG_TYPES = {
    "int": ["16", [16], {"v": 16}, True, 1.5, "NaN"],
    "float": ["0.5", [0.5], {"v": 0.5}, True, "NaN", "Infinity"],
    "bool": ["yes", 1, [], {}, "true"],
    "string": [123, [], {"a": "b"}, True, 1.5],
}
COMMON_FIELDS = {"model": "string", "temperature": "float", "top_p": "float", "top_k": "int", "seed": "int",
                 "n": "int", "presence_penalty": "float", "frequency_penalty": "float", "ignore_eos": "bool",
                 "stream": "bool"}
COMPLETION_FIELDS = {"max_tokens": "int", "logprobs": "int", "echo": "bool"}
CHAT_FIELDS = {"max_tokens": "int", "max_completion_tokens": "int", "logprobs": "bool", "top_logprobs": "int"}
# Values out of range (or that overflow their type), each refused: the name of the field and the value.
OUT_OF_RANGE = [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", -(2**63)), ("max_tokens", 2**64), ("max_tokens", 10**12),
    ("max_tokens", 10**400),
    ("temperature", -0.5), ("temperature", 2.0001), ("temperature", 1e308), ("temperature", -1e308),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", float("-inf")),
    ("top_p", 0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", -(2**63)), ("top_k", 2**70),
    ("presence_penalty", 2.5), ("presence_penalty", -9), ("frequency_penalty", 1e300), ("frequency_penalty", -2.01),
    ("n", 2), ("n", 0), ("n", -1), ("n", 10**6),
    ("seed", 2**64), ("seed", 1.5),
]


def base_body(rng, model, chat):
    body = {"model": model, "max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.7, 1])}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    return body


def invalid_json_case(rng, model, chat):
    """A body that is a JSON object with one field wrong; refused by the server's checks."""
    body = base_body(rng, model, chat)
    fields = {**COMMON_FIELDS, **(CHAT_FIELDS if chat else COMPLETION_FIELDS)}
    pick = rng.randrange(12)
    if pick <= 2:
        name, kind = rng.choice(sorted(fields.items()))
        body[name] = rng.choice(WRONG_TYPES[kind])
        what = f"{name}: wrong type"
    elif pick <= 4:
        name, value = rng.choice(OUT_OF_RANGE)
        if name == "max_tokens" and chat and rng.random() < 0.5:
            name = "max_completion_tokens"
        body[name] = value
        what = f"{name} = {str(value)[:20]}"
    elif pick == 5:
        missing = rng.choice(["model", "messages" if chat else "prompt"])
        del body[missing]
        what = f"missing {missing}"
    elif pick == 6:
        body["model"] = rng.choice(["gpt-4", "", "chaos-model\0", model + " ", model.upper(), "../" + model])
        what = "another model"
        return Case(what, path(chat), body, expect=(404, 404) if body["model"] else (400, 404))
    elif pick == 7:
        choice = rng.randrange(5)
        if choice == 0:
            body["stop"] = [f"s{i}" for i in range(rng.randint(5, 5000))]
            what = f"stop: {len(body['stop'])} strings"
        elif choice == 1:
            body["stop"] = "x" * rng.randint(513, 100000)
            what = "stop: a string over 512 bytes"
        elif choice == 2:
            body["stop"] = ["a", "é" * rng.randint(257, 2000)]
            what = "stop: a string over 512 bytes in a list"
        elif choice == 3:
            body["stop"] = rng.choice([123, [1, 2], {"a": "b"}, [["x"]], True, ["ok", None]])
            what = "stop: wrong type"
        else:
            body["stream_options"] = rng.choice(["yes", 1, {"include_usage": "yes"}, {"include_usage": 1}])
            what = "stream_options: wrong type"
    elif chat:
        choice = rng.randrange(9)
        what = "messages"
        if choice == 0:
            body["messages"] = []
        elif choice == 1:
            body["messages"] = rng.choice(["hello", 123, {"role": "user", "content": "x"}, [[1, "x"]], True])
        elif choice == 2:
            body["messages"] = [{"content": "no role"}]
        elif choice == 3:
            body["messages"] = [{"role": rng.choice([1, None, [], {}]), "content": "x"}]
        elif choice == 4:
            body["messages"] = [{"role": "user", "content": rng.choice([123, True, {"text": "x"}, [1, 2], [[]]])}]
        elif choice == 5:
            body["messages"] = [{"role": "user", "content": [{"type": rng.choice(["image_url", "audio", "", 7]),
                                                             "image_url": {"url": "http://x/y.png"}}]}]
        elif choice == 6:
            body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": garbage_value(rng)}}]
        elif choice == 7:
            body["response_format"] = rng.choice([{"type": "json_object"}, {"type": "json_schema"}, "json", 3])
        else:
            body["top_logprobs"] = rng.choice([1, 5, 21, -1])
            body["logprobs"] = False
            what = "top_logprobs without logprobs"
        what = what if what != "messages" else f"messages: case {choice}"
    else:
        choice = rng.randrange(9)
        if choice == 0:
            body["prompt"] = [rng.choice(PROMPTS) for _ in range(rng.randint(65, 400))]
            what = f"{len(body['prompt'])} prompts (over 64)"
        elif choice == 1:
            body["prompt"] = [[rng.randrange(3, 32000)] * 3 for _ in range(rng.randint(65, 300))]
            what = f"{len(body['prompt'])} token-id prompts (over 64)"
        elif choice == 2:
            body["prompt"] = rng.choice([[-1], [32000], [2**40], [1, -5, 3], [[7, 32001]], [1.5], [[1], []]])
            what = "bad token ids"
        elif choice == 3:
            body["prompt"] = rng.choice(["", [], [""], [[]], ["ok", ""]])
            what = "empty prompt"
        elif choice == 4:
            body["prompt"] = rng.choice([123, True, {"text": "x"}, [["nested"]], [1, "mixed"], [[["deep"]]],
                                         [None], [{"a": 1}]])
            what = "prompt: wrong shape"
        elif choice == 5:
            body["prompt"] = [rng.randrange(3, 32000) for _ in range(rng.randint(1100, 5000))]
            what = "prompt beyond the context"
        elif choice == 6:
            body["max_tokens"] = rng.randint(1100, 100000)
            what = "max_tokens beyond the context"
        elif choice == 7:
            body["echo"] = True
            what = "echo"
        else:
            body["logprobs"] = rng.choice([6, 100, -1, -(2**40)])
            what = f"logprobs {body['logprobs']}"
    # Garbage in fields the server ignores (as vLLM does), beside the invalid one.
    if rng.random() < 0.3:
        body[f"x_{rng.randrange(1000)}"] = garbage_value(rng)
    return Case(what, path(chat), body)


def path(chat):
    return "/v1/chat/completions" if chat else "/v1/completions"


def raw_case(rng, model, chat):
    """A body that is not a JSON object the server can read, or one sent the wrong way."""
    text = json.dumps(base_body(rng, model, chat)).encode()
    pick = rng.randrange(13)
    if pick == 0:
        cut = rng.randrange(0, len(text) - 1)
        return Case(f"truncated at {cut}", path(chat), text[:cut])
    if pick == 1:
        bad = rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"])
        at = text.index(b'"content": "' if chat else b'"prompt": "') + (12 if chat else 11)
        return Case("invalid UTF-8 in a string", path(chat), text[:at] + bad + text[at:])
    if pick == 2:
        at = text.index(b'"content": "' if chat else b'"prompt": "') + (12 if chat else 11)
        escape = rng.choice([b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\\x41", b"\\u12G", b"\\q"])
        return Case("bad escape in a string", path(chat), text[:at] + escape + text[at:])
    if pick == 3:
        at = text.index(b'"content": "' if chat else b'"prompt": "') + (12 if chat else 11)
        control = bytes([rng.choice([0, 1, 9, 10, 13, 27, 31])])
        return Case("raw control character in a string", path(chat), text[:at] + control + text[at:])
    if pick == 4:
        return Case("not an object", path(chat), rng.choice([b"[]", b"null", b"42", b'"text"', b"true", b"{}", b""]))
    if pick == 5:
        return Case("random bytes", path(chat), bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
    if pick == 6:
        depth = rng.choice([200, 5000, 100000])
        nested = b"[" * depth + b"]" * depth
        at = text.index(b'"model"')
        return Case(f"{depth} nested arrays", path(chat), text[:at] + b'"x": ' + nested + b", " + text[at:])
    if pick == 7:
        return Case("trailing garbage", path(chat), text + rng.choice([b"}", b" x", b",{}", b"\x00", b"{\"a\":1}"]))
    if pick == 8:
        literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"0x10", b"+1", b"01",
                              b".5", b"1.", b"--1", b"undefined"])
        return Case(f"number literal {literal.decode()}", path(chat),
                    text.replace(b'"temperature": ', b'"temperature": ' + literal + b", \"t\": "))
    if pick == 9:
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   None, "application/xml", "json", "text/json", "application/json-patch"])
        return Case(f"Content-Type {content_type}", path(chat), text, content_type=content_type,
                    expect=(415, 415))
    if pick == 10:
        size = rng.choice([(1 << 20) + 1, 3 << 20])
        filler = b"a" * size
        at = text.index(b'"model"')
        return Case(f"body of {len(text) + size + 10} bytes", path(chat),
                    text[:at] + b'"pad": "' + filler + b'", ' + text[at:], expect=(413, 413))
    if pick == 11:
        return Case("duplicate fields", path(chat), text[:-1] + b', "model": 5}')
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    return Case(f"{method} instead of POST", path(chat), text if method != "GET" else b"", method=method,
                expect=(405, 405))


def malformed_cases(seed, count, model):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        chat = rng.random() < 0.5
        cases.append((raw_case if rng.random() < 0.4 else invalid_json_case)(rng, model, chat))
    for i in range(6):  # the key: missing, wrong, the wrong scheme
        chat = i % 2 == 1
        body = json.dumps(base_body(rng, model, chat)).encode()
        cases.append(Case(["no key", "wrong key", "Basic scheme"][i // 2], path(chat), body,
                          key=[None, "wrong", "basic"][i // 2], expect=(401, 401)))
    return cases


def send_case(addr, case, api_key):
    headers = {}
    if case.content_type:
        headers["Content-Type"] = case.content_type
    if case.key is True:
        headers["Authorization"] = f"Bearer {api_key}"
    elif case.key == "wrong":
        headers["Authorization"] = "Bearer not-the-key"
    elif case.key == "basic":
        headers["Authorization"] = "Basic " + api_key
    start = time.monotonic()
    try:
        status, response_headers, data = send(addr, case.method, case.path, case.body, headers, timeout=30)
    except (OSError, http.client.HTTPException) as error:
        kind = "timeout" if isinstance(error, socket.timeout) else type(error).__name__
        return Result(start, time.monotonic(), FAILED, f"no answer: {kind}", f"{case.kind}: {error}", None,
                      label=case.kind), None
    error = error_of(data)
    lo, hi = case.expect
    if lo <= status <= hi:
        outcome, cause = "expected", f"{status} {error[0] if error else '(no JSON error body)'}"
    elif 400 <= status < 500:
        outcome, cause = "expected", f"{status} {error[0] if error else '(no JSON error body)'}"
    else:
        outcome, cause = FAILED, f"{status} for {case.kind}"
    message = f"{case.kind}: {error[1] if error else data[:200]!r}"
    if status < 400:
        message += f" (sent {case.method} {case.path} {case.body[:300]!r})"
    result = Result(start, time.monotonic(), outcome, cause, message, status, label=case.kind)
    return result, response_headers


def grpc_garbage(rng):
    """Raw byte strings for a gRPC (HTTP/2) port."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)
    frame = lambda length, kind, flags, stream, payload: (  # noqa: E731
        struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload)
    payloads = [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 65536,
        preface + bytes(rng.randrange(256) for _ in range(512)),
        preface + settings + frame(0xFFFFFF, 0, 0, 1, b"x" * 100),  # a DATA frame claiming 16 MiB
        preface + settings + frame(40, 1, 4, 1, bytes(rng.randrange(256) for _ in range(40))),  # HEADERS, bad HPACK
        preface + settings + frame(5, 0, 1, 1, b"\x00\x00\x00\x00\x00"),  # DATA on an unopened stream
        preface + settings + frame(8, 6, 0, 0, b"12345678") * 2000,  # a PING flood
        preface[:10],  # half a preface, then nothing
        preface + settings + frame(4, 8, 0, 0, b"\x7f\xff\xff\xff") * 50,  # WINDOW_UPDATE overflow
    ]
    return payloads


def throw_garbage(addr, payload):
    """Sends `payload` on a new connection, reads what comes back for up to 1 s; (bytes sent, bytes read)."""
    host, port = split_addr(addr)
    read = 0
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.settimeout(1.0)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                read += len(chunk)
        except OSError:
            pass
    return read


def scenario_malformed(ctx, report):
    key = f"chaos-key-{ctx.args.seed}"
    serve = ctx.serve("5-malformed", [], api_key=key)
    report.log_path = serve.log_path
    serve.wait_healthy()
    model = serve.model_name()
    warm_up(serve, model)
    workers_before = serve.workers()
    rss = RssSampler(serve.pid).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed, api_key=key).start()
    cases = malformed_cases(ctx.args.seed, ctx.args.malformed, model)
    answers = [None] * len(cases)
    missing_www, other_status, script_errors = [], [], []
    try:
        time.sleep(1.0)
        log(f"5: {len(cases)} malformed / unauthenticated requests, then garbage on the gRPC ports")
        index = iter(range(len(cases)))
        lock = threading.Lock()

        def sender():
            while True:
                with lock:
                    i = next(index, None)
                if i is None:
                    return
                try:
                    answers[i], headers = send_case(serve.http, cases[i], key)
                except Exception as error:  # noqa: BLE001 (a bug of this script: counted, not hidden)
                    script_errors.append(f"{cases[i].kind}: {type(error).__name__}: {error}")
                    continue
                lowered = {k.lower(): v for k, v in (headers or {}).items()}
                if answers[i].status == 401 and lowered.get("www-authenticate") != "Bearer":
                    missing_www.append(cases[i].kind)
                if headers is not None and not cases[i].expect[0] <= answers[i].status <= cases[i].expect[1]:
                    other_status.append(f"{answers[i].status} for {cases[i].kind}")

        senders = [threading.Thread(target=sender, daemon=True) for _ in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        garbage_rng = random.Random(ctx.args.seed + 5)
        targets = [("router", serve.grpc)]
        # serve starts its workers on port 0: their addresses are in /v1/experts/stats.
        status, text = serve.get("/v1/experts/stats")
        if status == 200:
            targets = [("router", serve.grpc)] + [(f"worker {i}", a) for i, a in
                                                  enumerate(json.loads(text).get("worker_addrs", []))]
        garbage_answers = []
        for name, addr in targets:
            for payload in grpc_garbage(garbage_rng):
                try:
                    garbage_answers.append((name, len(payload), throw_garbage(addr, payload)))
                except OSError as error:
                    garbage_answers.append((name, len(payload), f"{type(error).__name__}: {error}"))
        time.sleep(1.0)
    finally:
        load_results = load.stop()
        report.max_rss_mib = rss.stop()
    malformed = [a for a in answers if a is not None]
    report.results = load_results + malformed
    unanswered_cases = len(cases) - len(malformed)
    load_fails = failures(load_results)
    bad = [a for a in malformed if a.outcome == FAILED]
    five = [a for a in malformed if a.status is not None and a.status >= 500]
    accepted = [a for a in malformed if a.status is not None and a.status < 400]
    dropped = [a for a in malformed if a.status is None]
    unauth = [a for a, c in zip(answers, cases) if c.expect == (401, 401) and a is not None]
    not_json = [a for a in malformed if "(no JSON error body)" in a.cause]
    statuses = {}
    for a in malformed:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    report.check(not five, "no malformed request got a 5xx", "; ".join(a.message[:120] for a in five[:3]) or "0")
    report.check(not dropped, "every malformed request got an answer (no connection closed without one)",
                 "; ".join(f"{a.cause} ({a.message[:80]})" for a in dropped[:3]) or "0")
    report.check(not accepted, "no malformed request was accepted (2xx/3xx)",
                 "; ".join(f"{a.status} {a.label}" for a in accepted[:5]) or "0")
    report.check(unanswered_cases == 0, "every malformed request was sent and answered in time",
                 f"{unanswered_cases} left" + (f"; script errors: {script_errors[:3]}" if script_errors else ""))
    report.check(all(a.status == 401 for a in unauth) and unauth, "requests without the key (or a wrong one) got 401",
                 f"{sum(a.status == 401 for a in unauth)} of {len(unauth)}")
    report.check(not missing_www, "every 401 has WWW-Authenticate: Bearer", ", ".join(missing_www) or "")
    report.check(not load_fails, "the load beside them did not fail",
                 f"{len(load_fails)} of {len(load_results)}" + (f": {load_fails[0].cause}" if load_fails else ""))
    report.check(serve.alive(), "serve still runs")
    report.check(wait_until(lambda: serve.get("/health")[0] == 200, 10), "/health 200 afterwards")
    after = load_request(serve.http, model, random.Random(1), key, timeout=30)
    report.check(after.outcome == OK, "a completion over HTTP succeeds afterwards", after.cause)
    try:
        generate = subprocess.run([ctx.args.bin, "generate", "--server", serve.grpc, "--api-key", key, "--prompt",
                                   "The tramontane is", "--max-tokens", "4", "--json"], capture_output=True,
                                  text=True, timeout=60)
        grpc_ok, grpc_detail = generate.returncode == 0, (generate.stderr or generate.stdout).strip()[-200:]
    except subprocess.TimeoutExpired:
        grpc_ok, grpc_detail = False, "tramontane generate --server took over 60 s"
    report.check(grpc_ok, "a generation over gRPC (tramontane generate --server) succeeds afterwards",
                 "" if grpc_ok else grpc_detail)
    restarts = metric(serve.metrics(), "tramontane_serve_worker_restarts_total")
    report.check(restarts == 0 and serve.workers() == workers_before, "no worker died or was restarted",
                 f"restarts {restarts:.0f}")
    report.notes.append("malformed statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(
        statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
    if other_status:
        report.notes.append(f"{len(other_status)} answered another 4xx than the one expected: "
                            + "; ".join(sorted(set(other_status)))[:400])
    if not_json:
        report.notes.append(f"{len(not_json)} error answers without an OpenAI JSON error body: "
                            + ", ".join(sorted({f'{a.status} {a.label}' for a in not_json}))[:300])
    report.notes.append(f"gRPC garbage: {len(garbage_answers)} connections to {', '.join(n for n, _ in targets)}; "
                        f"bytes read back per connection: "
                        + ", ".join(str(r) for _, _, r in garbage_answers[:12]) + " ...")
    return serve


SCENARIOS = [
    (1, "kill -9 a replicated worker", scenario_kill_replicated),
    (2, "kill -9 an unreplicated worker", lambda ctx, report: kill_or_stop_scenario(ctx, report)),
    (3, "SIGSTOP a worker 10 s", lambda ctx, report: kill_or_stop_scenario(ctx, report, ctx.args.stop_s)),
    (4, "10x overload", scenario_overload),
    (5, "malformed requests, API key", scenario_malformed),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/tramontane")
    parser.add_argument("--model", default="target/chaos-model", help="generated (tiny preset) when missing")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malformed", type=int, default=300, help="malformed requests in scenario 5")
    parser.add_argument("--only", help="scenarios to run, e.g. 1,3")
    parser.add_argument("--warm-s", type=float, default=2.0, help="load before the fault")
    parser.add_argument("--after-s", type=float, default=3.0, help="load after the recovery")
    parser.add_argument("--stop-s", type=float, default=10.0, help="how long scenario 3 stops the worker")
    parser.add_argument("--dispatch-timeout-ms", type=int, default=2000, help="serve's deadline in scenario 3")
    parser.add_argument("--overload-s", type=float, default=8.0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=256.0)
    parser.add_argument("--log-dir", default="target/chaos-logs")
    parser.add_argument("--timeout", type=int, default=330, help="seconds for the whole run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only = {int(x) for x in args.only.split(",")} if args.only else None

    atexit.register(stop_all)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    def on_alarm(_signum, _frame):
        raise Timeout(f"the run took over {args.timeout} s")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started it ignoring SIGINT
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.timeout)

    os.makedirs(args.log_dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.model, "config.json")):
        log(f"generating the tiny checkpoint into {args.model}")
        subprocess.run([args.bin, "gen-model", "--preset", "tiny", "--out", args.model], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
    ctx = Ctx(args)
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(args.bin).st_mtime))
    summaries = []
    try:
        for number, title, run in SCENARIOS:
            if only and number not in only:
                continue
            report = Report(number, title)
            log(f"scenario {number}: {title}")
            began = time.monotonic()
            try:
                run(ctx, report)
            except Timeout:
                raise
            except Exception as error:  # noqa: BLE001 (the scenario fails, the others still run)
                report.error = f"{type(error).__name__}: {error}"
                log(f"scenario {number} could not run: {report.error}")
            finally:
                for s in list(Serve.started):
                    if report.log_path is None:
                        report.log_path = s.log_path
                    s.stop()
                    Serve.started.remove(s)
            if not report.passed and report.log_path:
                report.log_excerpt = log_lines(report.log_path, r"WARN|ERROR|panic|started again|is live", 10)
            summary = report.summary()
            if report.results:
                summary["requests_file"] = os.path.join(args.log_dir, f"{number}-requests.jsonl")
                report.write_requests(summary["requests_file"])
            summary["duration_s"] = time.monotonic() - began
            summaries.append(summary)
            log(f"scenario {number}: {summary['verdict']} ({summary['duration_s']:.0f} s)")
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        stop_all()
        raise SystemExit(130)
    except Timeout as error:
        log(f"{error}: stopping every process")
        stop_all()
        raise SystemExit(3)
    finally:
        signal.alarm(0)
        stop_all()

    passed = all(s["verdict"] == "PASS" for s in summaries)
    if args.json:
        print(json.dumps({"passed": passed, "bin": args.bin, "bin_mtime": built, "concurrency": args.concurrency,
                          "seed": args.seed, "model": args.model, "scenarios": summaries}, indent=1))
    else:
        print(f"chaos run of {args.bin} (built {built}) serve --workers 2 on {args.model}, load of "
              f"{args.concurrency} threads (seed {args.seed})")
        print_table(summaries)
        print_details(summaries)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
