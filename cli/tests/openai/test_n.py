"""`n` > 1: several choices per prompt on both endpoints, numbered as OpenAI
numbers them, each its own sequence (seeded choices differ and repeat), the
prompt counted once in the usage."""

from conftest import token_ids

IGNORE_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Tell me about the north wind"}]


def test_seeded_choices_differ_and_repeat(client, model):
    params = dict(model=model, prompt=token_ids(40, salt=5), n=3, max_tokens=12,
                  temperature=1.0, seed=11, extra_body=IGNORE_EOS)
    first = client.completions.create(**params)
    again = client.completions.create(**params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3, texts
    assert [c.text for c in again.choices] == texts
    assert first.usage.prompt_tokens == 40
    assert first.usage.completion_tokens == 3 * 12


def test_choices_of_several_prompts_are_numbered_prompt_by_prompt(client, model):
    prompts = [token_ids(20, salt=6), token_ids(20, salt=7)]
    completion = client.completions.create(
        model=model, prompt=prompts, n=2, max_tokens=6, temperature=0, extra_body=IGNORE_EOS
    )
    texts = [c.text for c in sorted(completion.choices, key=lambda c: c.index)]
    assert len(texts) == 4
    # Greedy: a prompt's choices agree; the two prompts' do not.
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert texts[0] != texts[2]
    assert completion.usage.prompt_tokens == 40


def test_chat_gives_n_choices_whole_and_streamed(client, model):
    params = dict(model=model, messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=3,
                  extra_body=IGNORE_EOS)
    whole = client.chat.completions.create(**params)
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in whole.choices)
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **params):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in whole.choices]
