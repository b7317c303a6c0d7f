"""Several routers over one pool of workers (data-parallel attention over
shared experts), end to end on this machine.

In one run, on the same checkpoint: 2 workers (--threads each); then
(a) one router at concurrency 2C, and (b) two routers, each at concurrency C
at the same time, all under the load generator (benches/serving_load.py:
streaming completions, random token-id prompts, ignore_eos). Prints the
aggregate output tokens/s of each and (b)/(a), and the workers' mean
Forwards per expert computation (tramontane_worker_batched_forwards: the
Forwards of one layer that waited while the worker was busy, from both
routers, run as one).

Usage: python benches/routers_shared.py --model DIR --bin target/release/tramontane
           [--threads 2] [--concurrency 32] [--num-requests 64] [--input-len 128] [--output-len 32]
"""

import argparse
import json
import os
import threading

import serving_load  # beside this file, which Python puts on sys.path
from benchlib import StartError, get, parse_samples, sample_sum, start, wait_healthy


def start_worker(args, experts):
    worker = start([args.bin, "worker", "--model", args.model, "--listen", "127.0.0.1:0",
                    "--threads", str(args.threads), "--experts", experts])
    return worker, worker.listening("tramontane worker")


def start_router(args, workers):
    """Starts `tramontane router` over `workers`; returns it and its HTTP address once /health is 200."""
    router = start([args.bin, "router", "--model", args.model, "--workers", ",".join(workers),
                    "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                    "--threads", str(args.threads), "--max-running", str(2 * args.concurrency)])
    try:
        router.listening("tramontane router")
        http = router.listening("tramontane http")
        wait_healthy(http, 600.0, router)
    except StartError as error:
        router.stop()
        raise SystemExit(str(error))
    return router, http


def stop_all(started):
    for process, _ in started:
        process.stop()


def worker_histogram(addr, name):
    """Sum and count of a histogram on a worker's /metrics."""
    status, text = get(addr, "/metrics")
    if status != 200:
        raise SystemExit(f"GET http://{addr}/metrics: {status} {text[:200]}")
    samples = parse_samples(text)
    return sample_sum(samples, name + "_sum"), sample_sum(samples, name + "_count")


def load(args, http, concurrency, seed):
    """The load generator against one router: `args.num_requests` at `concurrency`."""
    return serving_load.run(f"http://{http}", num_requests=args.num_requests, concurrency=concurrency,
                            input_len=args.input_len, output_len=args.output_len, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="per router of (b); (a) runs twice this")
    parser.add_argument("--num-requests", type=int, default=64, help="per router")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()

    config_experts = json.load(open(os.path.join(args.model, "config.json")))["num_local_experts"]
    workers = [start_worker(args, ",".join(str(e) for e in range(config_experts) if e % 2 == w)) for w in range(2)]
    addrs = [a for _, a in workers]
    batched = lambda: [worker_histogram(a, "tramontane_worker_batched_forwards") for a in addrs]  # noqa: E731
    try:
        before = batched()
        router, http = start_router(args, addrs)
        try:
            one = serving_load.run(f"http://{http}", num_requests=2 * args.num_requests,
                                   concurrency=2 * args.concurrency, input_len=args.input_len,
                                   output_len=args.output_len, seed=0)
        finally:
            router.stop()
        middle = batched()
        routers = [start_router(args, addrs) for _ in range(2)]
        try:
            results = [None, None]

            def drive(i):
                results[i] = load(args, routers[i][1], args.concurrency, i)

            threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            stop_all(routers)
        after = batched()
    finally:
        stop_all(workers)

    def per_compute(a, b):
        s = sum(x[0] for x in b) - sum(x[0] for x in a)
        n = sum(x[1] for x in b) - sum(x[1] for x in a)
        return s / n if n else float("nan")

    two_tokens = sum(r["output_tokens"] for r in results)
    two_duration = max(r["duration_s"] for r in results)
    two = two_tokens / two_duration
    print(f"2 workers, {args.threads} threads per process, {args.model}; prompts of {args.input_len} tokens, "
          f"{args.output_len} output tokens")
    print(f"one router at concurrency {2 * args.concurrency}: {one['output_tokens_per_s']:.1f} output tokens/s, "
          f"{one['failed']} failed; Forwards per expert computation {per_compute(before, middle):.2f}")
    print(f"two routers at concurrency {args.concurrency} each: {two:.1f} output tokens/s "
          f"({two / one['output_tokens_per_s']:.2f}x), {sum(r['failed'] for r in results)} failed; "
          f"Forwards per expert computation {per_compute(middle, after):.2f}")


if __name__ == "__main__":
    main()
