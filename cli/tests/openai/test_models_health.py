"""GET /v1/models, /health and /metrics: what a client or a scraper sees first."""

from conftest import histogram_bucket, metric


def test_models_lists_the_served_name(client, model):
    models = client.models.list().data
    assert [entry.id for entry in models] == [model]
    [entry] = models
    assert entry.object == "model"
    assert entry.owned_by == "tramontane"
    assert isinstance(entry.created, int)


def test_models_gives_the_context_length(http, model):
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    [entry] = body["data"]
    assert entry["id"] == model
    assert isinstance(entry["max_model_len"], int) and entry["max_model_len"] > 0


def test_health_is_ok(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_metrics_exposes_the_router_gauges_and_histograms(read_metrics):
    samples = read_metrics()
    for gauge in (
        "tramontane_router_running_requests",
        "tramontane_router_waiting_requests",
        "tramontane_router_kv_cache_used_tokens",
        "tramontane_router_kv_cache_total_tokens",
    ):
        assert metric(samples, gauge) >= 0
    assert metric(samples, "tramontane_router_kv_cache_total_tokens") > 0
    for histogram in ("tramontane_router_batch_size", "tramontane_router_batch_tokens"):
        count = metric(samples, f"{histogram}_count")
        assert metric(samples, f"{histogram}_sum") >= 0
        assert histogram_bucket(samples, histogram, float("inf")) == count


def test_metrics_count_a_request(client, model, read_metrics):
    before = read_metrics()
    client.completions.create(
        model=model, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    after = read_metrics()
    for histogram in ("tramontane_router_batch_size", "tramontane_router_batch_tokens"):
        grown = metric(after, f"{histogram}_count") - metric(before, f"{histogram}_count")
        assert grown >= 4, f"{histogram} counted {grown} steps for 4 tokens"
