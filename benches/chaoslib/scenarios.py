"""The chaos scenarios, one function each, in the order of the README's list
(Benchmarks, `make bench-chaos`) and of `SCENARIOS` at the bottom.

Every scenario starts its own `serve --workers 2` (loopback ports, the tiny
checkpoint), keeps it under the load mix of chaoslib/load.py the whole time,
does its fault, and records into its Report what happened and which checks
passed; the scenario passes when every check does.
"""

import json
import os
import random
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from benchlib import fmt, sample_sum
from chaoslib import log, pool
from chaoslib.flood import FdSampler, Flood
from chaoslib.load import OK, Load, failures, load_request, warm_up
from chaoslib.malformed import grpc_garbage, malformed_cases, send_case, throw_garbage
from chaoslib.report import percentile
from chaoslib.serve import Serve, log_lines, signal_if_worker
from chaoslib.watch import Monitor, RssSampler, listen_overflows, wait_until


class RunContext:
    """The run's options and the checkpoint's shape, which every scenario reads."""

    def __init__(self, args):
        self.args = args
        with open(os.path.join(args.model, "config.json")) as f:
            config = json.load(f)
        self.layers = config["num_hidden_layers"]
        self.experts = config["num_local_experts"]

    def serve(self, name, extra, api_key=None, open_files=None):
        keys = ["--api-key", api_key] if api_key else []
        return Serve(self.args.bin, self.args.model, name, self.args.log_dir, ["--workers", "2", *keys, *extra],
                     api_key, open_files=open_files)


# ----------------------------------------------------------------------------
# what the scenarios share


def start_serve(ctx, report, name, extra=(), api_key=None, open_files=None):
    """A healthy serve for this scenario (its log is the report's) and its model's name, warmed up."""
    serve = ctx.serve(name, list(extra), api_key, open_files)
    report.log_path = serve.log_path
    serve.wait_healthy()
    model = serve.model_name()
    warm_up(serve, model)
    return serve, model


@contextmanager
def under_load(ctx, report, serve, model):
    """The load mix against `serve`, with /health polled and serve's RSS sampled, for the
    with-block; then the load's results and the max RSS go to the report."""
    rss = RssSampler(serve.pid).start()
    monitor = Monitor(serve).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed).start()
    try:
        yield load, monitor
    finally:
        report.results = load.stop()
        monitor.stop()
        report.max_rss_mib = rss.stop()


def kill_worker_0(report, serve, scenario):
    """kill -9 of serve's worker 0, noted in the report: its pid and when."""
    victim = serve.worker_pid(0)
    kill_at = report.events["kill -9 worker 0"] = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    log(f"{scenario}: kill -9 worker 0 (pid {victim})")
    return victim, kill_at


def restarts_of(serve, **labels):
    return sample_sum(serve.metrics(), "tramontane_serve_worker_restarts_total", **labels)


def clear_failure(r):
    """A failure that names its cause: an OpenAI error body (or stream error event) of a 5xx server_error."""
    if r.error_type != "server_error":
        return False
    return r.cause.startswith("stream error event") or r.status is not None and 500 <= r.status < 600


def first_success(results, since):
    """When the first request sent at or after `since` succeeded, or None."""
    return min((r.end for r in results if r.outcome == OK and r.start >= since), default=None)


@dataclass
class Outage:
    """Worker 0 out (killed or stopped) and back: when, as the monitor and the load saw it."""

    fault_at: float  # the kill or the SIGSTOP
    since: float  # what recovery counts from: the kill, or the SIGCONT
    down_at: float = None  # the first /health non-200 after the fault
    up_at: float = None  # /health 200 again after the last non-200
    success_at: float = None  # the first success of a request sent after `since`


