"""Bad requests: a clear 4xx with the OpenAI error body, and the server keeps serving."""

import json

import openai
import pytest

from conftest import assert_api_error, assert_error_body, assert_serving, token_ids

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def good_completion(model: str, **fields) -> dict:
    return {"model": model, "prompt": "Hello", "max_tokens": 2, **fields}


def test_invalid_json_is_400(http, client, model):
    response = http.post(
        COMPLETIONS,
        content=b'{"model": "' + model.encode() + b'", "prompt": ',
        headers={"content-type": "application/json"},
    )
    error = assert_error_body(response, 400)
    assert error["type"] == "invalid_request_error"
    assert_serving(client, model)


def test_invalid_json_on_chat_is_400(http, client, model):
    response = http.post(
        CHAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error_body(response, 400)
    assert_serving(client, model)


@pytest.mark.parametrize(
    "path, field, value",
    [
        (COMPLETIONS, "prompt", 5),
        (COMPLETIONS, "prompt", {"text": "Hello"}),
        (COMPLETIONS, "max_tokens", "ten"),
        (COMPLETIONS, "temperature", "hot"),
        (COMPLETIONS, "stop", 7),
        (CHAT, "messages", "Hello"),
        (CHAT, "messages", [{"role": "user", "content": 5}]),
    ],
)
def test_wrong_type_is_400(http, client, model, path, field, value):
    body = good_completion(model) if path == COMPLETIONS else {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 2,
    }
    body[field] = value
    error = assert_error_body(http.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert_serving(client, model)


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_missing_required_field_is_400(http, client, model, missing):
    body = good_completion(model)
    del body[missing]
    assert_error_body(http.post(COMPLETIONS, json=body), 400)
    assert_serving(client, model)


def test_unknown_role_is_400(http, client, model):
    body = {"model": model, "messages": [{"role": "wizard", "content": "Hello"}]}
    assert_error_body(http.post(CHAT, json=body), 400)
    assert_serving(client, model)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("temperature", 3),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("logprobs", 6),
    ],
)
def test_out_of_range_is_400_naming_the_field(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="Hello", **{field: value})
    error = assert_api_error(raised.value, 400)
    assert error["param"] == field, error
    assert raised.value.param == field
    assert_serving(client, model)


def test_top_k_below_minus_one_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="Hello", extra_body={"top_k": -2})
    assert assert_api_error(raised.value, 400)["param"] == "top_k"
    assert_serving(client, model)


@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("top_logprobs", 21)])
def test_chat_out_of_range_is_400(client, model, field, value):
    params = {field: value}
    if field == "top_logprobs":
        params["logprobs"] = True
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], **params
        )
    assert assert_api_error(raised.value, 400)["param"] == field
    assert_serving(client, model)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_is_400(client, model, prompt):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt=prompt)
    assert_api_error(raised.value, 400)
    assert_serving(client, model)


def test_empty_messages_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=[])
    assert_api_error(raised.value, 400)
    assert_serving(client, model)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_model_is_404(client, model, endpoint):
    with pytest.raises(openai.NotFoundError) as raised:
        if endpoint == "completions":
            client.completions.create(model=f"{model}-nope", prompt="Hello")
        else:
            client.chat.completions.create(
                model=f"{model}-nope", messages=[{"role": "user", "content": "Hello"}]
            )
    error = assert_api_error(raised.value, 404)
    assert error["code"] == "model_not_found"
    assert raised.value.code == "model_not_found"
    assert_serving(client, model)


def test_prompt_logprobs_on_chat_is_400_naming_it(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}],
            extra_body={"prompt_logprobs": 1},
        )
    assert assert_api_error(raised.value, 400)["param"] == "prompt_logprobs"


