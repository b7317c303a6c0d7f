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
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import serving_load  # noqa: E402


def listening(proc, prefix):
    """The address of the next `prefix...listening on ADDR` line of `proc`."""
    for line in proc.stdout:
        if line.startswith(prefix) and "listening on " in line:
            return line.strip().rsplit("listening on ", 1)[1]
    proc.kill()
    raise SystemExit(f"{proc.args[1]} did not start")


def drain(proc):
    """Keeps reading its stdout, so that it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()


def start(binary, args, prefix):
    """Starts `tramontane ARGS`; returns it and the address of its `prefix...listening on` line."""
    proc = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = listening(proc, prefix)
    drain(proc)
    return proc, addr


def wait_healthy(http, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"router at {http} not healthy")


def start_router(args, workers):
    proc = subprocess.Popen([args.bin, "router", "--model", args.model, "--workers", ",".join(workers),
                             "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                             "--threads", str(args.threads), "--max-running", str(2 * args.concurrency)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    listening(proc, "tramontane router")
    http = listening(proc, "tramontane http")
    drain(proc)
    wait_healthy(http)
    return proc, http


def worker_metric(addr, name):
    """Sum and count of a histogram on a worker's /metrics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                values[suffix] = float(line.split()[-1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


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
    workers = [start(args.bin, ["worker", "--model", args.model, "--listen", "127.0.0.1:0",
                                "--threads", str(args.threads), "--experts",
                                ",".join(str(e) for e in range(config_experts) if e % 2 == w)], "tramontane")
               for w in range(2)]
    addrs = [a for _, a in workers]
    batched = lambda: [worker_metric(a, "tramontane_worker_batched_forwards") for a in addrs]  # noqa: E731
    try:
        before = batched()
        router, http = start_router(args, addrs)
        try:
            one = serving_load.run(f"http://{http}", num_requests=2 * args.num_requests,
                                   concurrency=2 * args.concurrency, input_len=args.input_len,
                                   output_len=args.output_len, seed=0)
        finally:
            router.kill()
            router.wait()
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
            for proc, _ in routers:
                proc.kill()
                proc.wait()
        after = batched()
    finally:
        for proc, _ in workers:
            proc.kill()
            proc.wait()

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