def wait_for_recovery(ctx, load, monitor, outage):
    """Waits (30 s at most each) for /health to go down and be 200 again, and for a request sent
    after `outage.since` to succeed; then keeps the load on for --after-s."""
    outage.down_at, outage.up_at = monitor.wait_health_up(outage.fault_at, 30)
    wait_until(lambda: first_success(load.snapshot(), outage.since), 30)
    time.sleep(ctx.args.after_s)


def seconds_between(start, end):
    return None if end is None else end - start


def check_outage(report, outage, recovery_from=""):
    """The checks scenarios 2 and 3 share: the failures name worker 0 and are clear 5xx, /health
    goes down and comes back, requests succeed again; returns the failures."""
    outage.success_at = first_success(report.results, outage.since)
    for name, t in (("/health non-200", outage.down_at), ("/health 200 again", outage.up_at),
                    ("first success", outage.success_at)):
        if t is not None:
            report.events[name] = t
    report.recovery_s = {"first_success": seconds_between(outage.since, outage.success_at),
                         "health_200": seconds_between(outage.since, outage.up_at),
                         "health_down_after_fault": seconds_between(outage.fault_at, outage.down_at)}
    report.recovery = (f"ok {fmt(report.recovery_s['first_success'])} / "
                       f"health {fmt(report.recovery_s['health_200'])}{recovery_from}")
    fails = failures(report.results)
    unclear = [r for r in fails if not clear_failure(r)]
    names_worker = [r for r in fails if "worker 0" in r.message]
    report.check(len(report.results) > 0, "requests were sent", f"{len(report.results)}")
    report.check(fails, "the fault broke requests (the load reached worker 0)", f"{len(fails)} failed")
    report.check(not unclear, "every failure is a 5xx (or a stream's error event) with a server_error body",
                 "; ".join(sorted({r.cause for r in unclear}))[:300] or f"{len(fails)} of {len(fails)}")
    report.check(len(names_worker) == len(fails), "every failure's message names worker 0",
                 f"{len(names_worker)} of {len(fails)}")
    report.check(outage.down_at is not None, "/health turned non-200 while worker 0 was out",
                 f"{fmt(report.recovery_s['health_down_after_fault'])} s after the fault")
    report.check(outage.up_at is not None, "/health 200 again within 30 s",
                 fmt(report.recovery_s["health_200"]) + " s")
    report.check(outage.success_at is not None, "a request sent after it succeeded within 30 s",
                 fmt(report.recovery_s["first_success"]) + " s")
    if outage.up_at is not None:
        late = [r for r in fails if r.start >= outage.up_at]
        report.check(not late, "no request sent after /health was 200 again failed",
                     f"{len(late)}" + (f": {late[0].cause}" if late else ""))
    return fails


def check_healthy_at_the_end(report, serve, fails):
    report.check(serve.get("/health")[0] == 200, "/health 200 at the end")
    report.notes.append(f"failed latency p50 {fmt(percentile([r.latency for r in fails], 50))} s, "
                        f"max {fmt(max((r.latency for r in fails), default=None))} s")


# ----------------------------------------------------------------------------
# 1. kill -9 a replicated worker


