"""Prefix caching end to end: requests sharing a long prefix, with the cache
and without it (`serve --no-prefix-caching`), in the same run.

`serve --workers W` on the checkpoint, in its dtype (--dtype), loaded with
--requests requests at concurrency --concurrency (streaming
/v1/completions), each a shared prefix of --prefix-len random token ids
followed by --suffix-len of its own, --output-len tokens generated
(ignore_eos). One untimed request with the same prefix (and another suffix)
warms each server first: the prefix is what earlier traffic left cached, as
a common system prompt is. Prints TTFT and output tokens/s of both, and the
ratios (targets: TTFT p50 at least 5x lower, throughput at least 2x), and
the prefix-cache hit rate the server's metrics give.

Usage: python benches/prefix_share.py --model DIR --bin target/release/tramontane
           [--threads 2] [--workers 2] [--dtype bf16] [--requests 32] [--concurrency 32]
           [--prefix-len 1024] [--suffix-len 64] [--output-len 16]
"""

import argparse
import asyncio
import json
import os
import sys
import urllib.request
from types import SimpleNamespace

import numpy as np

import serving_load  # beside this file, which Python puts on sys.path
from benchlib import Column, fmt, parse_samples, print_table, sample_sum
from serving_vs_local import start_server, stop_server


def prefix_metrics(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        samples = parse_samples(response.read().decode())
    return (sample_sum(samples, "tramontane_router_prefix_cache_queries_tokens_total"),
            sample_sum(samples, "tramontane_router_prefix_cache_hits_tokens_total"))


def run(args, extra, prompts, warmup):
    server_args = " ".join(["--dtype", args.dtype, *extra])
    server, addr = start_server(SimpleNamespace(**vars(args), server_args=server_args))
    url = f"http://{addr}"
    try:
        asyncio.run(serving_load.run_async(url, None, [warmup], args.output_len, concurrency=1))
        before = prefix_metrics(addr)
        summary = asyncio.run(serving_load.run_async(url, None, prompts, args.output_len,
                                                     concurrency=args.concurrency))
        after = prefix_metrics(addr)
    finally:
        stop_server(server)
    queries, hits = (a - b for a, b in zip(after, before))
    summary["hit_rate"] = hits / queries if queries else 0.0
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args()

    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    rng = np.random.default_rng(args.seed)
    prefix = serving_load.make_prompts(rng, 1, args.prefix_len, vocab)[0]
    suffixes = serving_load.make_prompts(rng, args.requests + 1, args.suffix_len, vocab)
    prompts = [prefix + suffix for suffix in suffixes[1:]]
    warmup = prefix + suffixes[0]

    results = {}
    for name, extra in [("cached", []), ("no cache", ["--no-prefix-caching"])]:
        print(f"{name}: {args.requests} requests at concurrency {args.concurrency} ...", file=sys.stderr)
        results[name] = run(args, extra, prompts, warmup)
        failed = results[name]["failed"]
        if failed:
            raise SystemExit(f"{name}: {failed} requests failed: {results[name]['errors']}")

    print(f"{args.model}, {args.dtype}, {args.workers} workers, {args.threads} threads; {args.requests} requests "
          f"at concurrency {args.concurrency}: a shared {args.prefix_len}-token prefix, {args.suffix_len} tokens "
          f"each, {args.output_len} generated")
    rows = [[name, fmt(s["ttft_ms"]["p50"], ".0f"), fmt(s["ttft_ms"]["p90"], ".0f"),
             fmt(s["output_tokens_per_s"], ".1f"), fmt(s["request_per_s"], ".2f"), fmt(s["hit_rate"], ".3f")]
            for name, s in results.items()]
    print_table([Column("", align="<"), Column("TTFT p50 ms"), Column("TTFT p90 ms"), Column("output tok/s"),
                 Column("requests/s"), Column("hit rate")], rows)
    cached, plain = results["cached"], results["no cache"]
    print(f"TTFT p50: {plain['ttft_ms']['p50'] / cached['ttft_ms']['p50']:.1f}x lower with the cache (target 5x); "
          f"throughput: {cached['output_tokens_per_s'] / plain['output_tokens_per_s']:.2f}x (target 2x)")


if __name__ == "__main__":
    main()
