"""The planner's predictions against the real cluster, on this machine.

1. `tramontane profile` measures the model here (dense step, one expert's
   FFN, a worker's round trip), once.
2. Uniform routing: for every worker count W and concurrency C,
   `tramontane plan --gpus W --concurrency C --placement-policy round-robin`
   predicts throughput and latencies; `tramontane serve --workers W` (default
   placement) runs the same load from serving_load.py (streaming
   /v1/completions, random token-id prompts, ignore_eos).
3. Skewed routing (with --skewed-model, e.g. `gen-model --expert-skew 1`): a
   routing trace is recorded on the skewed model, then for every W in
   --skew-workers the plan's EPLB placement and the default placement are
   both predicted and measured.

Prints predicted against measured output tokens/s and inter-token latency
p50 per configuration, the median absolute errors, and under skew the
measured throughput of the planned placement over the default one.

Usage: python benches/plan_vs_measured.py --bin target/release/tramontane --model DIR
           [--skewed-model DIR] [--workers 1,2,4] [--concurrency 1,8,32] [--skew-workers 2,4]
           [--input-len 128] [--output-len 64] [--threads 2] [--json PATH]
"""

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import serving_load  # beside this file, which Python puts on sys.path
import serving_vs_local
from benchlib import Column, print_table, run_json


def requests_at(concurrency: int, args) -> int:
    """Enough requests for a few waves of the closed loop, few where each runs alone."""
    return max(args.min_requests, args.waves * concurrency)


def plan(args, model, workers, concurrency, requests, extra) -> dict:
    command = [args.bin, "plan", "--model", model, "--profile", args.profile_path, "--gpus", str(workers),
               "--concurrency", str(concurrency), "--requests", str(requests),
               "--prompt-len", str(args.input_len), "--output-len", str(args.output_len), "--dtype", "f32",
               "--json", *extra]
    chosen = run_json(command)
    p = next(p for p in chosen["plans"] if p["workers"] == workers)
    return {"output_tokens_per_s": p["prediction"]["output_tokens_per_s"],
            "itl_p50_ms": p["prediction"]["itl"]["p50"] * 1e3,
            "ttft_p50_ms": p["prediction"]["ttft"]["p50"] * 1e3,
            "balancedness": statistics.mean(p["balancedness"]),
            "placement_name": p["placement_name"],
            "placement": p["placement"]}


def measure(args, model, workers, levels, server_args="") -> dict:
    """Serves `model` on `workers` workers and runs each (concurrency, requests) level."""
    config = json.load(open(os.path.join(model, "config.json")))
    options = argparse.Namespace(bin=args.bin, model=model, workers=workers, threads=args.threads,
                                 server_args=server_args, start_timeout=args.start_timeout)
    results = {}
    serve, addr = serving_vs_local.start_server(options)
    try:
        for concurrency, requests in levels:
            print(f"  measuring W={workers} C={concurrency} ({requests} requests) ...", file=sys.stderr)
            s = serving_load.run(f"http://{addr}", None, requests, concurrency=concurrency,
                                 input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                                 vocab=config["vocab_size"])
            if s["failed"]:
                raise SystemExit(f"W={workers} C={concurrency}: {s['failed']} requests failed")
            results[concurrency] = {"output_tokens_per_s": s["output_tokens_per_s"],
                                    "itl_p50_ms": s["itl_ms"]["p50"], "ttft_p50_ms": s["ttft_ms"]["p50"]}
    finally:
        serving_vs_local.stop_server(serve)
    return results


def record_trace(args, path) -> None:
    """Serves the skewed model with --record-routing under a short load."""
    print("recording a routing trace on the skewed model ...", file=sys.stderr)
    measure(args, args.skewed_model, 2, [(8, 16)], f"--record-routing {shlex.quote(path)}")


def error(predicted, measured) -> float:
    return (predicted - measured) / measured


def row(name, workers, concurrency, predicted, measured) -> dict:
    return {"config": name, "workers": workers, "concurrency": concurrency, "predicted": predicted,
            "measured": measured,
            "throughput_error": error(predicted["output_tokens_per_s"], measured["output_tokens_per_s"]),
            "itl_p50_error": error(predicted["itl_p50_ms"], measured["itl_p50_ms"])}


ROW_COLUMNS = [Column("config", 22, "<"), Column("W", 2), Column("C", 3), Column("pred tok/s", 10),
               Column("meas tok/s", 10), Column("err", 7), Column("pred ITL p50", 12), Column("meas ITL p50", 12),
               Column("err", 7)]


def table_row(r) -> list:
    p, m = r["predicted"], r["measured"]
    return [r["config"], str(r["workers"]), str(r["concurrency"]), f"{p['output_tokens_per_s']:.1f}",
            f"{m['output_tokens_per_s']:.1f}", f"{r['throughput_error']:+.1%}", f"{p['itl_p50_ms']:.1f}",
            f"{m['itl_p50_ms']:.1f}", f"{r['itl_p50_error']:+.1%}"]


