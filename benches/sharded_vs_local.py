"""Sharded execution against in-process execution, end to end on this machine.

In one run, on the same checkpoint and dtype (--dtype, default bf16): tokens/s
of (a) the in-process forward, and of the router's forward with its experts
on 1, 2 and 4 worker processes (default placement, loopback gRPC, every
process with --threads threads, as on separate hosts), for prefill 8x128 and
greedy decode at batch 1, 8 and 32; each as a ratio to (a). This host's speed
moves by tens of percent within minutes, so (a) and router + 2 workers each
run twice, at the start and at the end, and the better of the two counts for
each row. For each sharded row, where a layer's
time goes: the router's dense part and dispatch phases, per Forward the
transport and the worker's own phases, and the bytes on the wire per token
and layer each way (the Forwards' protobuf messages). Then router + 2 workers with 0, 0.5
and 2 ms added to every round trip (`tramontane delay-proxy` in front of
each worker), one batch per step and 2 interleaved micro-batches. Then the
round trip of
one layer's Forward with a one-row payload (p50/p99), against a worker of the
tiny model (transport cost: the expert's compute is a few microseconds) and
against a worker of this checkpoint (transport plus one expert on one row).

Usage: python benches/sharded_vs_local.py --model DIR --bin target/release/tramontane [--threads 2]
       [--dtype bf16]
"""

import argparse
import json
import os
import subprocess

from benchlib import Column, print_table, run_json, start  # beside this file, which Python puts on sys.path

# As `tramontane serve` starts its workers: no OpenMP spin-waiting while idle.
WORKER_ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def start_worker(binary, model, experts, threads, dtype="f32"):
    worker = start([binary, "worker", "--model", model, "--experts", experts, "--listen", "127.0.0.1:0",
                    "--threads", str(threads), "--dtype", dtype], env=WORKER_ENV)
    return worker, worker.listening("tramontane worker")


def start_proxy(binary, upstream, rtt_ms):
    proxy = start([binary, "delay-proxy", "--upstream", upstream, "--rtt-ms", str(rtt_ms)])
    return proxy, proxy.listening("tramontane delay-proxy")


def stop_all(started):
    for process, _ in started:
        process.stop()


def bench_forward(args, workers=(), rows="prefill-8x128,decode-1,decode-8,decode-32", extra=()):
    command = [args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
               "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
               "--dtype", args.dtype, "--rows", rows, *extra]
    env = dict(os.environ)
    if workers:
        command += ["--workers", ",".join(workers)]
        # As `router` and `serve` run (bench-forward --workers re-runs itself so
        # too): no OpenMP spin-waiting on the cores of the workers while a layer is out.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return run_json(command, env)["rows"]


def bench_dispatch(args, model, samples):
    worker, addr = start_worker(args.bin, model, "0", 1)
    try:
        return run_json([args.bin, "bench-dispatch", "--worker", addr, "--samples", str(samples), "--json"])
    finally:
        worker.stop()


def best_of(first, second):
    """Row by row, the faster of two runs of the same rows (with its breakdown)."""
    return [max(a, b, key=lambda row: row["tokens_per_s"]) for a, b in zip(first, second)]


def rates_and_ratios(rows, base):
    """Per row, its tokens/s and its ratio to the same row of `base`."""
    return [f"{r['tokens_per_s']:>12.1f} ({r['tokens_per_s'] / b['tokens_per_s']:.2f}x)" for r, b in zip(rows, base)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tiny-model", default="target/tiny-model")
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    args = parser.parse_args()

    config = json.load(open(os.path.join(args.model, "config.json")))
    experts = config.get("num_local_experts") or config["num_experts"]
    def sharded(count):
        procs = [start_worker(args.bin, args.model, ",".join(str(e) for e in range(experts) if e % count == w),
                              args.threads, args.dtype) for w in range(count)]
        try:
            return bench_forward(args, [addr for _, addr in procs])
        finally:
            stop_all(procs)

    first = bench_forward(args)
    results = {"in-process": first}
    for count in (1, 2, 4):
        results[f"router + {count} worker{'s' if count > 1 else ''}"] = sharded(count)
    results["router + 2 workers"] = best_of(results["router + 2 workers"], sharded(2))
    results["in-process"] = best_of(first, bench_forward(args))

    base = results["in-process"]
    print(f"{config['architectures'][0]} ({args.model}), {args.dtype}, {args.threads} threads per process")
    print_table([Column("configuration", 22, "<")] + [Column(row["name"], 24) for row in base],
                [[name] + rates_and_ratios(rows, base) for name, rows in results.items()], sep="")

    print("\nper layer, µs (mean over the timed steps; per-Forward phases summed over a layer's Forwards)")
    for name, rows in results.items():
        for r in rows:
            d = r.get("dispatch")
            if not d:
                continue
            print(f"{name:<22}{r['name']:<16} step {d['step_us']:>8.0f} = dense {d['dense_us']:>7.0f}"
                  f" + dispatch {d['layer_us']:>7.0f} (encode {d['encode_us']:.0f}, wait {d['wait_us']:.0f},"
                  f" decode {d['decode_us']:.0f}, combine {d['combine_us']:.0f});"
                  f" {d['forwards_per_layer']:.2f} Forwards: round trip {d['round_trip_us']:.0f}"
                  f" = transport {d['transport_us']:.0f} + worker decode {d['worker_decode_us']:.0f},"
                  f" queue {d['worker_queue_us']:.0f}, compute {d['worker_compute_us']:.0f},"
                  f" encode {d['worker_encode_us']:.0f}; wire per token and layer {d['sent_bytes_per_token']:.0f} B"
                  f" sent, {d['received_bytes_per_token']:.0f} B received")

    print("\nrouter + 2 workers with added round trip (delay-proxy per worker), tokens/s"
          " (ratio to the same micro-batching without delay)")
    procs = [start_worker(args.bin, args.model, ",".join(str(e) for e in range(experts) if e % 2 == w),
                          args.threads, args.dtype) for w in range(2)]
    try:
        latency = {}
        for rtt in (0, 0.5, 2):
            proxies = [start_proxy(args.bin, addr, rtt) for _, addr in procs] if rtt else []
            addrs = [a for _, a in proxies] if rtt else [a for _, a in procs]
            try:
                for micro in (1, 2):
                    latency[(rtt, micro)] = bench_forward(args, addrs, "prefill-8x128,decode-8,decode-32",
                                                          ["--micro-batches", str(micro)])
            finally:
                stop_all(proxies)
    finally:
        stop_all(procs)
    names = [r["name"] for r in latency[(0, 1)]]
    print_table([Column("added rtt, micro-batches", 26, "<")] + [Column(n, 22) for n in names],
                [[f"{rtt} ms, {micro}"] + rates_and_ratios(rows, latency[(0, micro)])
                 for (rtt, micro), rows in latency.items()], sep="")

    if not os.path.exists(os.path.join(args.tiny_model, "config.json")):
        subprocess.run([args.bin, "gen-model", "--preset", "tiny", "--out", args.tiny_model], check=True)
    for label, model in (("tiny model (transport)", args.tiny_model), ("this model (1 expert, 1 row)", args.model)):
        rtt = bench_dispatch(args, model, args.samples)
        print(f"dispatch round trip, {label}: p50 {rtt['p50_us']:.0f} µs, p99 {rtt['p99_us']:.0f} µs "
              f"({rtt['samples']} samples)")


if __name__ == "__main__":
    main()
