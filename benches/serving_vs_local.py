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
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import serving_load  # beside this file, which Python puts on sys.path


def bench_decode(args) -> dict:
    """In-process batch-32 decode over the same context lengths as the served requests."""
    out = subprocess.run(
        [args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
         "--rows", "decode-32", "--repeats", str(args.repeats), "--decode-prompt", str(args.input_len),
         "--decode-steps", str(args.output_len)],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)["rows"][0]


def health_ok(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # 503 until every expert has a live worker
        return False


def start_server(args, log):
    """Starts `tramontane serve`; returns it and its HTTP address once GET /health answers 200."""
    command = [args.bin, "serve", "--model", args.model, "--workers", str(args.workers),
               "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--threads", str(args.threads),
               *shlex.split(args.server_args)]
    # Its own process group, so that a last-resort kill reaches its workers too.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    lines = queue.Queue()

    def read_stdout():  # keeps draining stdout, so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + args.start_timeout
    addr = None
    try:
        while addr is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no 'tramontane http listening on' line in {args.start_timeout} s")
            if "tramontane http listening on " in line:
                addr = line.strip().rsplit("listening on ", 1)[1]
        while not health_ok(addr):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET /health not 200 after {args.start_timeout} s")
            time.sleep(0.5)
    except RuntimeError as error:
        stop_server(proc)
        log.seek(0)
        tail = log.read()[-4000:]
        raise SystemExit(f"tramontane serve did not start: {error}\n{tail}")
    return proc, addr


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # serve stops its workers itself
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def requests_at(concurrency: int, num_requests: int) -> int:
    """Fewer requests at concurrency 1, where each one runs alone."""
    return num_requests if concurrency > 1 else min(num_requests, max(8, num_requests // 8))


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    decode = result["in_process_decode_32"]
    print(f"fp32, {result['model']}; prompts of {result['input_len']} tokens, {result['output_len']} output tokens")
    print(f"in-process decode batch 32 (bench-forward --threads {result['threads']}): "
          f"{decode['tokens_per_s']:.1f} tok/s")
    print(f"served: tramontane serve --workers {result['workers']} --threads {result['threads']} {result['server_args']}".rstrip())
    print(f"{'concurrency':>11} {'requests':>8} {'failed':>6} {'req/s':>7} {'out tok/s':>9}"
          f" {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p90':>7} {'p99':>7}  (ms)")
    for s in result["levels"]:
        ttft, itl = s["ttft_ms"], s["itl_ms"]
        print(f"{s['concurrency']:>11} {s['num_requests']:>8} {s['failed']:>6} {s['request_per_s']:>7.2f}"
              f" {s['output_tokens_per_s']:>9.1f} {fmt(ttft['p50']):>9} {fmt(ttft['p90']):>8} {fmt(ttft['p99']):>8}"
              f" {fmt(itl['p50']):>8} {fmt(itl['p90']):>7} {fmt(itl['p99']):>7}")
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
    with tempfile.TemporaryFile("w+") as log:
        print("starting tramontane serve ...", file=sys.stderr)
        proc, addr = start_server(args, log)
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
            stop_server(proc)

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
    print_table(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
