"""The samples of a /metrics answer (Prometheus text exposition format 0.0.4),
and sums over their series.

A sample line is `name{label="value",...} value [timestamp]`; label values
may hold `\\"`, `\\\\` and `\\n` escapes (and so `}` or `,`). Comments (`#
HELP`, `# TYPE`) and blank lines carry no samples. A histogram `h` comes as
the series `h_bucket{le="..."}`, `h_sum` and `h_count`.

A small parser rather than prometheus_client's: the benches read a few
counters and histogram sums, and need no new dependency for that.
"""

import re

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
ESCAPE = re.compile(r"\\(.)")
UNESCAPED = {"n": "\n"}  # `\\` and `\"` stand for the character itself


def parse_labels(text):
    """((name, value), ...) sorted by name, or None when `text` is not a label list."""
    labels, at = [], 0
    while text[at:].strip():
        match = LABEL.match(text, at)
        if match is None:
            return None
        value = ESCAPE.sub(lambda m: UNESCAPED.get(m.group(1), m.group(1)), match.group(2))
        labels.append((match.group(1), value))
        at = match.end()
    return tuple(sorted(labels))


def parse_samples(text):
    """{(name, labels): value} of every sample in `text`; lines that are not one are skipped."""
    samples = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = SAMPLE.fullmatch(line)
        if match is None:
            continue
        labels = parse_labels(match.group(2) or "")
        try:
            value = float(match.group(3))  # also NaN, +Inf, -Inf
        except ValueError:
            continue
        if labels is not None:
            samples[(match.group(1), labels)] = value
    return samples


def sample_sum(samples, name, **labels):
    """The sum over the series of `name` that carry every label given (values compared as text);
    0 when there is none."""
    wanted = {(key, str(value)) for key, value in labels.items()}
    return sum(value for (series, series_labels), value in samples.items()
               if series == name and wanted <= set(series_labels))
