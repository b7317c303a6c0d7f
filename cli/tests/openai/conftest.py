"""Fixtures for the OpenAI-compatible HTTP API tests.

The suite runs against a live `tramontane serve`: TRAMONTANE_HTTP is its HTTP
address (`host:port`), TRAMONTANE_MODEL_NAME the served model name. The model
is expected to be the tiny generated one (random weights, real Mistral
tokenizer): text is gibberish but deterministic.
"""

import os
import re
from collections.abc import Callable

import openai
import pytest

try:  # openai>=3 ships httpx2, earlier releases httpx; the API is the same.
    import httpx2 as httpx
except ImportError:
    import httpx

# Long enough for a slow CPU under load; nothing here asserts on time.
TIMEOUT_S = 120.0
# Token ids of ordinary word pieces: no special (0..2) or byte (3..258) tokens.
FIRST_WORD_ID = 1000


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: these tests need a running `tramontane serve` "
            "(TRAMONTANE_HTTP=host:port, TRAMONTANE_MODEL_NAME=served name)",
            returncode=4,
        )
    return value


@pytest.fixture(scope="session")
def http_addr() -> str:
    return _env("TRAMONTANE_HTTP")


@pytest.fixture(scope="session")
def base_url(http_addr: str) -> str:
    """The server's root, for raw requests: `http://host:port`."""
    return f"http://{http_addr}"


@pytest.fixture(scope="session")
def model() -> str:
    return _env("TRAMONTANE_MODEL_NAME")


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    # No retries: a 429 or 5xx must show up as a failure, not be retried away.
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="session")
def http(base_url: str):
    """A raw HTTP client rooted at the server (`http.post("/v1/completions", ...)`)."""
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as raw:
        yield raw


@pytest.fixture(scope="session")
def max_model_len(http) -> int:
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    return int(response.json()["data"][0]["max_model_len"])


def token_ids(length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of `length` ordinary token ids; `salt` varies it."""
    return [FIRST_WORD_ID + (97 * i + 7919 * salt) % 30000 for i in range(length)]


# name{labels} value [timestamp]; label values may hold spaces and escaped quotes.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_key(name: str, labels: dict[str, str] | None = None) -> str:
    """The key `parse_metrics` uses: `name` or `name{a="x",b="y"}` (labels sorted)."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}, labels sorted by name."""
    samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"unparsable metrics line: {line!r}"
        name, labels, value, _timestamp = match.groups()
        pairs = dict(_LABEL.findall(labels or ""))
        samples[metric_key(name, pairs)] = float(value)
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """A sample by bare name (no labels), failing clearly when it is missing."""
    assert name in samples, f"{name} missing from /metrics: {sorted(samples)}"
    return samples[name]


def histogram_bucket(samples: dict[str, float], name: str, le: float) -> float:
    """The cumulative count of `name`'s bucket with upper bound `le` (`le="1"` or `"1.0"`)."""
    prefix = f"{name}_bucket{{"
    for key, value in samples.items():
        if key.startswith(prefix):
            bound = dict(_LABEL.findall(key[len(prefix) - 1 :])).get("le")
            if bound is not None and float(bound) == le:
                return value
    raise AssertionError(f'{name}_bucket{{le="{le:g}"}} missing from /metrics')


@pytest.fixture
def read_metrics(http) -> Callable[[], dict[str, float]]:
    """Fetches and parses /metrics now."""

    def read() -> dict[str, float]:
        response = http.get("/metrics")
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)

    return read


def assert_error_body(response, status: int) -> dict:
    """`response` is an OpenAI error: `status`, {"error": {message, type, param, code}}."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_api_error(err: openai.APIStatusError, status: int) -> dict:
    """An error raised by the openai client: the status and the OpenAI error body."""
    assert err.status_code == status, (err.status_code, err.response.text)
    return assert_error_body(err.response, status)


def assert_serving(client: openai.OpenAI, model: str) -> None:
    """A good request still succeeds (after a bad one)."""
    completion = client.completions.create(
        model=model,
        prompt=token_ids(4),
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"