def print_summary(result) -> None:
    print(f"{result['model']}: prompts {result['input_len']} tokens, outputs {result['output_len']} tokens, "
          f"router --threads {result['threads']}; profile {result['profile']}")
    print_table(ROW_COLUMNS, [table_row(r) for r in result["rows"]])
    print(f"median |error|: throughput {result['median_abs_throughput_error']:.1%} (target <= 10%), "
          f"ITL p50 {result['median_abs_itl_p50_error']:.1%} (target <= 15%)")
    for s in result["skew"]:
        print(f"skewed, W={s['workers']} C={s['concurrency']}: planned placement ({s['planned_placement']}) {s['planned_tok_s']:.1f} tok/s "
              f"against default {s['default_tok_s']:.1f} tok/s measured ({s['gain']:.2f}x; predicted "
              f"{s['predicted_gain']:.2f}x); balancedness {s['balancedness_default']:.2f} -> {s['balancedness_planned']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True, help="checkpoint with the model's own routing")
    parser.add_argument("--skewed-model", help="the same shape with skewed routing (gen-model --expert-skew)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--skew-workers", default="2,4")
    parser.add_argument("--skew-concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--waves", type=int, default=2, help="requests per level: waves x concurrency ...")
    parser.add_argument("--min-requests", type=int, default=4, help="... and at least this many")
    parser.add_argument("--threads", type=int, default=2, help="threads of the router (and of the profile's dense part)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="use this profile instead of measuring one")
    parser.add_argument("--profile-repeats", type=int, default=8)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    levels = [int(c) for c in args.concurrency.split(",") if c]

    with tempfile.TemporaryDirectory() as work:
        args.profile_path = args.profile or os.path.join(work, "profile.json")
        if not args.profile:
            print("profiling ...", file=sys.stderr)
            subprocess.run([args.bin, "profile", "--model", args.model, "--out", args.profile_path,
                            "--threads", str(args.threads), "--repeats", str(args.profile_repeats)], check=True)
        rows = []
        for workers in worker_counts:
            plan_levels = [(c, requests_at(c, args)) for c in levels]
            measured = measure(args, args.model, workers, plan_levels)
            for concurrency, requests in plan_levels:
                predicted = plan(args, args.model, workers, concurrency, requests,
                                 ["--placement-policy", "round-robin"])
                rows.append(row("uniform", workers, concurrency, predicted, measured[concurrency]))
        skew = []
        if args.skewed_model:
            trace = os.path.join(work, "routing.jsonl")
            record_trace(args, trace)
            concurrency = args.skew_concurrency
            requests = requests_at(concurrency, args)
            for workers in [int(w) for w in args.skew_workers.split(",") if w]:
                default = plan(args, args.skewed_model, workers, concurrency, requests,
                               ["--routing-trace", trace, "--placement-policy", "round-robin"])
                planned = plan(args, args.skewed_model, workers, concurrency, requests,
                               ["--routing-trace", trace, "--placement-policy", "eplb"])
                placement_path = os.path.join(work, f"placement-{workers}.json")
                with open(placement_path, "w") as out:
                    json.dump(planned["placement"], out)
                measured_default = measure(args, args.skewed_model, workers, [(concurrency, requests)])[concurrency]
                measured_planned = measure(args, args.skewed_model, workers, [(concurrency, requests)],
                                           f"--placement {shlex.quote(placement_path)}")[concurrency]
                rows.append(row("skewed, default", workers, concurrency, default, measured_default))
                rows.append(row("skewed, planned", workers, concurrency, planned, measured_planned))
                skew.append({"workers": workers, "concurrency": concurrency,
                             "default_tok_s": measured_default["output_tokens_per_s"],
                             "planned_tok_s": measured_planned["output_tokens_per_s"],
                             "gain": measured_planned["output_tokens_per_s"] / measured_default["output_tokens_per_s"],
                             "predicted_gain": planned["output_tokens_per_s"] / default["output_tokens_per_s"],
                             "balancedness_default": default["balancedness"],
                             "balancedness_planned": planned["balancedness"],
                             "planned_placement": planned["placement_name"]})
        profile = json.load(open(args.profile_path))
    for r in rows:
        for side in ("predicted", "measured"):
            r[side].pop("placement", None)
            r[side].pop("placement_name", None)
            if not all(math.isfinite(v) for v in r[side].values() if isinstance(v, float)):
                raise SystemExit(f"non-finite figure in {r}")
    result = {"model": args.model, "skewed_model": args.skewed_model, "input_len": args.input_len,
              "output_len": args.output_len, "threads": args.threads, "profile": profile["device"],
              "rows": rows, "skew": skew,
              "median_abs_throughput_error": statistics.median(abs(r["throughput_error"]) for r in rows),
              "median_abs_itl_p50_error": statistics.median(abs(r["itl_p50_error"]) for r in rows)}
    print_summary(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
