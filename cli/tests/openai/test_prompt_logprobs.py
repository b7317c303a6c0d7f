"""The prompt's own logprobs: `echo` (with `logprobs`, `max_tokens` 0 or more),
as evaluation harnesses send it for loglikelihoods, and vLLM's `prompt_logprobs`."""

import math

from conftest import token_ids

PROMPT_IDS = token_ids(21, salt=3)
IGNORE_EOS = {"ignore_eos": True}


def assert_logprob(value):
    assert isinstance(value, float) and math.isfinite(value) and value <= 0.0, value


def test_echo_with_max_tokens_0_scores_only_the_prompt(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT_IDS, echo=True, max_tokens=0, logprobs=2
    )
    [choice] = completion.choices
    assert completion.usage.completion_tokens == 0
    assert completion.usage.prompt_tokens == len(PROMPT_IDS)
    assert choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(PROMPT_IDS)
    assert len(logprobs.token_logprobs) == len(PROMPT_IDS)
    assert len(logprobs.text_offset) == len(PROMPT_IDS)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for value, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert_logprob(value)
        assert 1 <= len(top) <= 2
        # The most likely alternative is at least as likely as the token.
        assert max(top.values()) >= value
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert choice.text


def test_echo_prepends_the_prompt_to_the_completion(client, model):
    params = dict(max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    plain = client.completions.create(model=model, prompt="The sea", logprobs=1, **params)
    echoed = client.completions.create(model=model, prompt="The sea", echo=True, logprobs=1, **params)
    [plain_choice], [echoed_choice] = plain.choices, echoed.choices
    assert echoed_choice.text == "The sea" + plain_choice.text
    # The prompt's tokens first (the first without a logprob), then the completion's.
    tokens = echoed_choice.logprobs.tokens
    assert len(tokens) == plain.usage.prompt_tokens + 5
    assert tokens[-5:] == plain_choice.logprobs.tokens
    assert echoed_choice.logprobs.token_logprobs[-5:] == plain_choice.logprobs.token_logprobs
    assert echoed_choice.logprobs.token_logprobs[0] is None
    for value in echoed_choice.logprobs.token_logprobs[1:]:
        assert_logprob(value)
    assert echoed.usage.completion_tokens == 5


def test_streamed_echo_equals_the_whole_one(client, model):
    params = dict(prompt=PROMPT_IDS, echo=True, max_tokens=6, temperature=0, logprobs=1,
                  extra_body=IGNORE_EOS)
    whole = client.completions.create(model=model, **params).choices[0]
    chunks = list(client.completions.create(model=model, stream=True, **params))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


def test_vllm_prompt_logprobs_name_each_token_with_its_rank(http, model):
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 0, "prompt_logprobs": 3}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(PROMPT_IDS)
    assert entries[0] is None
    for token, entry in zip(PROMPT_IDS[1:], entries[1:]):
        own = entry[str(token)]
        assert_logprob(own["logprob"])
        assert own["rank"] >= 1
        assert sorted(e["rank"] for e in entry.values())[:3] == [1, 2, 3], entry
        best = min(entry.values(), key=lambda e: e["rank"])
        assert best["logprob"] >= own["logprob"]
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())


def test_prompt_logprobs_agree_with_generation(http, client, model):
    """The most likely next token at the prompt's last position is what greedy
    decoding generates there, with about the same logprob."""
    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": 0, "prompt_logprobs": 1}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    last = response.json()["choices"][0]["prompt_logprobs"][-1]
    best = min(last.values(), key=lambda e: e["rank"])
    generated = client.completions.create(
        model=model, prompt=PROMPT_IDS[:-1], max_tokens=1, temperature=0, logprobs=1,
        extra_body=IGNORE_EOS,
    ).choices[0]
    assert generated.logprobs.tokens[0] == best["decoded_token"]
    # Prefill and decode round differently in bf16: close, not equal.
    assert abs(generated.logprobs.token_logprobs[0] - best["logprob"]) < 0.05


def test_several_prompts_are_scored_each(client, model):
    prompts = [token_ids(5, salt=s) for s in (1, 2)]
    completion = client.completions.create(
        model=model, prompt=prompts, echo=True, max_tokens=0, logprobs=0
    )
    assert [len(c.logprobs.tokens) for c in completion.choices] == [5, 5]
    alone = client.completions.create(
        model=model, prompt=prompts[1], echo=True, max_tokens=0, logprobs=0
    )
    together = completion.choices[1].logprobs.token_logprobs
    assert together[0] is None and alone.choices[0].logprobs.token_logprobs[0] is None
    # In one batch or alone: the same up to bf16's rounding.
    for got, want in zip(together[1:], alone.choices[0].logprobs.token_logprobs[1:]):
        assert abs(got - want) < 0.05, (got, want)
