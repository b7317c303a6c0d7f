"""Chaos run: `tramontane serve` under load while its workers are killed,
stopped, flooded and fed garbage, with a verdict per scenario.

The scenarios, in the README's order (one function each in
chaoslib/scenarios.py, whose docstrings say what each does and checks):

1. kill -9 a replicated worker: no request fails; the worker is started
   again and used.
2. kill -9 an unreplicated worker: 503s naming the worker, /health 503,
   then recovery.
3. SIGSTOP a worker for 10 s (serve --dispatch-timeout-ms 2000): 5xx within
   about the deadline, recovery after SIGCONT.
4. 10x overload (serve --queue 16 --max-running 8): 429s with Retry-After,
   no 5xx, every accepted request completes, bounded RSS growth.
5. With --api-key: malformed requests, requests without the key, raw
   garbage on the gRPC ports: only 4xx; still healthy over HTTP and gRPC.
6. Under ulimit -n 1024, slowloris on the HTTP port (--flood connections
   each sending a byte of a never-ending head every 2-4 s): no normal
   request fails, the flood's connections are closed within the header
   timeout, open files and RSS bounded.
7. Under ulimit -n 1024, an idle flood (no HTTP/2 preface) on the router's
   gRPC port and a worker's: the same checks, and gRPC still serves.
8. A rebalance (POST /admin/rebalance) of a skewed checkpoint: no request
   fails; time until every layer's balancedness is 0.9.
9. A worker added (POST /admin/workers), then a rebalance: the same.
10. A worker removed (DELETE /admin/workers/2) and stopped: the same.
11. Every worker restarted in turn (preStop hook, stop, start): no request
   fails, /health stays 200.
12. kill -9 of an unreplicated worker under --self-heal: serving again
   within 5 s.
Scenarios 8 to 12 report the throughput before and after the change.

Every scenario starts its own `serve` (8 to 12: separate worker and router
processes; loopback ports, the tiny checkpoint generated once into
target/chaos-model) and keeps it under load the whole
time (chaoslib/load.py: --concurrency threads of streamed and whole
completions and chat completions).

Prints one row per scenario (requests sent, succeeded, the others by cause,
p99 latency of all and of the failures, max RSS, recovery time, PASS/FAIL),
then each scenario's checks and error messages; --json prints the same as
JSON. Exits 1 when a scenario fails (3 when the whole run passes --timeout).
serve's logs go to --log-dir, and every request of scenario N (its start,
latency, outcome, cause and message) to N-requests.jsonl there.

Usage: python benches/chaos.py --bin target/release/tramontane [--model target/chaos-model]
           [--concurrency 32] [--seed 0] [--malformed 300] [--only 1,3] [--json]
"""

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time

from chaoslib import log  # beside this file, which Python puts on sys.path
from chaoslib.report import Report, print_details, print_summary_table
from chaoslib.scenarios import SCENARIOS, RunContext
from chaoslib.serve import Serve, log_lines, stop_all


class Timeout(Exception):
    """The whole run took longer than --timeout."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/tramontane")
    parser.add_argument("--model", default="target/chaos-model", help="generated (tiny preset) when missing")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malformed", type=int, default=300, help="malformed requests in scenario 5")
    parser.add_argument("--only", help="scenarios to run, e.g. 1,3")
    parser.add_argument("--warm-s", type=float, default=2.0, help="load before the fault")
    parser.add_argument("--after-s", type=float, default=3.0, help="load after the recovery")
    parser.add_argument("--stop-s", type=float, default=10.0, help="how long scenario 3 stops the worker")
    parser.add_argument("--dispatch-timeout-ms", type=int, default=2000, help="serve's deadline in scenario 3")
    parser.add_argument("--overload-s", type=float, default=8.0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=256.0)
    parser.add_argument("--flood", type=int, default=1500, help="flood connections per port in scenarios 6 and 7")
    parser.add_argument("--flood-s", type=float, default=30.0, help="how long scenarios 6 and 7 flood")
    parser.add_argument("--log-dir", default="target/chaos-logs")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for the whole run")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def stop_on_signals(timeout):
    """Ctrl-C, SIGTERM, SIGHUP and the end of `timeout` s raise here, so that every serve is stopped."""

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    def on_alarm(_signum, _frame):
        raise Timeout(f"the run took over {timeout} s")

    atexit.register(stop_all)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started it ignoring SIGINT
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)


def run_scenario(ctx, number, title, scenario):
    """Runs one scenario, stops its serve, writes its requests file; its summary."""
    report = Report(number, title)
    log(f"scenario {number}: {title}")
    began = time.monotonic()
    try:
        scenario(ctx, report)
    except Timeout:
        raise
    except Exception as error:  # noqa: BLE001 (the scenario fails, the others still run)
        report.error = f"{type(error).__name__}: {error}"
        log(f"scenario {number} could not run: {report.error}")
    finally:
        for s in list(Serve.started):
            if report.log_path is None:
                report.log_path = s.log_path
            s.stop()
            Serve.started.remove(s)
    if not report.passed and report.log_path:
        report.log_excerpt = log_lines(report.log_path, r"WARN|ERROR|panic|started again|is live", 10)
    summary = report.summary()
    if report.results:
        summary["requests_file"] = os.path.join(ctx.args.log_dir, f"{number}-requests.jsonl")
        report.write_requests(summary["requests_file"])
    summary["duration_s"] = time.monotonic() - began
    log(f"scenario {number}: {summary['verdict']} ({summary['duration_s']:.0f} s)")
    return summary


def run_scenarios(ctx, only):
    """The summaries of the scenarios chosen (all without --only); stops every process however it ends."""
    summaries = []
    try:
        for number, title, scenario in SCENARIOS:
            if not only or number in only:
                summaries.append(run_scenario(ctx, number, title, scenario))
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        stop_all()
        raise SystemExit(130)
    except Timeout as error:
        log(f"{error}: stopping every process")
        stop_all()
        raise SystemExit(3)
    finally:
        signal.alarm(0)
        stop_all()
    return summaries


def main() -> None:
    args = parse_args()
    only = {int(x) for x in args.only.split(",")} if args.only else None
    stop_on_signals(args.timeout)

    os.makedirs(args.log_dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.model, "config.json")):
        log(f"generating the tiny checkpoint into {args.model}")
        subprocess.run([args.bin, "gen-model", "--preset", "tiny", "--out", args.model], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
    ctx = RunContext(args)
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(args.bin).st_mtime))
    summaries = run_scenarios(ctx, only)

    passed = all(s["verdict"] == "PASS" for s in summaries)
    if args.json:
        print(json.dumps({"passed": passed, "bin": args.bin, "bin_mtime": built, "concurrency": args.concurrency,
                          "seed": args.seed, "model": args.model, "scenarios": summaries}, indent=1))
    else:
        print(f"chaos run of {args.bin} (built {built}) serve --workers 2 on {args.model}, load of "
              f"{args.concurrency} threads (seed {args.seed})")
        print_summary_table(summaries)
        print_details(summaries)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