def kill_replicated_worker(ctx, report):
    """kill -9 worker 0 with every expert on both workers (a placement file): no request fails;
    serve starts the worker again (tramontane_serve_worker_restarts_total) and the router uses it
    again."""
    serve, model = start_serve(ctx, report, "1-kill-replicated", ["--placement", replicated_placement(ctx)])
    with under_load(ctx, report, serve, model) as (_, monitor):
        time.sleep(ctx.args.warm_s)
        victim, kill_at = kill_worker_0(report, serve, 1)
        back_at = wait_until(lambda: worker_back(serve, victim), 30, step=0.1)
        pairs_before = sample_sum(serve.metrics(), "tramontane_router_worker_expert_pairs_total", worker=0)
        time.sleep(ctx.args.after_s)
    values = serve.metrics()
    restarts = sample_sum(values, "tramontane_serve_worker_restarts_total", worker=0)
    pairs_after = sample_sum(values, "tramontane_router_worker_expert_pairs_total", worker=0)
    if back_at:
        report.events["worker 0 back"] = back_at
        report.recovery_s["worker_back"] = back_at - kill_at
        report.recovery = f"worker {back_at - kill_at:.2f}"
    down = [t for t, s in monitor.health if t >= kill_at and s != 200]
    report.notes.append(f"/health non-200 polls after the kill: {len(down)} (every expert has a replica)")
    fails = failures(report.results)
    report.check(len(report.results) > 0, "requests were sent", f"{len(report.results)}")
    report.check(not fails, "no request failed", f"{len(fails)} failed")
    report.check(restarts >= 1, "serve started worker 0 again (tramontane_serve_worker_restarts_total)",
                 f"{restarts:.0f}")
    report.check(back_at is not None, "worker 0 back (restarted, tramontane_router_worker_up 1) within 30 s",
                 fmt(report.recovery_s.get("worker_back")) + " s")
    report.check(pairs_after > pairs_before, "the router sends work to the restarted worker 0",
                 f"tramontane_router_worker_expert_pairs_total{{worker=\"0\"}} {pairs_before:.0f} -> {pairs_after:.0f}")
    report.check(serve.get("/health")[0] == 200, "/health 200 at the end")


def replicated_placement(ctx):
    """A placement file with every expert of every layer on both workers."""
    path = os.path.join(ctx.args.log_dir, "placement-replicated.json")
    with open(path, "w") as f:
        json.dump({"workers": 2, "experts": [[[0, 1] for _ in range(ctx.experts)] for _ in range(ctx.layers)]}, f)
    return path


def worker_back(serve, victim):
    """When worker 0 is back: restarted by serve, up for the router, a new process; else False."""
    values = serve.metrics()
    restarted = sample_sum(values, "tramontane_serve_worker_restarts_total", worker=0) >= 1
    up = sample_sum(values, "tramontane_router_worker_up", worker=0) == 1
    pid = serve.workers().get(0)
    return restarted and up and pid is not None and pid != victim and time.monotonic()


# ----------------------------------------------------------------------------
# 2. kill -9 an unreplicated worker


def kill_unreplicated_worker(ctx, report):
    """kill -9 worker 0 under the default placement: the requests it breaks fail with a 503 (or a
    stream's error event) naming the worker; /health turns 503; serve starts the worker again and
    the cluster serves again (recovery: from the kill to the first success of a request sent after
    it, and to /health 200 again)."""
    serve, model = start_serve(ctx, report, "2-kill-unreplicated")
    with under_load(ctx, report, serve, model) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        _, kill_at = kill_worker_0(report, serve, 2)
        outage = Outage(fault_at=kill_at, since=kill_at)
        wait_for_recovery(ctx, load, monitor, outage)
    restarts = restarts_of(serve, worker=0)
    fails = check_outage(report, outage)
    report.check(restarts >= 1, "serve started worker 0 again (tramontane_serve_worker_restarts_total)",
                 f"{restarts:.0f}")
    check_healthy_at_the_end(report, serve, fails)


# ----------------------------------------------------------------------------
# 3. SIGSTOP a worker 10 s


