"""The expert pool's scenarios (8 to 12): the pool changes under load on a
cluster of separate processes (chaoslib/cluster.py) driven through the
router's admin API, as an operator or a pod's preStop hook would.

Each reports the requests sent and failed, the time from the change until
every MoE layer's balancedness (tramontane_router_expert_balancedness_ratio,
over its recent dispatches) is 0.9 or more, or until /health is 200 again,
and the throughput (successful requests per second) in the --warm-s before
the change and the --after-s after it settled.
"""

import os
import signal
import subprocess
import time

from benchlib import fmt
from chaoslib import log
from chaoslib.cluster import Cluster, wait_placement
from chaoslib.load import OK, failures, warm_up
from chaoslib.watch import wait_until

BALANCED = 0.9


def start_cluster(ctx, report, name, experts, router_args=(), model=None):
    cluster = Cluster(ctx.args.bin, model or ctx.args.model, name, ctx.args.log_dir, experts, router_args)
    report.log_path = cluster.log_path
    cluster.wait_healthy()
    model_name = cluster.model_name()
    warm_up(cluster, model_name)
    return cluster, model_name


def throughput(results, start, end):
    """Successful requests per second among those that ended in [start, end)."""
    done = [r for r in results if r.outcome == OK and start <= r.end < end]
    return len(done) / (end - start) if end > start else None


def min_balancedness(values):
    """The least balancedness of the MoE layers in /metrics `values`, or None."""
    found = [v for (name, _), v in values.items() if name == "tramontane_router_expert_balancedness_ratio"]
    return min(found) if found else None


def balanced_at(monitor, since, level=BALANCED):
    """When the monitor first saw every layer at `level` or more after `since` (after a window of
    dispatches over the new placement: at least 1 s later), or None."""
    for t, values in list(monitor.metrics):
        b = min_balancedness(values)
        if t >= since + 1.0 and b is not None and b >= level:
            return t
    return None


def measure(ctx, report, load, monitor, changed_at, settled_at=None):
    """Throughput before (the --warm-s before the change) and after (--after-s from when it
    settled), balancedness before and at the end, into the report."""
    time.sleep(ctx.args.after_s)
    end = time.monotonic()
    settled = settled_at or changed_at
    results = load.snapshot()
    before = throughput(results, changed_at - ctx.args.warm_s, changed_at)
    after = throughput(results, max(settled, end - ctx.args.after_s), end)
    report.recovery_s["throughput_before_rps"] = before
    report.recovery_s["throughput_after_rps"] = after
    report.notes.append(f"throughput {fmt(before)} req/s before, {fmt(after)} req/s after")
    samples = [(t, min_balancedness(v)) for t, v in list(monitor.metrics)]
    first = [b for t, b in samples if t < changed_at and b is not None]
    last = [b for t, b in samples if b is not None]
    report.notes.append(f"least layer balancedness {fmt(first[-1] if first else None)} before, "
                        f"{fmt(last[-1] if last else None)} at the end")


def no_request_failed(report):
    fails = failures(report.results)
    report.check(len(report.results) > 0, "requests were sent", f"{len(report.results)}")
    report.check(not fails, "no request failed", f"{len(fails)} failed")


def time_to_balance(report, monitor, changed_at, timeout):
    at = wait_until(lambda: balanced_at(monitor, changed_at), timeout, step=0.2)
    report.recovery_s["balancedness_0.9"] = None if at is None else at - changed_at
    report.recovery = f"balanced {fmt(report.recovery_s['balancedness_0.9'])}"
    report.check(at is not None, f"every layer's balancedness reached {BALANCED} within {timeout:.0f} s",
                 fmt(report.recovery_s["balancedness_0.9"]) + " s")
    return at


# ----------------------------------------------------------------------------
# 8. a rebalance on a skewed checkpoint


