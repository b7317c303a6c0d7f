"""Structured outputs: OpenAI's `response_format` (json_object, json_schema)
and vLLM's regex, choice and grammar constraints, on a random-weight model:
whatever the weights, the text is what the constraint allows."""

import json
import re
from typing import Literal

import openai
import pytest
from conftest import assert_api_error, assert_serving, token_ids
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Describe the wind as JSON"}]


class Wind(BaseModel):
    direction: Literal["north", "south", "east", "west"]
    force: int = Field(ge=0, le=12)
    name: str = Field(max_length=8)
    gusty: bool
    seen_from: list[Literal["sea", "hill", "town"]] = Field(max_length=3)


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client, model):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=Wind, max_tokens=200, seed=seed
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        wind = choice.message.parsed
        assert isinstance(wind, Wind), choice.message
        # The text is the object's compact JSON, nothing around it.
        assert json.loads(choice.message.content) == wind.model_dump(mode="json")


def test_a_json_schema_given_as_vllm_guided_json_binds_the_completions_endpoint(client, model):
    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["id"],
        "additionalProperties": False,
    }
    completion = client.completions.create(
        model=model, prompt=token_ids(12), max_tokens=30, temperature=0,
        extra_body={"guided_json": schema},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.text)
    assert set(value) == {"id"} and 1 <= value["id"] <= 9, choice.text


def test_json_object_gives_an_object(client, model):
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=60, temperature=0,
        response_format={"type": "json_object"},
    )
    choice = completion.choices[0]
    text = choice.message.content
    assert text.startswith("{"), text
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"regex": r"[0-9]{3}-[A-Z]{2}"}},
        {"guided_regex": r"[0-9]{3}-[A-Z]{2}"},
    ],
)
def test_a_regex_binds_whole_and_streamed_text(client, model, extra):
    pattern = re.compile(r"[0-9]{3}-[A-Z]{2}")
    params = dict(model=model, prompt=token_ids(10, salt=2), max_tokens=20, temperature=1.0,
                  seed=4, extra_body=extra)
    whole = client.completions.create(**params)
    assert pattern.fullmatch(whole.choices[0].text), whole.choices[0].text
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stream=True, **params) if c.choices
    )
    assert streamed == whole.choices[0].text


def test_each_of_n_choices_is_one_of_the_choice_list(client, model):
    choices = ["calm", "breeze", "gale force 9"]
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, n=6, max_tokens=10, temperature=1.0, seed=1,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    texts = [c.message.content for c in completion.choices]
    assert all(text in choices for text in texts), texts
    assert len(set(texts)) > 1, texts


def test_a_lark_grammar_binds_the_text(client, model):
    grammar = 'start: "wind=" DIR ";"\nDIR: "N" | "S" | "NE" | "SW"\n'
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=2,
        extra_body={"guided_grammar": grammar},
    )
    text = completion.choices[0].message.content
    assert re.fullmatch(r"wind=(N|S|NE|SW);", text), text


@pytest.mark.parametrize(
    "extra, param, says",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
         "response_format", "does not compile"),
        ({"guided_regex": "([0-9]"}, "guided_regex", "does not compile"),
        ({"structured_outputs": {"grammar": "start: missing_rule"}},
         "structured_outputs.grammar", "does not compile"),
        ({"guided_regex": "a" * 70000}, "guided_regex", "more than the 65536"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "guided_regex is given"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "not supported"),
    ],
)
def test_constraints_that_cannot_be_used_are_400_naming_the_field(client, model, extra, param,
                                                                 says):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, extra_body=extra
        )
    error = assert_api_error(raised.value, 400)
    assert error["param"] == param, error
    assert says in error["message"], error
    assert_serving(client, model)