def stop_worker(ctx, report):
    """SIGSTOP worker 0 for --stop-s (10 s) under serve --dispatch-timeout-ms 2000: the requests it
    holds fail with a 5xx within about the deadline (their latency is bounded by the deadline plus
    the p99 of a request before the stop plus 1 s); then SIGCONT, and recovery as in 2, from the
    SIGCONT."""
    stop_s, deadline_ms = ctx.args.stop_s, ctx.args.dispatch_timeout_ms
    serve, model = start_serve(ctx, report, "3-sigstop", ["--dispatch-timeout-ms", str(deadline_ms)])
    with under_load(ctx, report, serve, model) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        victim = serve.worker_pid(0)
        stop_at = report.events["SIGSTOP worker 0"] = time.monotonic()
        before = load.snapshot()
        os.kill(victim, signal.SIGSTOP)
        log(f"3: SIGSTOP worker 0 (pid {victim}) for {stop_s:.0f} s")
        time.sleep(stop_s)
        signal_if_worker(victim, signal.SIGCONT)
        report.events["SIGCONT worker 0"] = time.monotonic()
        log("3: SIGCONT")
        outage = Outage(fault_at=stop_at, since=time.monotonic())
        wait_for_recovery(ctx, load, monitor, outage)
    restarts = restarts_of(serve, worker=0)
    fails = check_outage(report, outage, " (from SIGCONT)")
    normal = percentile([r.latency for r in before if r.outcome == OK], 99) or 0.0
    bound = deadline_ms / 1000 + normal + 1.0
    slowest = max((r.latency for r in fails), default=0.0)
    report.check(slowest <= bound, f"every failure answered within the deadline ({deadline_ms} ms) + the p99 "
                 f"before the stop ({normal:.2f} s) + 1 s = {bound:.2f} s", f"slowest {slowest:.2f} s")
    during = [r for r in report.results if stop_at <= r.start < stop_at + stop_s]
    report.notes.append(f"requests sent during the stop: {len(during)}, {len(failures(during))} failed, "
                        f"p99 latency {fmt(percentile([r.latency for r in during], 99))} s")
    report.notes.append(f"worker restarts by serve: {restarts:.0f} (a stopped worker is not dead)")
    check_healthy_at_the_end(report, serve, fails)


# ----------------------------------------------------------------------------
# 4. 10x overload


def overload(ctx, report):
    """serve --queue 16 --max-running 8 under 10x the concurrency (320 threads; after a 429 a thread
    waits 0.25-1 s, under the Retry-After of 1 s): 429s, each with a Retry-After of whole seconds,
    no 5xx, every accepted request completes; the serve process's RSS (VmRSS), sampled every
    100 ms, grows by at most --max-rss-growth-mib over its baseline."""
    serve, model = start_serve(ctx, report, "4-overload", ["--queue", "16", "--max-running", "8"])
    rss = RssSampler(serve.pid)
    time.sleep(0.5)
    baseline = rss.read()
    rss.start()
    overflows = listen_overflows()
    threads = 10 * ctx.args.concurrency
    load = Load(serve.http, model, threads, ctx.args.seed, backoff_429=(0.25, 1.0), timeout=60.0).start()
    log(f"4: {threads} threads against --queue 16 --max-running 8")
    try:
        time.sleep(ctx.args.overload_s)
    finally:
        report.results = load.stop(join_timeout=60.0)
        max_rss = rss.stop()
    if overflows is not None:
        report.notes.append(f"accept-queue overflows on this host during the run (TcpExtListenOverflows, each "
                            f"a SYN the client sends again after 1 s): {listen_overflows() - overflows}")
    report.max_rss_mib = max_rss
    report.rss_growth_mib = None if max_rss is None or baseline is None else max_rss - baseline
    check_overload(ctx, report, serve, baseline, max_rss, threads)