def rebalance_skewed(ctx, report, under_load):
    """A skewed checkpoint (`gen-model --expert-skew 1`: experts 0, 4, 2, 6 the hottest, all on
    worker 0 under round robin) on 2 workers with --spare-slots 1; under load, POST
    /admin/rebalance. No request fails; the layers balance."""
    model = skewed_model(ctx)
    cluster, name = start_cluster(ctx, report, "8-rebalance", ["0,2,4,6", "1,3,5,7"],
                                  ["--spare-slots", "1"], model=model)
    with under_load(ctx, report, cluster, name) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        changed_at = report.events["POST /admin/rebalance"] = time.monotonic()
        status, answer = cluster.admin("POST", "/admin/rebalance")
        log(f"8: rebalance: {status} {answer}")
        report.check(status == 200 and answer.get("moved", 0) > 0, "the rebalance moved experts", f"{answer}")
        at = time_to_balance(report, monitor, changed_at, 30)
        measure(ctx, report, load, monitor, changed_at, at)
    report.notes.append(f"planned balancedness {fmt(answer.get('balancedness_before'))} -> "
                        f"{fmt(answer.get('balancedness_after'))}, {answer.get('moved')} pairs moved")
    no_request_failed(report)


def skewed_model(ctx):
    path = os.path.join(os.path.dirname(ctx.args.model.rstrip("/")) or ".", "chaos-model-skewed")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([ctx.args.bin, "gen-model", "--preset", "tiny", "--expert-skew", "1", "--out", path],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
    return path


# ----------------------------------------------------------------------------
# 9. adding a worker


def add_worker(ctx, report, under_load):
    """2 workers; under load a third (holding every expert) is added (POST /admin/workers) and the
    pool rebalanced over the three. No request fails; the layers balance over three workers."""
    cluster, name = start_cluster(ctx, report, "9-add", ["0,2,4,6", "1,3,5,7"], ["--spare-slots", "1"])
    with under_load(ctx, report, cluster, name) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        worker = cluster.add_worker(f"0-{ctx.experts - 1}")
        changed_at = report.events["POST /admin/workers"] = time.monotonic()
        status, joined = cluster.admin("POST", "/admin/workers", {"address": worker.addr})
        report.check(status == 200 and joined.get("worker") == 2, "the worker joined as worker 2", f"{joined}")
        status, answer = cluster.admin("POST", "/admin/rebalance")
        log(f"9: added {joined}, rebalanced {answer}")
        at = time_to_balance(report, monitor, changed_at, 30)
        measure(ctx, report, load, monitor, changed_at, at)
    values = cluster.metrics()
    pairs = sum(v for (n, labels), v in values.items()
                if n == "tramontane_router_worker_expert_pairs_total" and ("worker", "2") in labels)
    report.check(pairs > 0, "the added worker computes", f"{pairs:.0f} pairs")
    no_request_failed(report)


# ----------------------------------------------------------------------------
# 10. removing a worker


def remove_worker(ctx, report, under_load):
    """3 workers; under load worker 2 is removed (DELETE /admin/workers/2: its experts are copied
    onto the others first), then its process stops. No request fails; the layers balance over the
    two left."""
    experts = [",".join(str(e) for e in range(w, ctx.experts, 3)) for w in range(3)]
    cluster, name = start_cluster(ctx, report, "10-remove", experts, ["--spare-slots", "1"])
    with under_load(ctx, report, cluster, name) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        changed_at = report.events["DELETE /admin/workers/2"] = time.monotonic()
        status, left = cluster.admin("DELETE", "/admin/workers/2")
        report.check(status == 200, "worker 2 left the pool", f"{left}")
        cluster.workers[2].stop(grace_s=5)
        status, answer = cluster.admin("POST", "/admin/rebalance")
        log(f"10: removed {left}, rebalanced {answer}")
        at = time_to_balance(report, monitor, changed_at, 30)
        measure(ctx, report, load, monitor, changed_at, at)
    placement = cluster.placement()
    report.check(all(2 not in on for row in placement["experts"] for on in row),
                 "no expert is placed on worker 2", "")
    no_request_failed(report)


# ----------------------------------------------------------------------------
# 11. restarting every worker, one after another


def rolling_restart(ctx, report, under_load):
    """2 workers, restarted one after another as a StatefulSet update does: the pod's preStop
    (`tramontane admin workers remove I`), SIGTERM, the same worker started again on its address,
    the next once the router has taken it back. No request fails; /health stays 200."""
    cluster, name = start_cluster(ctx, report, "11-rolling", ["0,2,4,6", "1,3,5,7"])
    with under_load(ctx, report, cluster, name) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        changed_at = report.events["update starts"] = time.monotonic()
        for index in range(len(cluster.workers)):
            hook = subprocess.run(
                [ctx.args.bin, "admin", "workers", "remove", str(index)],
                env={**os.environ, "TRAMONTANE_ADMIN_SERVER": f"http://{cluster.admin_addr}",
                     "TRAMONTANE_ADMIN_KEY": "chaos-admin-key"},
                capture_output=True, text=True, timeout=120)
            report.check(hook.returncode == 0, f"worker {index}'s preStop hook", hook.stderr.strip()[-200:])
            cluster.workers[index].stop(grace_s=5)
            cluster.workers[index] = cluster.workers[index].again()
            back = wait_placement(cluster, lambda p, i=index: any(i in on for row in p["experts"] for on in row))
            report.check(back is not None, f"worker {index} rejoined after its restart",
                         f"epoch {back['epoch'] if back else '-'}")
            log(f"11: worker {index} restarted and back")
        done_at = report.events["update done"] = time.monotonic()
        report.recovery_s["update_s"] = done_at - changed_at
        report.recovery = f"update {fmt(done_at - changed_at)}"
        measure(ctx, report, load, monitor, changed_at, done_at)
    down = [t for t, s in monitor.health if t >= changed_at and s != 200]
    report.check(not down, "/health stayed 200", f"{len(down)} non-200 polls")
    no_request_failed(report)


# ----------------------------------------------------------------------------
# 12. kill -9 of an unreplicated worker, --self-heal


def self_heal(ctx, report, under_load):
    """2 workers, no replica, router --self-heal; under load kill -9 worker 1 (and nothing starts it
    again): the router copies its experts onto worker 0 and serves again. The requests in flight
    on worker 1 may fail (a 503 naming it); /health is 200 again and requests succeed within 5 s."""
    cluster, name = start_cluster(ctx, report, "12-self-heal", ["0,2,4,6", "1,3,5,7"], ["--self-heal"])
    with under_load(ctx, report, cluster, name) as (load, monitor):
        time.sleep(ctx.args.warm_s)
        victim = cluster.workers[1]
        killed_at = report.events["kill -9 worker 1"] = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        healed = wait_placement(cluster, lambda p: all(on == [0] for row in p["experts"] for on in row), 30)
        healed_at = report.events["healed"] = time.monotonic()
        first_ok = wait_until(
            lambda: min((r.end for r in load.snapshot() if r.outcome == OK and r.start >= healed_at), default=None),
            30)
        measure(ctx, report, load, monitor, killed_at, healed_at)
    up = [t for t, s in monitor.health if t >= killed_at and s == 200]
    down = [t for t, s in monitor.health if t >= killed_at and s != 200]
    health_back = min((t for t in up if not down or t > max(down)), default=None)
    serving = max(x for x in (health_back, first_ok) if x is not None) if health_back and first_ok else None
    report.recovery_s["healed_s"] = healed_at - killed_at if healed else None
    report.recovery_s["serving_again_s"] = None if serving is None else serving - killed_at
    report.recovery = f"healed {fmt(report.recovery_s['healed_s'])} / serving {fmt(report.recovery_s['serving_again_s'])}"
    report.check(healed is not None, "worker 0 holds every expert", f"epoch {healed['epoch'] if healed else '-'}")
    report.check(serving is not None and serving - killed_at <= 5.0,
                 "/health 200 and requests succeeding within 5 s of the kill",
                 fmt(report.recovery_s["serving_again_s"]) + " s")
    fails = failures(report.results)
    late = [r for r in fails if r.start >= healed_at]
    report.check(not late, "no request sent after the heal failed", f"{len(late)} of {len(fails)} failures")
    report.notes.append(f"{len(fails)} requests failed (in flight on worker 1, or sent before the heal)")
