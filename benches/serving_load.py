"""Load generator for the OpenAI-compatible HTTP API, after vLLM's benchmark_serving.py.

Sends N streaming POST /v1/completions requests whose prompts are lists of
random token ids (a numpy Generator seeded with --seed, ids in [3, vocab)),
each with max_tokens O, temperature 0 and ignore_eos, so that every request
generates exactly O tokens. Requests go either C at a time (--concurrency) or
as a Poisson process of R requests/s drawn from the same seed (--rate).

Per request it measures
- TTFT: from sending the request to the first chunk that carries a token;
- ITL: the gaps between successive token-carrying chunks (a chunk counts as
  one token even when its text is empty, as while a UTF-8 character is
  incomplete);
- E2E: from sending the request to the end of its stream;
and reports the duration, completed and failed requests, requests/s, output
tokens/s (usage.completion_tokens of the completed requests over the
duration), and the p50/p90/p99 of TTFT, ITL, TPOT and E2E in ms. A failed
request (HTTP error, broken stream) is counted, and each distinct error
message is printed once on stderr.

Usage: python benches/serving_load.py --url http://127.0.0.1:PORT [--model NAME]
           (--concurrency C | --rate R) [--num-requests 64] [--input-len 128]
           [--output-len 64] [--seed 0] [--vocab 32000] [--json]
Without --model, the first model of GET /v1/models is used. As a library:
`run(url, model, num_requests, ...)` returns the summary dict printed by --json.
"""

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import openai

from benchlib import Column, fmt, print_table  # beside this file, which Python puts on sys.path


@dataclass
class RequestResult:
    """One request; times in seconds from sending it."""

    error: str = ""  # empty when the request completed
    ttft: float = 0.0
    itls: list = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0


def make_prompts(rng: np.random.Generator, count: int, length: int, vocab: int) -> list:
    """`count` prompts of `length` token ids in [3, vocab), skipping the special tokens 0..3."""
    return rng.integers(3, vocab, size=(count, length)).tolist()


def poisson_arrivals(rng: np.random.Generator, count: int, rate: float) -> list:
    """Send times (s from the start) of `count` requests arriving as a Poisson process; the first at 0."""
    gaps = rng.exponential(1.0 / rate, size=count)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


def carries_token(chunk) -> bool:
    """A chunk with a choice carries one token, unless it only closes the stream (no text, a finish_reason)."""
    if not chunk.choices:
        return False  # the usage chunk
    choice = chunk.choices[0]
    return bool(choice.text) or choice.finish_reason is None


def describe(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        return f"HTTP {error.status_code}: {body.get('message', error)}"
    return f"{type(error).__name__}: {error}"


async def send_request(client: openai.AsyncOpenAI, model: str, prompt: list, output_len: int,
                       extra_body=None) -> RequestResult:
    result = RequestResult()
    chunks = 0  # token-carrying chunks
    usage_tokens = None
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(extra_body or {})})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            if not carries_token(chunk):
                continue
            if chunks == 0:
                result.ttft = now - start
            else:
                result.itls.append(now - last)
            chunks += 1
            last = now
        result.e2e = time.perf_counter() - start
    # Not only openai.APIError: a stream broken mid-way raises the transport's own errors.
    except Exception as error:  # noqa: BLE001
        result.error = describe(error)
        return result
    if chunks == 0:
        result.error = "the stream ended without a token"
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return result


