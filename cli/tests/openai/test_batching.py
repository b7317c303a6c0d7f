"""Batch invariance: a request's greedy text does not depend on what shares its batch."""

import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import histogram_bucket, metric, token_ids

CONCURRENT = 16
PROMPTS = [token_ids(3 + 3 * i, salt=i) for i in range(CONCURRENT)]  # 3..48 tokens
PARAMS = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
SIZES = "tramontane_router_batch_size"


def generate(client, model, prompt) -> str:
    completion = client.completions.create(model=model, prompt=prompt, **PARAMS)
    assert completion.usage.completion_tokens == 12
    return completion.choices[0].text


def shared_steps(before: dict, after: dict) -> tuple[float, float]:
    """(forward steps, sequences beyond one per step) observed between two scrapes.

    Each step observes its number of sequences, so sum - count grows exactly
    when some step ran two sequences or more."""
    steps = metric(after, f"{SIZES}_count") - metric(before, f"{SIZES}_count")
    sequences = metric(after, f"{SIZES}_sum") - metric(before, f"{SIZES}_sum")
    return steps, sequences - steps


def test_concurrent_requests_share_batches_and_keep_their_text(client, model, read_metrics):
    start = read_metrics()
    alone = [generate(client, model, prompt) for prompt in PROMPTS]
    assert len(set(alone)) > 1, "different prompts should give different texts"
    steps, extra = shared_steps(start, read_metrics())
    assert steps >= CONCURRENT * 12 / 2, "the batch size histogram did not count the steps"
    assert extra == 0, "one request at a time, yet a step ran several sequences"

    before = read_metrics()
    # All threads send at once, so the requests arrive together.
    barrier = threading.Barrier(CONCURRENT)

    def send(prompt):
        barrier.wait()
        return generate(client, model, prompt)

    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        together = list(pool.map(send, PROMPTS))
    after = read_metrics()

    for i, (one, batched) in enumerate(zip(alone, together)):
        assert batched == one, f"prompt {i} ({len(PROMPTS[i])} tokens) changed when batched"
    steps, extra = shared_steps(before, after)
    assert steps > 0
    assert extra > 0, "no forward step ran more than one sequence: nothing was batched"

    # The histogram's buckets agree: some observations landed above le="1".
    def above_one(samples):
        return metric(samples, f"{SIZES}_count") - histogram_bucket(samples, SIZES, 1.0)

    assert above_one(after) > above_one(before)


def test_seeded_sampling_is_batch_invariant(client, model):
    prompts = PROMPTS[:8]
    params = dict(max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})

    def sample(i):
        completion = client.completions.create(
            model=model, prompt=prompts[i], seed=100 + i, **params
        )
        return completion.choices[0].text

    alone = [sample(i) for i in range(len(prompts))]
    barrier = threading.Barrier(len(prompts))

    def send(i):
        barrier.wait()
        return sample(i)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(send, range(len(prompts))))
    assert together == alone
