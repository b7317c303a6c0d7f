"""The chaos run's parts (benches/chaos.py is its command line and runner).

Layout:
- `scenarios.py`: the scenarios, one function each, and `SCENARIOS`,
  their registry in the README's order;
- `pool.py`: the expert pool's scenarios (rebalance, workers added,
  removed, restarted in turn, lost with --self-heal) on `cluster.py`'s
  separate worker and router processes, driven through the admin API;
- `serve.py`: one `tramontane serve` and its worker processes;
- `load.py`: the load mix (threads of completions and chat completions) and
  what each request's outcome was;
- `watch.py`: what runs beside the load: /health and /metrics timelines,
  serve's RSS, the host's accept-queue overflows;
- `malformed.py`: scenario 5's malformed requests and gRPC garbage;
- `report.py`: a scenario's checks and results, the table and the details.
"""

import sys


def log(message):
    """A progress line on stderr (stdout carries the table or the JSON)."""
    print(f"[chaos] {message}", file=sys.stderr, flush=True)