def percentiles(values: list) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(np.mean(values)), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list, duration: float) -> dict:
    done = [r for r in results if not r.error]
    errors = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors,
        "request_per_s": len(done) / duration,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration,
        "ttft_ms": percentiles([r.ttft * 1e3 for r in done]),
        "itl_ms": percentiles([gap * 1e3 for r in done for gap in r.itls]),
        # Time per output token after the first, per request.
        "tpot_ms": percentiles([(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
        "e2e_ms": percentiles([r.e2e * 1e3 for r in done]),
    }


async def run_async(url, model, prompts, output_len, concurrency=None, arrivals=None, warmup_prompts=(),
                    timeout=600.0, extra_body=None) -> dict:
    """Sends `prompts` `concurrency` at a time, or each at its time in `arrivals`, with `extra_body`'s fields in
    each request; returns the summary."""
    # No retries: a 429 is a failed request here, not a hidden wait.
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="EMPTY", max_retries=0, timeout=timeout)
    try:
        if model is None:
            model = (await client.models.list()).data[0].id
        for prompt in warmup_prompts:
            result = await send_request(client, model, prompt, min(output_len, 4))
            if result.error:
                raise RuntimeError(f"warm-up request failed: {result.error}")

        results = [None] * len(prompts)
        seen_errors = set()

        async def send(index):
            result = await send_request(client, model, prompts[index], output_len, extra_body)
            if result.error and result.error not in seen_errors:
                seen_errors.add(result.error)
                print(f"request failed: {result.error}", file=sys.stderr)
            results[index] = result

        start = time.perf_counter()
        if concurrency is not None:
            indices = iter(range(len(prompts)))  # shared: each sender takes the next request

            async def sender():
                for index in indices:
                    await send(index)

            await asyncio.gather(*(sender() for _ in range(concurrency)))
        else:
            async def send_at(index, at):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
                await send(index)

            await asyncio.gather(*(send_at(i, at) for i, at in enumerate(arrivals)))
        duration = time.perf_counter() - start
    finally:
        await client.close()
    summary = summarize(results, duration)
    summary["model"] = model
    return summary


def run(url, model=None, num_requests=64, concurrency=None, rate=None, input_len=128, output_len=64, seed=0,
        vocab=32000, warmup=1, timeout=600.0) -> dict:
    """The whole benchmark: prompts and arrivals from `seed`, `warmup` untimed requests, then the timed ones."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give one of concurrency and rate")
    rng = np.random.default_rng(seed)
    prompts = make_prompts(rng, num_requests, input_len, vocab)
    arrivals = poisson_arrivals(rng, num_requests, rate) if rate is not None else None
    warmup_prompts = make_prompts(rng, warmup, input_len, vocab)
    summary = asyncio.run(run_async(url, model, prompts, output_len, concurrency, arrivals, warmup_prompts, timeout))
    return {"url": url, "num_requests": num_requests, "concurrency": concurrency, "rate": rate,
            "input_len": input_len, "output_len": output_len, "seed": seed, **summary}


def print_summary(s: dict) -> None:
    load = f"concurrency {s['concurrency']}" if s["concurrency"] is not None else f"Poisson rate {s['rate']} req/s"
    print(f"{s['model']} at {s['url']}: {s['num_requests']} requests, {load}, "
          f"{s['input_len']} prompt tokens, {s['output_len']} output tokens")
    print(f"duration            {s['duration_s']:10.2f} s")
    print(f"completed / failed  {s['completed']:10d} / {s['failed']}")
    print(f"requests/s          {s['request_per_s']:10.2f}")
    print(f"output tokens/s     {s['output_tokens_per_s']:10.1f}")
    stats = ("mean", "p50", "p90", "p99")
    print_table([Column("(ms)", 18, "<")] + [Column(stat, 10) for stat in stats],
                [[name.upper()] + [fmt(s[f"{name}_ms"][stat], ".1f") for stat in stats]
                 for name in ("ttft", "itl", "tpot", "e2e")], sep="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="served model name (default: the first of GET /v1/models)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="requests in flight at once")
    load.add_argument("--rate", type=float, help="requests/s, Poisson arrivals")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens per request (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn from [3, vocab)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests sent first, one at a time")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one read")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    if args.concurrency is not None and args.concurrency < 1 or args.rate is not None and args.rate <= 0:
        parser.error("--concurrency must be at least 1 and --rate above 0")
    if min(args.num_requests, args.input_len, args.output_len) < 1 or args.vocab <= 3:
        parser.error("--num-requests, --input-len and --output-len must be at least 1, --vocab above 3")

    try:
        summary = run(args.url, args.model, args.num_requests, args.concurrency, args.rate, args.input_len,
                      args.output_len, args.seed, args.vocab, args.warmup, args.timeout)
    except (RuntimeError, openai.APIError) as error:
        raise SystemExit(f"serving_load: {error}")
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)


if __name__ == "__main__":
    main()
