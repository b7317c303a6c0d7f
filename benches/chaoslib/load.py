"""The load every scenario keeps on serve: --concurrency threads, each sending,
one after the other, a seeded mix of streaming and non-streaming
/v1/completions and /v1/chat/completions requests with real text prompts
(the server tokenizes), max_tokens 16-32, temperature 0 and ignore_eos, over
plain HTTP/1.1 (http.client, a new connection per request).

A request succeeds when it answers 200 and generates exactly max_tokens
tokens (a stream: no error event, a finish_reason, the usage chunk and
`data: [DONE]`); else its cause is kept: the HTTP status with the error's
type and message, the error event that ended a stream, a stream cut short,
or a connection error.
"""

import http.client
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass

from benchlib import split_addr

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


@dataclass
class Result:
    """What one request got."""

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


def failures(results):
    return [r for r in results if r.outcome != OK]


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


def warm_up(serve, model):
    """One request of each kind of the mix, which must succeed (the first steps are slower)."""
    rng = random.Random(12345)
    for _ in range(6):
        result = load_request(serve.http, model, rng, serve.api_key, timeout=60)
        if result.outcome != OK:
            raise RuntimeError(f"warm-up request failed: {result.cause} ({result.message})")
