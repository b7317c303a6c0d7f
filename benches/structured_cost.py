"""What structured outputs cost at batch 32: decode steps of 32 concurrent
requests constrained by a JSON schema, against the same requests
unconstrained, on one server, in alternating rounds (the host's speed drifts
within minutes; each round's ratio is taken within the round).

`serve --workers W` on the checkpoint in its dtype (--dtype). Each round
sends --requests streaming /v1/completions at concurrency --concurrency,
prompts of --input-len random token ids, --output-len tokens each
(ignore_eos), once plain and once under a JSON schema that cannot be
complete before --output-len tokens (an array of at least 64 small objects
with a string each: the string's masks allow most of the vocabulary, the
costly case). The step time is the server's mean forward-step duration
(tramontane_router_step_duration) over the round's decode steps: each round
also sends its requests with max_tokens 1, and those steps (prefill and first
token) are subtracted. The clients' time per output token is shown beside it.
Target: the constrained step time at most 1.10x the plain one.

Usage: python benches/structured_cost.py --model DIR --bin target/release/tramontane
           [--threads 2] [--workers 2] [--dtype bf16] [--rounds 3] [--requests 32] [--concurrency 32]
           [--input-len 64] [--output-len 64]
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import urllib.request
from types import SimpleNamespace

import numpy as np

import serving_load  # beside this file, which Python puts on sys.path
from benchlib import Column, fmt, parse_samples, print_table, sample_sum
from serving_vs_local import start_server, stop_server

SCHEMA = {
    "type": "object",
    "properties": {
        "events": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {"at": {"type": "integer"}, "note": {"type": "string", "maxLength": 40}},
                "required": ["at", "note"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["events"],
    "additionalProperties": False,
}

STEP = "tramontane_router_step_duration_seconds"


def step_totals(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        samples = parse_samples(response.read().decode())
    return sample_sum(samples, f"{STEP}_sum"), sample_sum(samples, f"{STEP}_count")


async def measured(url, addr, prompts, args, extra_body):
    """The requests whole, then again with max_tokens 1 (their prefill and first token only): the decode steps'
    time is the difference of the two phases' step-duration sums and counts."""
    before = step_totals(addr)
    whole = await serving_load.run_async(url, None, prompts, args.output_len, concurrency=args.concurrency,
                                         extra_body=extra_body)
    after = step_totals(addr)
    prefill = await serving_load.run_async(url, None, prompts, 1, concurrency=args.concurrency,
                                           extra_body=extra_body)
    after_prefill = step_totals(addr)
    for summary in (whole, prefill):
        if summary["failed"]:
            raise SystemExit(f"{summary['failed']} requests failed: {summary['errors']}")
    decode_sum = (after[0] - before[0]) - (after_prefill[0] - after[0])
    decode_count = (after[1] - before[1]) - (after_prefill[1] - after[1])
    return {
        "step_ms": 1e3 * decode_sum / decode_count if decode_count > 0 else float("nan"),
        "steps": decode_count,
        "tpot_ms": whole["tpot_ms"]["p50"],
        "tokens_per_s": whole["output_tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args()

    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    rng = np.random.default_rng(args.seed)
    server_args = " ".join(["--dtype", args.dtype, "--no-prefix-caching"])
    server, addr = start_server(SimpleNamespace(**vars(args), server_args=server_args))
    url = f"http://{addr}"
    rows, ratios = [], []
    constrained = {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "log", "schema": SCHEMA, "strict": True}}}
    try:
        warmup = serving_load.make_prompts(rng, 1, args.input_len, vocab)
        asyncio.run(serving_load.run_async(url, None, warmup, 4, concurrency=1, extra_body=constrained))
        for round_ in range(args.rounds):
            prompts = serving_load.make_prompts(rng, args.requests, args.input_len, vocab)
            print(f"round {round_ + 1}/{args.rounds} ...", file=sys.stderr)
            plain = asyncio.run(measured(url, addr, prompts, args, None))
            guided = asyncio.run(measured(url, addr, prompts, args, constrained))
            ratio = guided["step_ms"] / plain["step_ms"]
            ratios.append(ratio)
            for name, r in (("plain", plain), ("json_schema", guided)):
                rows.append([str(round_ + 1), name, fmt(r["step_ms"], ".1f"), str(int(r["steps"])),
                             fmt(r["tpot_ms"], ".1f"), fmt(r["tokens_per_s"], ".1f"),
                             f"{ratio:.3f}" if name == "json_schema" else ""])
    finally:
        stop_server(server)
    print(f"{args.model}, {args.dtype}, {args.workers} workers, {args.threads} threads; {args.requests} requests at "
          f"concurrency {args.concurrency}, {args.input_len}-token prompts, {args.output_len} tokens each")
    print_table([Column("round"), Column("requests", align="<"), Column("decode step ms"), Column("steps"),
                 Column("TPOT p50 ms"), Column("out tok/s"), Column("step ratio")], rows)
    print(f"constrained / plain decode step time: median {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.3f} to {max(ratios):.3f}; target at most 1.10x)")


if __name__ == "__main__":
    main()