@pytest.mark.parametrize("n", [0, -1, 100_000])
def test_n_out_of_range_is_400_naming_it(client, model, n):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="Hello", n=n)
    assert assert_api_error(raised.value, 400)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], n=n
        )
    assert assert_api_error(raised.value, 400)["param"] == "n"
    assert_serving(client, model)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"echo": True, "stop": ["."]}, "stop"),
        ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
        ({"extra_body": {"prompt_logprobs": -1}}, "prompt_logprobs"),
        ({"echo": True, "max_tokens": -1}, "max_tokens"),
    ],
)
def test_bad_echo_and_prompt_logprobs_are_400_naming_the_field(client, model, fields, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="Hello", **fields)
    error = assert_api_error(raised.value, 400)
    assert error["param"] == param, error
    assert_serving(client, model)


def test_ten_megabyte_body_is_413(http, client, model):
    body = json.dumps(good_completion(model, prompt="a" * (10 * 1024 * 1024))).encode()
    response = http.post(
        COMPLETIONS, content=body, headers={"content-type": "application/json"}
    )
    assert_error_body(response, 413)
    assert_serving(client, model)


def test_prompt_plus_max_tokens_beyond_context_is_400(client, model, max_model_len):
    prompt = token_ids(max_model_len - 10)
    # Fits alone...
    fits = client.completions.create(model=model, prompt=prompt, max_tokens=10)
    assert fits.usage.prompt_tokens == max_model_len - 10
    # ...but not with 11 new tokens.
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt=prompt, max_tokens=11)
    error = assert_api_error(raised.value, 400)
    assert str(max_model_len) in error["message"], error
    assert_serving(client, model)


def test_prompt_alone_beyond_context_is_400(client, model, max_model_len):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(
            model=model, prompt=token_ids(max_model_len + 5), max_tokens=1
        )
    error = assert_api_error(raised.value, 400)
    assert str(max_model_len) in error["message"], error
    assert_serving(client, model)


def test_chat_beyond_context_is_400(client, model, max_model_len):
    # Each repetition is at least one token, so this is past the context.
    content = " wind" * (max_model_len + 5)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=1
        )
    error = assert_api_error(raised.value, 400)
    assert str(max_model_len) in error["message"], error
    assert_serving(client, model)


@pytest.mark.parametrize("method, path", [("GET", "/v1/nope"), ("POST", "/v2/completions")])
def test_unknown_path_is_404(http, client, model, method, path):
    response = http.request(method, path, json={} if method == "POST" else None)
    assert_error_body(response, 404)
    assert_serving(client, model)


# A value of 900 KB, under the 1 MiB body limit.
HUGE = "x" * 900_000


@pytest.mark.parametrize(
    "path, fields, status, param",
    [
        (COMPLETIONS, {"model": HUGE}, 404, None),
        (CHAT, {"model": HUGE}, 404, None),
        (COMPLETIONS, {"max_tokens": HUGE}, 400, "max_tokens"),
        (COMPLETIONS, {"stop": [HUGE]}, 400, "stop"),
        (CHAT, {"messages": [{"role": HUGE, "content": "Hi"}]}, 400, "messages"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": HUGE}]}]},
            400,
            "messages[0].content",
        ),
        (CHAT, {"response_format": {"type": HUGE}}, 400, "response_format"),
        (COMPLETIONS, {"logit_bias": {HUGE: 1}}, 400, "logit_bias"),
    ],
)
def test_errors_quote_user_input_cut_short(http, client, model, path, fields, status, param):
    body = {"model": model, "max_tokens": 2}
    if path == COMPLETIONS:
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    body.update(fields)
    response = http.post(path, json=body)
    error = assert_error_body(response, status)
    assert error["param"] == param, error
    assert len(response.content) < 1500, response.content[:2000]
    assert_serving(client, model)


def test_an_unknown_path_is_quoted_cut_short(http, client, model):
    response = http.get("/v1/" + "a" * 8000)
    assert_error_body(response, 404)
    assert len(response.content) < 1500, response.content[:2000]
    assert_serving(client, model)
