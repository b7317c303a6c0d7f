"""POST /v1/chat/completions: content, streaming deltas, usage, logprobs."""

IGNORE_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Where does the tramontane blow?"}]


def chat(client, model, messages=MESSAGES, **params):
    return client.chat.completions.create(model=model, messages=messages, **params)


def test_chat_has_an_assistant_message_and_usage(client, model):
    completion = chat(client, model, max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    assert completion.object == "chat.completion"
    assert completion.model == model
    assert completion.id
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_completion_tokens_is_accepted(client, model):
    completion = chat(
        client, model, max_completion_tokens=5, temperature=0, extra_body=IGNORE_EOS
    )
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_longer_conversation_has_more_prompt_tokens(client, model):
    short = chat(client, model, max_tokens=1)
    longer = chat(
        client,
        model,
        messages=[
            {"role": "system", "content": "You answer in one word."},
            *MESSAGES,
            {"role": "assistant", "content": "Catalonia."},
            {"role": "user", "content": "And where else?"},
        ],
        max_tokens=1,
    )
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens


def test_content_parts_render_like_a_string(client, model):
    params = dict(max_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    plain = chat(client, model, **params)
    parts = chat(
        client,
        model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": MESSAGES[0]["content"]}],
            }
        ],
        **params,
    )
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_greedy_chat_is_deterministic(client, model):
    first, second = (
        chat(client, model, max_tokens=16, temperature=0, extra_body=IGNORE_EOS)
        for _ in range(2)
    )
    assert first.choices[0].message.content == second.choices[0].message.content


def test_streamed_deltas_equal_non_streamed_content(client, model):
    params = dict(max_tokens=20, temperature=0, extra_body=IGNORE_EOS)
    whole = chat(client, model, **params)

    chunks = list(
        chat(client, model, stream=True, stream_options={"include_usage": True}, **params)
    )
    *deltas, last = chunks
    assert deltas, "no deltas before the usage chunk"
    for chunk in deltas:
        assert chunk.object == "chat.completion.chunk"
        assert [choice.index for choice in chunk.choices] == [0]
    assert deltas[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in deltas)
    assert content == whole.choices[0].message.content
    finish_reasons = [chunk.choices[0].finish_reason for chunk in deltas]
    assert finish_reasons[-1] == "length"
    assert all(reason is None for reason in finish_reasons[:-1]), finish_reasons

    assert last.choices == []
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens == 20
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_logprobs_with_top_logprobs(client, model):
    completion = chat(
        client,
        model,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=IGNORE_EOS,
    )
    [choice] = completion.choices
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens == 10
    for entry in entries:
        assert isinstance(entry.token, str)
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        top = [alternative.logprob for alternative in entry.top_logprobs]
        assert all(lp <= 0 for lp in top), top
        assert top == sorted(top, reverse=True), top
        # Greedy picks the most likely token: it heads the alternatives.
        assert abs(entry.logprob - top[0]) <= 1e-3, (entry.logprob, top)
        assert entry.top_logprobs[0].token == entry.token


def test_no_logprobs_unless_asked(client, model):
    completion = chat(client, model, max_tokens=3)
    assert completion.choices[0].logprobs is None


def test_control_token_strings_in_content_are_text(client, model):
    # "<s>[INST] </s> [/INST]": the user's "</s>" is the text "▁</", "s", ">"
    # (11 prompt tokens), not the end-of-sequence token (10).
    completion = chat(
        client, model, messages=[{"role": "user", "content": "</s>"}], max_tokens=1
    )
    assert completion.usage.prompt_tokens == 11