def check_overload(ctx, report, serve, baseline, max_rss, threads):
    results = report.results
    refused = [r for r in results if r.status == 429]
    bad_retry = [r for r in refused if not (r.retry_after or "").strip().isdigit() or int(r.retry_after) < 1]
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    other = [r for r in results if r.outcome != OK and r.status != 429]
    accepted = [r for r in results if r.status == 200]
    retry_values = sorted({r.retry_after for r in refused if r.retry_after})
    report.check(refused, "the overload was refused with 429", f"{len(refused)} of {len(results)}")
    report.check(not bad_retry, "every 429 has a Retry-After of whole seconds",
                 f"{len(bad_retry)} without; values seen {retry_values}")
    report.check(not server_errors, "no 5xx", f"{len(server_errors)}")
    report.check(not other, "every request not refused completed (no error, no cut stream, no hang)",
                 f"{len(other)}" + (f": {other[0].cause}" if other else ""))
    report.check(accepted, "requests were accepted and served", f"{len(accepted)}")
    report.check(report.rss_growth_mib is not None and report.rss_growth_mib <= ctx.args.max_rss_growth_mib,
                 f"serve's RSS grew by at most {ctx.args.max_rss_growth_mib} MiB",
                 f"baseline {fmt(baseline, '.0f')} MiB, max {fmt(max_rss, '.0f')} MiB")
    report.check(wait_until(lambda: serve.get("/health")[0] == 200, 10), "/health 200 after the overload")
    report.notes.append(f"{threads} threads for {ctx.args.overload_s:.0f} s; p99 latency of the accepted "
                        f"{fmt(percentile([r.latency for r in accepted], 99))} s, of the 429s "
                        f"{fmt(percentile([r.latency for r in refused], 99), '.3f')} s")


# ----------------------------------------------------------------------------
# 5. malformed requests, API key


def malformed_requests(ctx, report):
    """With --api-key: a few hundred seeded-random malformed bodies (chaoslib/malformed.py),
    requests without the key or with a wrong one (401), and raw garbage on the router's and the
    workers' gRPC ports: only 4xx, never a 5xx or a connection closed without an answer; the load
    beside them does not fail, and afterwards /health is 200, a completion succeeds over HTTP and
    over gRPC (`tramontane generate --server`), and no worker was restarted."""
    key = f"chaos-key-{ctx.args.seed}"
    serve, model = start_serve(ctx, report, "5-malformed", api_key=key)
    workers_before = serve.workers()
    rss = RssSampler(serve.pid).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed, api_key=key).start()
    cases = malformed_cases(ctx.args.seed, ctx.args.malformed, model)
    try:
        time.sleep(1.0)
        log(f"5: {len(cases)} malformed / unauthenticated requests, then garbage on the gRPC ports")
        sent = send_cases(serve, cases, key)
        targets, garbage_answers = throw_grpc_garbage(serve, ctx.args.seed)
        time.sleep(1.0)
    finally:
        load_results = load.stop()
        report.max_rss_mib = rss.stop()
    malformed = [a for a in sent.answers if a is not None]
    report.results = load_results + malformed
    check_malformed_answers(report, cases, sent, malformed)
    check_still_serving(ctx, report, serve, model, key, load_results, workers_before)
    note_malformed(report, sent, malformed, targets, garbage_answers)


@dataclass
class SentCases:
    """What the malformed cases got, by index of the case (None: not sent or no Result)."""

    answers: list
    missing_www: list  # 401s without WWW-Authenticate: Bearer
    other_status: list  # answered outside the case's expected statuses
    script_errors: list  # exceptions of this script while sending (counted, not hidden)


def send_cases(serve, cases, key, senders=4):
    """Sends every case, `senders` at a time, to serve's HTTP port."""
    sent = SentCases([None] * len(cases), [], [], [])
    index = iter(range(len(cases)))
    lock = threading.Lock()

    def sender():
        while True:
            with lock:
                i = next(index, None)
            if i is None:
                return
            try:
                sent.answers[i], headers = send_case(serve.http, cases[i], key)
            except Exception as error:  # noqa: BLE001 (a bug of this script: counted, not hidden)
                sent.script_errors.append(f"{cases[i].kind}: {type(error).__name__}: {error}")
                continue
            lowered = {k.lower(): v for k, v in (headers or {}).items()}
            if sent.answers[i].status == 401 and lowered.get("www-authenticate") != "Bearer":
                sent.missing_www.append(cases[i].kind)
            if headers is not None and not cases[i].expect[0] <= sent.answers[i].status <= cases[i].expect[1]:
                sent.other_status.append(f"{sent.answers[i].status} for {cases[i].kind}")

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sent


