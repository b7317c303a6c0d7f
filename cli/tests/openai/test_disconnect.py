"""A client that hangs up mid-stream frees its sequence: KV and running slots return to 0."""

import json
import time

from conftest import assert_serving, metric, token_ids

RUNNING = "tramontane_router_running_requests"
WAITING = "tramontane_router_waiting_requests"
KV_USED = "tramontane_router_kv_cache_used_tokens"
KV_TOTAL = "tramontane_router_kv_cache_total_tokens"
STEPS = "tramontane_router_batch_size_count"
SETTLE_S = 30.0
POLL_S = 0.2


def data_lines(response):
    """The JSON payloads of an SSE stream, until [DONE]."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                return
            yield json.loads(payload)


def wait_until_idle(read_metrics) -> dict:
    """Polls /metrics until nothing runs, waits or holds KV (a wait, not a
    timing assertion); returns the last scrape."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        samples = read_metrics()
        idle = metric(samples, RUNNING) == 0 and metric(samples, WAITING) == 0
        if idle and metric(samples, KV_USED) == 0:
            return samples
        if time.monotonic() > deadline:
            return samples
        time.sleep(POLL_S)


def test_hanging_up_mid_stream_frees_the_sequence(
    http, client, model, read_metrics, max_model_len
):
    idle = wait_until_idle(read_metrics)
    assert metric(idle, KV_USED) == 0, "KV in use before the test started"
    prompt = token_ids(8)
    # As long as the context and the KV allow: it cannot finish before we hang up.
    max_tokens = min(max_model_len, int(metric(idle, KV_TOTAL))) - len(prompt)
    assert max_tokens >= 100, (max_model_len, metric(idle, KV_TOTAL))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = data_lines(response)
        for _ in range(2):
            chunk = next(chunks)
            assert chunk["choices"][0]["finish_reason"] is None
        during = read_metrics()
        # Leaving the block closes the half-read response's connection.

    assert metric(during, RUNNING) >= 1
    # It holds the blocks of what it has filled, not its whole max_tokens.
    assert len(prompt) <= metric(during, KV_USED) < len(prompt) + max_tokens

    after = wait_until_idle(read_metrics)
    assert metric(after, KV_USED) == 0, f"KV still held {SETTLE_S} s after the hang-up"
    assert metric(after, RUNNING) == 0
    assert metric(after, WAITING) == 0
    # Counted in steps, not seconds: the sequence was dropped long before it
    # could have generated all its tokens for nobody.
    steps = metric(after, STEPS) - metric(idle, STEPS)
    assert steps < max_tokens / 2, f"{steps} steps for a stream closed after 2 chunks"

    assert_serving(client, model)


def test_a_full_stream_ends_with_done_and_frees_the_sequence(http, client, model, read_metrics):
    body = {
        "model": model,
        "prompt": token_ids(5),
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        # Blank lines separate events; lines starting with ":" are comments.
        lines = [
            line
            for line in response.iter_lines()
            if line.strip() and not line.startswith(":")
        ]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines), lines

    after = wait_until_idle(read_metrics)
    assert metric(after, KV_USED) == 0
    assert metric(after, RUNNING) == 0
