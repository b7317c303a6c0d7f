"""HTTP serving against the in-process decode, end to end on this machine.

In one run, on the same checkpoint, fp32:
(a) `tramontane bench-forward --rows decode-32`: greedy decode at batch 32 in
    process, after a prompt of --input-len tokens, for --output-len steps;
(b) `tramontane serve --workers W` on free loopback ports, loaded by
    serving_load.py (streaming /v1/completions, random token-id prompts of
    --input-len, --output-len tokens each with ignore_eos) at concurrency 1, 8
    and 32, one level after the other; then the server is stopped.
Prints requests/s, output tokens/s, TTFT and ITL p50/p90/p99 per level, and
output tokens/s at concurrency 32 over the in-process batch-32 decode rate
(target >= 0.8). The served rate includes the prompts' prefill, which (a) does
not time, so the decode-phase rate 32 / TPOT p50 is printed beside it.

Usage: python benches/serving_vs_local.py --model DIR --bin target/release/tramontane [--threads 2]
           [--workers 2] [--num-requests 64] [--input-len 128] [--output-len 64] [--json [PATH]]
`--json` prints the whole result as JSON instead of the table; `--json PATH` writes it there as well.
"""

import argparse
import json
import os
import shlex
import sys
import time

import serving_load  # beside this file, which Python puts on sys.path
from benchlib import Column, StartError, fmt, print_table, run_json, start, wait_healthy


def bench_decode(args) -> dict:
    """In-process batch-32 decode over the same context lengths as the served requests."""
    return run_json(
        [args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
         "--rows", "decode-32", "--repeats", str(args.repeats), "--decode-prompt", str(args.input_len),
         "--decode-steps", str(args.output_len)])["rows"][0]


def start_server(args):
    """Starts `tramontane serve`; returns it and its HTTP address once GET /health answers 200."""
    # Its own session, so that a last-resort kill reaches its workers too.
    server = start([args.bin, "serve", "--model", args.model, "--workers", str(args.workers),
                    "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--threads", str(args.threads),
                    *shlex.split(args.server_args)], new_session=True)
    deadline = time.monotonic() + args.start_timeout
    try:
        addr = server.listening("tramontane http", args.start_timeout)
        wait_healthy(addr, deadline - time.monotonic(), server, request_timeout=5.0)
    except StartError as error:
        stop_server(server)
        raise SystemExit(f"tramontane serve did not start: {error}")
    return server, addr


def stop_server(server) -> None:
    server.stop(grace_s=30)  # serve stops its workers itself on SIGTERM


def requests_at(concurrency: int, num_requests: int) -> int:
    """Fewer requests at concurrency 1, where each one runs alone."""
    return num_requests if concurrency > 1 else min(num_requests, max(8, num_requests // 8))


# The latencies in ms; the last column only says so on the head line.
LEVEL_COLUMNS = [Column("concurrency", 11), Column("requests", 8), Column("failed", 6), Column("req/s", 7),
                 Column("out tok/s", 9), Column("TTFT p50", 9), Column("p90", 8), Column("p99", 8),
                 Column("ITL p50", 8), Column("p90", 7), Column("p99", 7), Column("(ms)", 5)]


def level_row(s: dict) -> list:
    ttft, itl = s["ttft_ms"], s["itl_ms"]
    return [str(s["concurrency"]), str(s["num_requests"]), str(s["failed"]), f"{s['request_per_s']:.2f}",
            f"{s['output_tokens_per_s']:.1f}", fmt(ttft["p50"], ".1f"), fmt(ttft["p90"], ".1f"),
            fmt(ttft["p99"], ".1f"), fmt(itl["p50"], ".1f"), fmt(itl["p90"], ".1f"), fmt(itl["p99"], ".1f"), ""]


def print_summary(result: dict) -> None:
    decode = result["in_process_decode_32"]
    print(f"fp32, {result['model']}; prompts of {result['input_len']} tokens, {result['output_len']} output tokens")
    print(f"in-process decode batch 32 (bench-forward --threads {result['threads']}): "
          f"{decode['tokens_per_s']:.1f} tok/s")
    print(f"served: tramontane serve --workers {result['workers']} --threads {result['threads']} {result['server_args']}".rstrip())
    print_table(LEVEL_COLUMNS, [level_row(s) for s in result["levels"]])
    if result["ratio_32"] is not None:
        print(f"output tok/s at concurrency 32 / in-process decode batch 32: {result['ratio_32']:.2f} (target >= 0.8)")
    if result["decode_phase_ratio_32"] is not None:
        print(f"decode phase at concurrency 32, 32 / TPOT p50: {result['decode_phase_tok_s_32']:.1f} tok/s "
              f"({result['decode_phase_ratio_32']:.2f}x in-process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2, help="threads of the in-process bench-forward and of the router (workers: the default share)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64, help="per level (at concurrency 1: max(8, N/8))")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of bench-forward")
    parser.add_argument("--server-args", default="", help="more flags for tramontane serve, e.g. '--max-running 32'")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the server to be healthy")
    parser.add_argument("--json", nargs="?", const="-", help="print JSON instead of the table; with PATH, write it there")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    config = json.load(open(os.path.join(args.model, "config.json")))
    print("in-process decode, batch 32 ...", file=sys.stderr)
    decode = bench_decode(args)
    print(f"  {decode['tokens_per_s']:.1f} tok/s", file=sys.stderr)

    summaries = []
    print("starting tramontane serve ...", file=sys.stderr)
    server, addr = start_server(args)
    try:
        for concurrency in levels:
            count = requests_at(concurrency, args.num_requests)
            print(f"concurrency {concurrency}: {count} requests ...", file=sys.stderr)
            try:
                summary = serving_load.run(f"http://{addr}", None, count, concurrency=concurrency,
                                           input_len=args.input_len, output_len=args.output_len,
                                           seed=args.seed, vocab=config["vocab_size"])
            except RuntimeError as error:  # the warm-up request failed: the server is not serving
                raise SystemExit(f"concurrency {concurrency}: {error}")
            print(f"  {summary['output_tokens_per_s']:.1f} output tok/s, {summary['failed']} failed",
                  file=sys.stderr)
            summaries.append(summary)
    finally:
        stop_server(server)

    at_32 = next((s for s in summaries if s["concurrency"] == 32 and s["completed"]), None)
    tpot_32 = at_32["tpot_ms"]["p50"] if at_32 else None
    decode_phase = 32 / (tpot_32 / 1e3) if tpot_32 else None
    result = {
        "model": args.model, "threads": args.threads, "workers": args.workers, "server_args": args.server_args,
        "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
        "in_process_decode_32": decode,
        "levels": summaries,
        "ratio_32": at_32["output_tokens_per_s"] / decode["tokens_per_s"] if at_32 else None,
        "decode_phase_tok_s_32": decode_phase,
        "decode_phase_ratio_32": decode_phase / decode["tokens_per_s"] if decode_phase else None,
    }
    if args.json == "-":
        print(json.dumps(result))
        return
    print_summary(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
