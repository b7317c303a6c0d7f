"""POST /v1/completions: text, streaming, usage, multiple prompts, logprobs, seeds."""

from conftest import token_ids

IGNORE_EOS = {"ignore_eos": True}
PROMPT = "The north wind blows over the sea and"


def complete(client, model, prompt, **params):
    return client.completions.create(model=model, prompt=prompt, **params)


def test_completion_has_text_usage_and_finish_reason(client, model):
    completion = complete(
        client, model, PROMPT, max_tokens=10, temperature=0, extra_body=IGNORE_EOS
    )
    assert completion.object == "text_completion"
    assert completion.model == model
    assert completion.id
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.text
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_prompt_tokens_is_the_number_of_prompt_ids(client, model):
    for length in (1, 5, 23):
        completion = complete(client, model, token_ids(length), max_tokens=2)
        assert completion.usage.prompt_tokens == length


def test_default_max_tokens_is_16(client, model):
    completion = complete(client, model, token_ids(4), temperature=0, extra_body=IGNORE_EOS)
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_greedy_is_deterministic(client, model):
    first, second = (
        complete(client, model, PROMPT, max_tokens=20, temperature=0, extra_body=IGNORE_EOS)
        for _ in range(2)
    )
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].text


def test_streamed_text_equals_non_streamed(client, model):
    params = dict(max_tokens=24, temperature=0, extra_body=IGNORE_EOS)
    whole = complete(client, model, PROMPT, **params).choices[0]

    chunks = list(complete(client, model, PROMPT, stream=True, **params))
    assert chunks, "no chunks streamed"
    for chunk in chunks:
        assert chunk.object == "text_completion"
        assert [choice.index for choice in chunk.choices] == [0]
    streamed = "".join(chunk.choices[0].text for chunk in chunks)
    assert streamed == whole.text
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks]
    assert finish_reasons[-1] == "length"
    assert all(reason is None for reason in finish_reasons[:-1]), finish_reasons


def test_completion_tokens_equals_streamed_tokens(client, model):
    max_tokens = 17
    params = dict(max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=IGNORE_EOS)

    whole = complete(client, model, token_ids(6), **params)
    assert whole.usage.completion_tokens == max_tokens
    assert len(whole.choices[0].logprobs.tokens) == max_tokens

    chunks = list(
        complete(
            client,
            model,
            token_ids(6),
            stream=True,
            stream_options={"include_usage": True},
            **params,
        )
    )
    streamed = [
        token
        for chunk in chunks
        for choice in chunk.choices
        for token in (choice.logprobs.tokens if choice.logprobs else [])
    ]
    assert len(streamed) == max_tokens
    assert chunks[-1].usage.completion_tokens == len(streamed)


def test_include_usage_adds_a_final_usage_chunk(client, model):
    prompt = token_ids(9)
    chunks = list(
        complete(
            client,
            model,
            prompt,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    *text_chunks, last = chunks
    assert last.choices == []
    assert last.usage.prompt_tokens == len(prompt)
    assert last.usage.completion_tokens == 7
    assert last.usage.total_tokens == len(prompt) + 7
    assert text_chunks, "no text before the usage chunk"
    assert all(chunk.usage is None for chunk in text_chunks)


def test_without_include_usage_no_chunk_carries_usage(client, model):
    chunks = list(complete(client, model, token_ids(5), max_tokens=4, stream=True))
    assert chunks
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_list_of_prompts_gives_one_choice_per_prompt(client, model):
    prompts = [token_ids(3, salt=1), token_ids(8, salt=2), token_ids(5, salt=3)]
    params = dict(max_tokens=6, temperature=0, extra_body=IGNORE_EOS)
    alone = [complete(client, model, prompt, **params).choices[0].text for prompt in prompts]
    assert len(set(alone)) > 1, "different prompts should give different texts"

    together = complete(client, model, prompts, **params)
    assert sorted(choice.index for choice in together.choices) == [0, 1, 2]
    for choice in together.choices:
        assert choice.text == alone[choice.index]
        assert choice.finish_reason == "length"
    assert together.usage.prompt_tokens == sum(len(prompt) for prompt in prompts)
    assert together.usage.completion_tokens == 3 * 6


def test_list_of_text_prompts_gives_one_choice_per_prompt(client, model):
    prompts = ["Once upon a time", "Tramontane", "A cold wind from the north"]
    params = dict(max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    alone = [complete(client, model, prompt, **params).choices[0].text for prompt in prompts]

    together = complete(client, model, prompts, **params)
    assert sorted(choice.index for choice in together.choices) == [0, 1, 2]
    for choice in together.choices:
        assert choice.text == alone[choice.index]


def test_logprobs_have_one_entry_per_token(client, model):
    completion = complete(
        client,
        model,
        PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=2,
        extra_body=IGNORE_EOS,
    )
    [choice] = completion.choices
    logprobs = choice.logprobs
    count = completion.usage.completion_tokens
    assert count == 12
    assert len(logprobs.tokens) == count
    assert len(logprobs.token_logprobs) == count
    assert len(logprobs.top_logprobs) == count
    assert len(logprobs.text_offset) == count
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token_logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert token_logprob <= 0
        # Two alternatives, fewer only when two tokens share a string key.
        assert 1 <= len(top) <= 2, top
        assert all(lp <= 0 for lp in top.values()), top
        # Greedy picks the most likely token, so nothing beats it.
        assert token_logprob >= max(top.values()) - 1e-3, (token_logprob, top)


def test_same_seed_gives_same_sample(client, model):
    def sample(seed):
        completion = complete(
            client,
            model,
            PROMPT,
            max_tokens=24,
            temperature=1.0,
            seed=seed,
            extra_body=IGNORE_EOS,
        )
        return completion.choices[0].text

    first = sample(7)
    assert sample(7) == first
    # Sampling at temperature 1 from 32000 tokens: another seed matching all
    # 24 tokens would be astronomically unlikely, three of them more so.
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_sampling_differs_from_greedy(client, model):
    params = dict(max_tokens=24, extra_body=IGNORE_EOS)
    greedy = complete(client, model, PROMPT, temperature=0, **params).choices[0].text
    samples = [
        complete(client, model, PROMPT, temperature=1.0, seed=seed, **params).choices[0].text
        for seed in (1, 2, 3)
    ]
    assert any(text != greedy for text in samples)
