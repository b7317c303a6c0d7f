"""Writes the Mistral 7B / Mixtral 8x7B tokenizer, in the Hugging Face format, into a folder.

The sentencepiece model ships in the PyPI package mistral-common
(mistral_common/data/tokenizer.model.v1, 32,000 tokens); transformers converts it
to tokenizer.json. Usage: python convert_tokenizer.py OUT_DIR [--chat-template chatml|qwen-tools]
(hf_checkpoint.py imports write_tokenizer and write_chat_template; gen-model runs
this file's text with `python -c`).

--chat-template chatml puts a plain ChatML template into tokenizer_config.json;
qwen-tools, Qwen2.5's (ChatML with tools and <tool_call> blocks), as the Qwen
MoE checkpoints have it (the Mistral vocabulary has no <|im_start|> or
<|im_end|> token: the template renders them as text).
"""

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import mistral_common
from transformers import AutoTokenizer

SOURCE = pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# The tokenizer_config.json of mistralai/Mixtral-8x7B-v0.1, less its chat template.
CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 1000000000000000019884624838656,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "use_default_system_prompt": False,
}


# Qwen2.5's template (ChatML with tools: Hermes-style <tool_call> blocks), as
# the Qwen2.5 and Qwen3 MoE checkpoints ship it.
QWEN_TOOLS = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen-tools": QWEN_TOOLS,
}


def write_tokenizer(out: pathlib.Path):
    """Writes the tokenizer files into `out`; returns the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as src:
        shutil.copy(SOURCE, pathlib.Path(src) / "tokenizer.model")
        (pathlib.Path(src) / "tokenizer_config.json").write_text(json.dumps(CONFIG))
        tokenizer = AutoTokenizer.from_pretrained(src)
        tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").exists():
        sys.exit("conversion did not produce tokenizer.json")
    return tokenizer


def write_chat_template(out: pathlib.Path, name: str) -> None:
    """Puts the chat template `name` (of CHAT_TEMPLATES) into out/tokenizer_config.json."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATES[name]
    path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="convert_tokenizer.py")
    parser.add_argument("out")
    parser.add_argument("--chat-template", choices=list(CHAT_TEMPLATES))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    write_tokenizer(out)
    if args.chat_template:
        write_chat_template(out, args.chat_template)


if __name__ == "__main__":
    main()
