"""vLLM's /tokenize and /detokenize: the server's own tokenization."""

from conftest import assert_error_body

TEXT = "The north wind blows over the sea"


def tokenize(http, body):
    response = http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_counts_what_a_completion_prompt_counts(http, client, model, max_model_len):
    body = tokenize(http, {"model": model, "prompt": TEXT})
    completion = client.completions.create(model=model, prompt=TEXT, max_tokens=1)
    assert body["count"] == len(body["tokens"]) == completion.usage.prompt_tokens
    assert body["max_model_len"] == max_model_len
    # The ids give the same completion as the text.
    by_ids = client.completions.create(model=model, prompt=body["tokens"], max_tokens=4, temperature=0)
    by_text = client.completions.create(model=model, prompt=TEXT, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_without_special_tokens_there_is_no_bos(http, model):
    plain = tokenize(http, {"model": model, "prompt": TEXT, "add_special_tokens": False})
    special = tokenize(http, {"model": model, "prompt": TEXT})
    assert special["tokens"] == [1] + plain["tokens"]


def test_detokenize_inverts_tokenize(http, model):
    ids = tokenize(http, {"model": model, "prompt": TEXT, "add_special_tokens": False})["tokens"]
    response = http.post("/detokenize", json={"model": model, "tokens": ids})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": TEXT}


def test_token_strs_name_each_token(http, model):
    body = tokenize(http, {"model": model, "prompt": TEXT, "return_token_strs": True})
    assert len(body["token_strs"]) == body["count"]
    assert body["token_strs"][0] == "<s>"


def test_chat_messages_are_tokenized_as_a_chat_completion_prompt(http, client, model):
    messages = [{"role": "user", "content": "Hello there"}]
    body = tokenize(http, {"model": model, "messages": messages})
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert body["count"] == chat.usage.prompt_tokens


def test_bad_requests_are_refused(http, model):
    error = assert_error_body(
        http.post("/detokenize", json={"model": model, "tokens": [1, 10_000_000]}), 400
    )
    assert error["param"] == "tokens"
    assert_error_body(http.post("/tokenize", json={"model": "another", "prompt": "x"}), 404)
    assert_error_body(http.post("/tokenize", json={"model": model}), 400)
