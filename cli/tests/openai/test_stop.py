"""Stop strings: the output ends right before the first occurrence, finish_reason "stop"."""

import pytest

PROMPT = "The north wind blows over the sea and"
MAX_TOKENS = 48
# Greedy and ignoring EOS: the same request always generates the same text, so
# a rerun with a stop string must reproduce it up to the stop.
GREEDY = dict(max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})


def pick_stop(text: str, start: int, length: int = 4) -> str:
    """A substring of `text` from about `start`, first occurring there (not at
    0), without whitespace or replacement characters, so that it means the
    same however the text is split into tokens."""
    for i in range(max(start, 1), len(text) - length + 1):
        candidate = text[i : i + length]
        if (
            not any(ch.isspace() or ch == "\ufffd" for ch in candidate)
            and text.find(candidate) == i
        ):
            return candidate
    pytest.fail(f"no usable stop string after {start} in {text!r}")


@pytest.fixture(scope="module")
def generated(client, model) -> str:
    completion = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert completion.choices[0].finish_reason == "length"
    text = completion.choices[0].text
    assert len(text) >= 20, f"too little text to pick stop strings from: {text!r}"
    return text


def test_stop_string_cuts_before_its_first_occurrence(client, model, generated):
    stop = pick_stop(generated, len(generated) // 2)
    expected = generated[: generated.find(stop)]

    completion = client.completions.create(model=model, prompt=PROMPT, stop=[stop], **GREEDY)
    [choice] = completion.choices
    assert choice.text == expected, (stop, generated)
    assert choice.finish_reason == "stop"
    assert completion.usage.completion_tokens < MAX_TOKENS


def test_streamed_stop_gives_the_same_text(client, model, generated):
    stop = pick_stop(generated, len(generated) // 2)
    expected = generated[: generated.find(stop)]

    chunks = list(
        client.completions.create(model=model, prompt=PROMPT, stop=stop, stream=True, **GREEDY)
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected, (stop, generated)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_earliest_of_several_stops_wins(client, model, generated):
    early = pick_stop(generated, len(generated) // 4)
    late = pick_stop(generated, generated.find(early) + len(early) + 1)
    assert generated.find(early) < generated.find(late)

    completion = client.completions.create(
        model=model, prompt=PROMPT, stop=[late, early], **GREEDY
    )
    assert completion.choices[0].text == generated[: generated.find(early)]
    assert completion.choices[0].finish_reason == "stop"


def test_stop_string_that_never_appears_changes_nothing(client, model, generated):
    absent = "\u2603 no such text \u2603"
    assert absent not in generated

    completion = client.completions.create(model=model, prompt=PROMPT, stop=absent, **GREEDY)
    assert completion.choices[0].text == generated
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == MAX_TOKENS


def test_chat_stop_string(client, model):
    messages = [{"role": "user", "content": "Say something about the wind."}]
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    content = whole.choices[0].message.content
    assert len(content) >= 20, content
    stop = pick_stop(content, len(content) // 2)

    cut = client.chat.completions.create(
        model=model, messages=messages, stop=[stop], **GREEDY
    )
    assert cut.choices[0].message.content == content[: content.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
