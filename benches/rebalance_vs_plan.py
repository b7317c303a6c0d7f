"""Online rebalancing against the best placement `plan` finds offline, on a
skewed checkpoint (`gen-model --expert-skew 1`: the hottest experts all on
worker 0 under the default placement).

For every worker count W (--workers, default 2,4), each served by
`tramontane serve --workers W` on this machine under the same closed-loop
load (serving_load.py: --concurrency clients, random token-id prompts,
ignore_eos), in batches from the moment the skewed load starts:

- planned: the placement `tramontane plan` computes offline (EPLB over a
  routing trace recorded on the same checkpoint, --spare-slots 1);
- rebalanced: the default placement, and the router rebalancing on its own
  (--rebalance-interval, --spare-slots, 1 by default);
- default: the default placement, never rebalanced.

Each figure is the output tokens/s of the batches that start between
--from-s and --until-s (15 and 30 s) after the load starts: what the
rebalanced cluster reaches within 30 s of the skew starting, against what
the others do over the same span; with --rounds R the three run R times in
turn and each figure is the median. Target: rebalanced >= 0.9x planned.

Usage: python benches/rebalance_vs_plan.py --bin target/release/tramontane --model DIR
           [--workers 2,4] [--concurrency 16] [--input-len 64] [--output-len 32] [--threads 1]
           [--rebalance-interval 5] [--spare-slots 1] [--rounds 1] [--json PATH]
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import serving_load  # beside this file, which Python puts on sys.path
import serving_vs_local
from benchlib import Column, print_table, run_json


def serve(args, workers, server_args):
    options = argparse.Namespace(bin=args.bin, model=args.model, workers=workers, threads=args.threads,
                                 server_args=server_args, start_timeout=args.start_timeout)
    return serving_vs_local.start_server(options)


def batches(args, addr, vocab, seed):
    """Closed-loop batches of --concurrency requests from now until --until-s: (start s, end s,
    output tokens, failed) each."""
    began = time.monotonic()
    out = []
    batch = 0
    while time.monotonic() - began < args.until_s:
        start = time.monotonic() - began
        s = serving_load.run(f"http://{addr}", None, args.concurrency, concurrency=args.concurrency,
                             input_len=args.input_len, output_len=args.output_len, seed=seed + batch,
                             vocab=vocab, warmup=0)
        out.append((start, time.monotonic() - began, s["completed"] * args.output_len, s["failed"]))
        batch += 1
    return out


def window_rate(runs, args):
    """Output tokens/s over the batches that started in [--from-s, --until-s)."""
    chosen = [r for r in runs if args.from_s <= r[0] < args.until_s]
    if not chosen:
        return None
    return sum(r[2] for r in chosen) / sum(r[1] - r[0] for r in chosen)


def measured(args, workers, server_args, vocab, name):
    print(f"  W={workers} {name} ...", file=sys.stderr)
    server, addr = serve(args, workers, server_args)
    try:
        runs = batches(args, addr, vocab, args.seed)
    finally:
        serving_vs_local.stop_server(server)
    failed = sum(r[3] for r in runs)
    if failed:
        raise SystemExit(f"W={workers} {name}: {failed} requests failed")
    return {"tokens_per_s": window_rate(runs, args), "batches": runs}


def record_trace(args, path, vocab):
    print("recording a routing trace on the skewed checkpoint ...", file=sys.stderr)
    server, addr = serve(args, 2, f"--record-routing {shlex.quote(path)}")
    try:
        serving_load.run(f"http://{addr}", None, 2 * args.concurrency, concurrency=args.concurrency,
                         input_len=args.input_len, output_len=args.output_len, seed=args.seed + 999,
                         vocab=vocab)
    finally:
        serving_vs_local.stop_server(server)


def planned_placement(args, workers, trace, out):
    plan = run_json([args.bin, "plan", "--model", args.model, "--profile", "h100", "--gpus", str(workers),
                     "--concurrency", str(args.concurrency), "--prompt-len", str(args.input_len),
                     "--output-len", str(args.output_len), "--routing-trace", trace,
                     "--placement-policy", "eplb", "--spare-slots", "1", "--json"])
    chosen = next(p for p in plan["plans"] if p["workers"] == workers)
    with open(out, "w") as f:
        json.dump(chosen["placement"], f)


COLUMNS = [Column("W", 2), Column("planned tok/s", 13), Column("rebalanced tok/s", 16),
           Column("default tok/s", 13), Column("rebalanced/planned", 18), Column("default/planned", 15)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", required=True, help="a skewed checkpoint (gen-model --expert-skew 1)")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the router's threads (each worker has 1)")
    parser.add_argument("--rebalance-interval", type=int, default=5)
    parser.add_argument("--spare-slots", type=int, default=1, help="the rebalanced cluster's (the plan has 1)")
    parser.add_argument("--from-s", type=float, default=15.0)
    parser.add_argument("--until-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args()
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        trace = os.path.join(work, "routing.bin")
        record_trace(args, trace, vocab)
        for workers in [int(w) for w in args.workers.split(",") if w]:
            placement = os.path.join(work, f"placement-{workers}.json")
            planned_placement(args, workers, trace, placement)
            configs = {"planned": f"--placement {shlex.quote(placement)}",
                       "rebalanced": f"--rebalance-interval {args.rebalance_interval} --spare-slots {args.spare_slots}",
                       "default": ""}
            runs = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, server_args in configs.items():
                    runs[name].append(measured(args, workers, server_args, vocab, name))
            planned, rebalanced, default = (
                {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[name]),
                 "rounds": [r["tokens_per_s"] for r in runs[name]]}
                for name in configs)
            rows.append({"workers": workers, "planned": planned, "rebalanced": rebalanced, "default": default,
                         "rebalanced_over_planned": rebalanced["tokens_per_s"] / planned["tokens_per_s"],
                         "default_over_planned": default["tokens_per_s"] / planned["tokens_per_s"]})
    print(f"{args.model}: serve --threads {args.threads}, {args.concurrency} clients, prompts {args.input_len} "
          f"tokens, outputs {args.output_len}; tokens/s of the batches started {args.from_s:.0f}-{args.until_s:.0f} s "
          f"after the load began; rebalancing every {args.rebalance_interval} s within {args.spare_slots} spare slots")
    print_table(COLUMNS, [[str(r["workers"]), f"{r['planned']['tokens_per_s']:.1f}",
                           f"{r['rebalanced']['tokens_per_s']:.1f}", f"{r['default']['tokens_per_s']:.1f}",
                           f"{r['rebalanced_over_planned']:.2f}x", f"{r['default_over_planned']:.2f}x"]
                          for r in rows])
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"model": args.model, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
