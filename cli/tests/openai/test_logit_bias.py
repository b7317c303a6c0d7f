"""`logit_bias` (token id -> bias in [-100, 100], at most 300 entries) and
unknown fields (ignored, as vLLM ignores them)."""

import openai
import pytest

from conftest import assert_api_error, assert_serving, token_ids

IGNORE_EOS = {"ignore_eos": True}
# "▁Hi" in the Mistral vocabulary: a whole word, so the text shows it.
HI = 15359


def test_a_bias_of_100_makes_greedy_decoding_pick_that_token(client, model):
    completion = client.completions.create(
        model=model,
        prompt=token_ids(6),
        max_tokens=5,
        temperature=0,
        logprobs=1,
        logit_bias={str(HI): 100},
        extra_body=IGNORE_EOS,
    )
    [choice] = completion.choices
    assert choice.text.split() == ["Hi"] * 5, choice.text
    # The logprobs are the model's own, before the bias: a random model
    # does not put "Hi" at probability 1.
    assert all(lp < -1e-3 for lp in choice.logprobs.token_logprobs), choice.logprobs
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something"}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(HI): 100},
        extra_body=IGNORE_EOS,
    )
    assert chat.choices[0].message.content.split() == ["Hi"] * 3


def test_a_bias_of_zero_or_none_changes_nothing(client, model):
    params = dict(
        model=model, prompt=token_ids(6), max_tokens=8, temperature=0, extra_body=IGNORE_EOS
    )
    plain = client.completions.create(**params).choices[0].text
    zero = client.completions.create(logit_bias={str(HI): 0, "5": 0}, **params)
    assert zero.choices[0].text == plain


@pytest.mark.parametrize(
    "bias",
    [
        {str(i): 1 for i in range(301)},
        {str(i): 1 for i in range(50_000)},
        {str(HI): 100.5},
        {str(HI): -101},
        {"hi": 1},
        {"-1": 1},
        {"32000": 1},
    ],
    ids=[
        "301 entries",
        "50000 entries",
        "above 100",
        "below -100",
        "not an id",
        "negative",
        "past the vocabulary",
    ],
)
def test_out_of_range_logit_bias_is_400_naming_it(client, model, bias):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="Hello", max_tokens=2, logit_bias=bias)
    assert assert_api_error(raised.value, 400)["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            logit_bias=bias,
        )
    assert assert_api_error(raised.value, 400)["param"] == "logit_bias"
    assert_serving(client, model)


def test_a_bias_that_is_not_a_number_is_400_naming_it(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(
            model=model, prompt="Hello", max_tokens=2, logit_bias={"5": "up"}
        )
    assert assert_api_error(raised.value, 400)["param"] == "logit_bias"
    assert_serving(client, model)


def test_unknown_fields_are_ignored(client, model):
    params = dict(model=model, prompt=token_ids(6), max_tokens=6, temperature=0)
    plain = client.completions.create(extra_body=IGNORE_EOS, **params).choices[0].text
    extra = client.completions.create(
        user="someone",
        extra_body={**IGNORE_EOS, "frobnicate": {"a": [1, 2]}, "temprature": 2},
        **params,
    )
    assert extra.choices[0].text == plain