def throw_grpc_garbage(serve, seed):
    """Every gRPC garbage payload on a new connection to the router and to each worker;
    ([(name, addr)], [(name, bytes sent, bytes read back or the error)])."""
    garbage_rng = random.Random(seed + 5)
    targets = [("router", serve.grpc)]
    # serve starts its workers on port 0: their addresses are in /v1/experts/stats.
    status, text = serve.get("/v1/experts/stats")
    if status == 200:
        targets = [("router", serve.grpc)] + [(f"worker {i}", a) for i, a in
                                              enumerate(json.loads(text).get("worker_addrs", []))]
    answers = []
    for name, addr in targets:
        for payload in grpc_garbage(garbage_rng):
            try:
                answers.append((name, len(payload), throw_garbage(addr, payload)))
            except OSError as error:
                answers.append((name, len(payload), f"{type(error).__name__}: {error}"))
    return targets, answers


def check_malformed_answers(report, cases, sent, malformed):
    unanswered_cases = len(cases) - len(malformed)
    five = [a for a in malformed if a.status is not None and a.status >= 500]
    accepted = [a for a in malformed if a.status is not None and a.status < 400]
    dropped = [a for a in malformed if a.status is None]
    unauth = [a for a, c in zip(sent.answers, cases) if c.expect == (401, 401) and a is not None]
    report.check(not five, "no malformed request got a 5xx", "; ".join(a.message[:120] for a in five[:3]) or "0")
    report.check(not dropped, "every malformed request got an answer (no connection closed without one)",
                 "; ".join(f"{a.cause} ({a.message[:80]})" for a in dropped[:3]) or "0")
    report.check(not accepted, "no malformed request was accepted (2xx/3xx)",
                 "; ".join(f"{a.status} {a.label}" for a in accepted[:5]) or "0")
    report.check(unanswered_cases == 0, "every malformed request was sent and answered in time",
                 f"{unanswered_cases} left"
                 + (f"; script errors: {sent.script_errors[:3]}" if sent.script_errors else ""))
    report.check(all(a.status == 401 for a in unauth) and unauth, "requests without the key (or a wrong one) got 401",
                 f"{sum(a.status == 401 for a in unauth)} of {len(unauth)}")
    report.check(not sent.missing_www, "every 401 has WWW-Authenticate: Bearer", ", ".join(sent.missing_www) or "")


def check_still_serving(ctx, report, serve, model, key, load_results, workers_before):
    """The load beside the malformed requests did not fail, and serve still serves over HTTP and gRPC."""
    load_fails = failures(load_results)
    report.check(not load_fails, "the load beside them did not fail",
                 f"{len(load_fails)} of {len(load_results)}" + (f": {load_fails[0].cause}" if load_fails else ""))
    report.check(serve.alive(), "serve still runs")
    report.check(wait_until(lambda: serve.get("/health")[0] == 200, 10), "/health 200 afterwards")
    after = load_request(serve.http, model, random.Random(1), key, timeout=30)
    report.check(after.outcome == OK, "a completion over HTTP succeeds afterwards", after.cause)
    grpc_ok, grpc_detail = generate_over_grpc(ctx, serve, key)
    report.check(grpc_ok, "a generation over gRPC (tramontane generate --server) succeeds afterwards",
                 "" if grpc_ok else grpc_detail)
    restarts = restarts_of(serve)
    report.check(restarts == 0 and serve.workers() == workers_before, "no worker died or was restarted",
                 f"restarts {restarts:.0f}")


def generate_over_grpc(ctx, serve, key):
    """(succeeded, what it printed last) of `tramontane generate --server` against serve's gRPC port."""
    try:
        keys = ["--api-key", key] if key else []
        generate = subprocess.run([ctx.args.bin, "generate", "--server", serve.grpc, *keys, "--prompt",
                                   "The tramontane is", "--max-tokens", "4", "--json"], capture_output=True,
                                  text=True, timeout=60)
        return generate.returncode == 0, (generate.stderr or generate.stdout).strip()[-200:]
    except subprocess.TimeoutExpired:
        return False, "tramontane generate --server took over 60 s"


