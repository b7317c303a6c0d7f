"""What every bench script shares: starting a `tramontane` server and reading
where it listens, waiting for it to be healthy and stopping it
(`process.py`); reading /metrics (`prometheus.py`); printing a table
(`table.py`).

The scripts run as `python benches/NAME.py`, which puts benches/ on
sys.path, so they `import benchlib` with no install.
"""

from benchlib.process import (
    CommandFailed,
    Process,
    StartError,
    get,
    run_json,
    split_addr,
    start,
    wait_healthy,
)
from benchlib.prometheus import parse_samples, sample_sum
from benchlib.table import Column, fmt, format_table, print_table

__all__ = [
    "Column",
    "CommandFailed",
    "Process",
    "StartError",
    "fmt",
    "format_table",
    "get",
    "parse_samples",
    "print_table",
    "run_json",
    "sample_sum",
    "split_addr",
    "start",
    "wait_healthy",
]
