"""A scenario's report (its requests, checks, notes, recovery times, RSS),
and the run's output: one table row per scenario, then each scenario's
checks and error messages, or the same as JSON.
"""

import json
import math
import re
import time

from benchlib import Column, fmt, print_table
from chaoslib.load import OK, failures


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


class Report:
    """One scenario: what it sent and got, what it checked, what it noted."""

    def __init__(self, number, title):
        self.number, self.title = number, title
        self.results = []
        self.checks = []  # (passed, what, detail)
        self.notes = []
        self.recovery = None  # text for the table
        self.recovery_s = {}  # for --json
        self.max_rss_mib = None
        self.rss_growth_mib = None
        self.messages = {}  # a failure's whole message, numbers made generic -> [an example, count]
        self.log_path = None
        self.log_excerpt = []
        self.error = None  # a scenario that could not run
        self.t0 = time.monotonic()
        self.events = {}  # what the scenario did -> when (time.monotonic())

    def write_requests(self, path):
        """Every request as a JSON line (times in s from the scenario's start), after a line of the events."""
        with open(path, "w") as f:
            f.write(json.dumps({"events": {k: round(t - self.t0, 4) for k, t in self.events.items()}}) + "\n")
            for r in sorted(self.results, key=lambda r: r.start):
                f.write(json.dumps({"start": round(r.start - self.t0, 4), "latency": round(r.latency, 4),
                                    "outcome": r.outcome, "status": r.status, "sent": r.label, "cause": r.cause,
                                    "message": r.message, "retry_after": r.retry_after}) + "\n")

    def check(self, passed, what, detail=""):
        self.checks.append((bool(passed), what, detail))
        return passed

    @property
    def passed(self):
        return self.error is None and bool(self.checks) and all(p for p, _, _ in self.checks)

    def causes(self):
        counts = {}
        self.messages = {}
        for r in self.results:
            if r.outcome != OK:
                counts[r.cause] = counts.get(r.cause, 0) + 1
                key = (r.cause.split(":")[0], re.sub(r"\d+", "#", r.message))
                self.messages.setdefault(key, [f"{key[0]}: {r.message}", 0])[1] += 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self):
        failed = failures(self.results)
        p99_all = percentile([r.latency for r in self.results], 99)
        p99_failed = percentile([r.latency for r in failed], 99)
        causes = self.causes()
        return {
            "scenario": self.number,
            "title": self.title,
            "sent": len(self.results),
            "succeeded": len(self.results) - len(failed),
            "failed": len(failed),
            "failed_by_cause": causes,
            "p99_latency_s": p99_all,
            "p99_failed_latency_s": p99_failed,
            "max_failed_latency_s": max((r.latency for r in failed), default=None),
            "max_rss_mib": self.max_rss_mib,
            "rss_growth_mib": self.rss_growth_mib,
            "recovery": self.recovery,
            "recovery_s": self.recovery_s,
            "verdict": "PASS" if self.passed else "FAIL",
            "checks": [{"passed": p, "check": w, "detail": d} for p, w, d in self.checks],
            "notes": self.notes,
            "error": self.error,
            # Each distinct message (numbers aside), one example of it and how many times it came.
            "messages": sorted(([m, n] for m, n in self.messages.values()), key=lambda mn: -mn[1]),
            "serve_log": self.log_path,
            "serve_log_excerpt": self.log_excerpt,
        }


SUMMARY_COLUMNS = [Column(head, align="<") for head in (
    "#", "scenario", "sent", "ok", "not ok, by cause", "p99 all/failed (s)", "max RSS (MiB)", "recovery (s)",
    "verdict")]
MAX_CAUSES = 8  # lines of causes a scenario's row shows


def summary_rows(s):
    """A scenario's row, then one more row per cause beyond the first."""
    causes = [f"{c}: {n}" for c, n in s["failed_by_cause"].items()] or ["-"]
    if len(causes) > MAX_CAUSES:
        rest = sum(list(s["failed_by_cause"].values())[MAX_CAUSES - 1:])
        causes = causes[:MAX_CAUSES - 1] + [f"... {len(causes) - MAX_CAUSES + 1} more causes ({rest})"]
    rss = fmt(s["max_rss_mib"], ".0f")
    if s["rss_growth_mib"] is not None:
        rss += f" (+{s['rss_growth_mib']:.0f})"
    first = [str(s["scenario"]), s["title"], str(s["sent"]), str(s["succeeded"]), causes[0],
             f"{fmt(s['p99_latency_s'])} / {fmt(s['p99_failed_latency_s'])}", rss, s["recovery"] or "-",
             s["verdict"]]
    return [first] + [["", "", "", "", extra, "", "", "", ""] for extra in causes[1:]]


def print_summary_table(summaries):
    print_table(SUMMARY_COLUMNS, [row for s in summaries for row in summary_rows(s)], sep="  ", rule=True)


def print_details(summaries):
    for s in summaries:
        print()
        print(f"{s['scenario']}. {s['title']}: {s['verdict']}")
        if s["error"]:
            print(f"   could not run: {s['error']}")
        for c in s["checks"]:
            print(f"   [{'x' if c['passed'] else ' '}] {c['check']}" + (f": {c['detail']}" if c["detail"] else ""))
        for n in s["notes"]:
            print(f"   - {n}")
        for message, count in s["messages"][:8]:
            print(f"   {count:6d} x {message[:300]}")
        if len(s["messages"]) > 8:
            print(f"   ... and {len(s['messages']) - 8} more distinct messages (--json has them all)")
        if s["verdict"] != "PASS":
            if s["serve_log"]:
                print(f"   serve log: {s['serve_log']}")
            for line in s["serve_log_excerpt"]:
                print(f"   | {line[:400]}")
