"""Scenario 5's inputs: seeded-random malformed requests, each invalid by
construction (wrong types, missing fields, out-of-range / huge / NaN-like
numbers, nested garbage, invalid UTF-8, truncated JSON, wrong content
types, stop lists over the cap, more than 64 prompts, bodies over 1 MiB,
...), requests without the API key or with a wrong one, and raw garbage for
the gRPC (HTTP/2) ports; sending them and what came back.
"""

import http.client
import json
import random
import socket
import struct
import time

from benchlib import split_addr
from chaoslib.load import FAILED, PROMPTS, Result, error_of

class Case:
    """One request to send: what is wrong with it, where it goes, and the statuses it should get."""

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
    """`count` seeded malformed requests, then six sent without the key, with a wrong one, with another scheme."""
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


def send_case(addr, case, api_key):
    """(Result, response headers) of one case; the headers are None when it got no answer."""
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
