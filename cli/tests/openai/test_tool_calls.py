"""Tool calls through the checkpoint's chat template: `tools` and
`tool_choice` (none, auto, required, a named function), answered as
`message.tool_calls` and as streamed deltas the openai client assembles;
`required` and a named function are held to the tools' schemas by the
grammar, so even random weights call with valid arguments; `role: tool`
results go back through the template.

TRAMONTANE_TOOL_FORMAT says how the served checkpoint's template writes calls
(`mistral`, the default: the Mistral instruct format's `[TOOL_CALLS]`;
`hermes`: Qwen's `<tool_call>`). With TRAMONTANE_MODEL_DIR (the checkpoint's
folder) and a template of the checkpoint's own, the prompt of a conversation
with tools, calls and results is checked against transformers'
apply_chat_template."""

import json
import os

import openai
import pytest
from conftest import assert_api_error, assert_serving

FORMAT = os.environ.get("TRAMONTANE_TOOL_FORMAT", "mistral")
MODEL_DIR = os.environ.get("TRAMONTANE_MODEL_DIR")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time now.",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Nice?"}]


def check_arguments(call) -> dict:
    """A call of one of TOOLS with arguments valid for its schema."""
    assert call.type == "function"
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"}, arguments
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
        assert arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert call.function.name == "get_time" and arguments == {}, call
    return arguments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_one_valid_call(client, model, seed):
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=seed,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    assert len(choice.message.tool_calls) == 1, choice.message
    call = choice.message.tool_calls[0]
    check_arguments(call)
    assert len(call.id) == 9 and call.id.isalnum(), call.id


def test_a_named_function_is_the_one_called(client, model):
    completion = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_arguments(calls[0])


def test_streamed_calls_assemble_to_the_whole_answer(client, model):
    params = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                  max_tokens=120, temperature=1.0, seed=5)
    whole = client.chat.completions.create(**params).choices[0]
    with client.chat.completions.stream(**params) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    for call in streamed.message.tool_calls:
        check_arguments(call)


def test_auto_and_none_answer_text_or_calls_of_the_tools(client, model):
    for choice_mode in ("auto", "none"):
        completion = client.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice_mode,
            max_tokens=16, temperature=0,
        )
        choice = completion.choices[0]
        if choice.message.tool_calls:
            assert choice_mode == "auto" and choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                check_arguments(call)
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)


def conversation(call_id: str) -> list:
    """A question, the assistant's call, the tool's result."""
    return MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Nice", "unit": "celsius"}'},
        }]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "clear", "temperature": 21}'},
    ]


def test_results_go_back_through_the_template(client, model, http):
    call = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=0,
    ).choices[0].message.tool_calls[0]
    answer = client.chat.completions.create(
        model=model, messages=conversation(call.id), tools=TOOLS, max_tokens=8, temperature=0,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokens = http.post("/tokenize", json={"model": model, "messages": conversation(call.id),
                                          "tools": TOOLS}).json()["tokens"]
    text = http.post("/detokenize", json={"model": model, "tokens": tokens}).json()["prompt"]
    written = {"mistral": ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", call.id],
               "hermes": ["<tools>", "<tool_call>", "<tool_response>"]}[FORMAT]
    for part in written + ["get_weather", "sky", "clear"]:
        assert part in text, (part, text)


@pytest.mark.skipif(MODEL_DIR is None or FORMAT != "hermes",
                    reason="transformers renders only a checkpoint's own template")
def test_the_prompt_with_tools_is_transformers_own(http, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    messages = conversation("a1b2c3d4e")
    # Templates get the arguments as an object, as the server gives them.
    hf_messages = json.loads(json.dumps(messages))
    arguments = hf_messages[1]["tool_calls"][0]["function"]
    arguments["arguments"] = json.loads(arguments["arguments"])
    hf_messages[1]["content"] = ""
    expected = tokenizer.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True,
                                             tokenize=True)
    if isinstance(expected, dict):
        expected = expected["input_ids"]
    ours = http.post("/tokenize", json={"model": model, "messages": messages, "tools": TOOLS})
    assert ours.status_code == 200, ours.text
    assert ours.json()["tokens"] == list(expected)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "absent"}}},
         "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
    ],
)
def test_bad_tools_are_400_naming_the_field(client, model, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, **fields)
    error = assert_api_error(raised.value, 400)
    assert error["param"] == param, error
    assert_serving(client, model)
