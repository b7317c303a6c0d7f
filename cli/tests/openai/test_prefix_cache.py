"""Automatic prefix caching: a repeated or shared prompt prefix is found in
the KV cache (the metrics count it), and the completions are the ones
computed from scratch."""

from conftest import metric, token_ids

PARAMS = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
HITS = "tramontane_router_prefix_cache_hits_tokens_total"
QUERIES = "tramontane_router_prefix_cache_queries_tokens_total"


def test_a_shared_prefix_is_found_and_changes_nothing(client, model, read_metrics):
    shared = token_ids(70, salt=41)
    first_suffix, second_suffix = token_ids(9, salt=42), token_ids(9, salt=43)
    before = read_metrics()
    first = client.completions.create(model=model, prompt=shared + first_suffix, **PARAMS)
    between = read_metrics()
    second = client.completions.create(model=model, prompt=shared + second_suffix, **PARAMS)
    again = client.completions.create(model=model, prompt=shared + first_suffix, **PARAMS)
    after = read_metrics()
    # The first request finds nothing of its own prefix; the second finds the
    # 4 whole blocks (64 tokens) they share, the third its 4 whole blocks
    # of 79 tokens, all but the last token's.
    assert metric(after, QUERIES) - metric(before, QUERIES) == 3 * 79
    assert metric(between, HITS) - metric(before, HITS) == 0
    assert metric(after, HITS) - metric(between, HITS) == 64 + 64
    assert again.choices[0].text == first.choices[0].text
    assert second.choices[0].text