def note_malformed(report, sent, malformed, targets, garbage_answers):
    statuses = {}
    for a in malformed:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    not_json = [a for a in malformed if "(no JSON error body)" in a.cause]
    report.notes.append("malformed statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(
        statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
    if sent.other_status:
        report.notes.append(f"{len(sent.other_status)} answered another 4xx than the one expected: "
                            + "; ".join(sorted(set(sent.other_status)))[:400])
    if not_json:
        report.notes.append(f"{len(not_json)} error answers without an OpenAI JSON error body: "
                            + ", ".join(sorted({f'{a.status} {a.label}' for a in not_json}))[:300])
    report.notes.append(f"gRPC garbage: {len(garbage_answers)} connections to {', '.join(n for n, _ in targets)}; "
                        f"bytes read back per connection: "
                        + ", ".join(str(r) for _, _, r in garbage_answers[:12]) + " ...")


# ----------------------------------------------------------------------------
# 6, 7. connection floods under ulimit -n 1024

OPEN_FILES = 1024
HEADER_TIMEOUT_S = 10  # serve's --http-header-timeout and --grpc-handshake-timeout defaults
CLOSE_SLACK_S = 3.0  # how late this script may notice a close (its select loop, a byte due every 2-4 s)


def slowloris_http(ctx, report):
    """serve (and its workers) under ulimit -n 1024, with --flood connections to the HTTP port, each
    sending one byte of a request head that never ends every 2-4 s (reopened when closed), for
    --flood-s, beside the load mix: no normal request fails, every flood connection is closed
    within the header timeout (10 s, plus 3 s for this script to notice), serve's open files stay
    under the limit, its RSS grows by at most --max-rss-growth-mib, and no "Too many open files"
    is logged."""
    serve, model = start_serve(ctx, report, "6-slowloris", open_files=OPEN_FILES)
    flood_and_check(ctx, report, serve, model, [("HTTP", serve.http)], slowloris=True)


def idle_flood_grpc(ctx, report):
    """serve (and its workers) under ulimit -n 1024, with --flood silent connections (no HTTP/2
    preface) to the router's gRPC port and --flood to worker 0's port (reopened when closed), for
    --flood-s, beside the load mix (which needs the router's links to the workers): no normal
    request fails, a generation over gRPC succeeds during the flood, every flood connection is
    closed within the handshake timeout (10 s, plus 3 s), open files stay under the limit (serve
    and the worker), bounded RSS, no "Too many open files"."""
    serve, model = start_serve(ctx, report, "7-idle-grpc", open_files=OPEN_FILES)
    status, text = serve.get("/v1/experts/stats")
    worker_0 = json.loads(text)["worker_addrs"][0] if status == 200 else None
    targets = [("router gRPC", serve.grpc)] + ([("worker 0", worker_0)] if worker_0 else [])
    report.check(worker_0, "worker 0's address from /v1/experts/stats", str(status))
    flood_and_check(ctx, report, serve, model, targets, slowloris=False,
                    during=lambda: generate_over_grpc(ctx, serve, None))


def flood_and_check(ctx, report, serve, model, targets, slowloris, during=None):
    """The floods on `targets` ([(name, addr)]) for --flood-s under the load mix, then the checks."""
    rss = RssSampler(serve.pid)
    time.sleep(0.5)
    baseline = rss.read()
    rss.start()
    fds = FdSampler([serve.pid, *serve.workers().values()]).start()
    load = Load(serve.http, model, ctx.args.concurrency, ctx.args.seed).start()
    floods = [(name, Flood(addr, ctx.args.flood, slowloris, ctx.args.seed + i).start())
              for i, (name, addr) in enumerate(targets)]
    kind = "slowloris" if slowloris else "idle"
    log(f"{report.number}: {ctx.args.flood} {kind} connections to each of {', '.join(n for n, _ in targets)} "
        f"for {ctx.args.flood_s:.0f} s")
    during_result = None
    try:
        time.sleep(ctx.args.flood_s / 2)
        if during:
            during_result = during()
        time.sleep(ctx.args.flood_s / 2)
    finally:
        for _, flood in floods:
            flood.stop(close_within=HEADER_TIMEOUT_S + CLOSE_SLACK_S)
        report.results = load.stop()
        max_rss = rss.stop()
        max_fds = fds.stop()
    report.max_rss_mib = max_rss
    report.rss_growth_mib = None if max_rss is None or baseline is None else max_rss - baseline
    load_fails = failures(report.results)
    report.check(not load_fails, "no normal request failed beside the flood",
                 f"{len(load_fails)} of {len(report.results)}" + (f": {load_fails[0].cause}" if load_fails else ""))
    if during is not None:
        report.check(during_result[0], "a generation over gRPC succeeded during the flood", during_result[1][-160:])
    for name, flood in floods:
        longest = max(flood.lifetimes, default=None)
        report.check(flood.lifetimes and longest <= HEADER_TIMEOUT_S + CLOSE_SLACK_S,
                     f"{name}: every flood connection was closed within the timeout",
                     f"{len(flood.lifetimes)} closed, the longest after {fmt(longest, '.1f')} s; "
                     f"median {fmt(percentile(flood.lifetimes, 50), '.1f')} s")
        report.check(flood.left_open == 0, f"{name}: none left open at the end", f"{flood.left_open}")
        report.notes.append(f"{name}: {flood.opened} flood connections opened ({flood.connect_errors} connects "
                            f"failed), {len(flood.lifetimes)} closed by the server")
    worst = max(max_fds.values(), default=None)
    report.check(worst is not None and worst < OPEN_FILES, f"open files stayed under ulimit -n {OPEN_FILES}",
                 ", ".join(f"pid {pid}: max {n}" for pid, n in max_fds.items()))
    report.check(report.rss_growth_mib is not None and report.rss_growth_mib <= ctx.args.max_rss_growth_mib,
                 f"serve's RSS grew by at most {ctx.args.max_rss_growth_mib} MiB",
                 f"baseline {fmt(baseline, '.0f')} MiB, max {fmt(max_rss, '.0f')} MiB")
    exhausted = log_lines(serve.log_path, r"Too many open files", 3)
    report.check(not exhausted, "no 'Too many open files' in serve's log", "; ".join(exhausted)[:200])
    report.check(wait_until(lambda: serve.get("/health")[0] == 200, 10), "/health 200 after the flood")


# ----------------------------------------------------------------------------
# the registry, in the README's order: (number, title, scenario(ctx, report))

SCENARIOS = [
    (1, "kill -9 a replicated worker", kill_replicated_worker),
    (2, "kill -9 an unreplicated worker", kill_unreplicated_worker),
    (3, "SIGSTOP a worker 10 s", stop_worker),
    (4, "10x overload", overload),
    (5, "malformed requests, API key", malformed_requests),
    (6, "slowloris on HTTP, ulimit -n 1024", slowloris_http),
    (7, "idle flood on gRPC ports, ulimit -n 1024", idle_flood_grpc),
    # The expert pool changing under load (chaoslib/pool.py).
    (8, "rebalance a skewed checkpoint", lambda ctx, report: pool.rebalance_skewed(ctx, report, under_load)),
    (9, "add a worker", lambda ctx, report: pool.add_worker(ctx, report, under_load)),
    (10, "remove a worker", lambda ctx, report: pool.remove_worker(ctx, report, under_load)),
    (11, "restart every worker in turn", lambda ctx, report: pool.rolling_restart(ctx, report, under_load)),
    (12, "kill -9 unreplicated, --self-heal", lambda ctx, report: pool.self_heal(ctx, report, under_load)),
]
