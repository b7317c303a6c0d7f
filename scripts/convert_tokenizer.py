"""Writes the Mistral 7B / Mixtral 8x7B tokenizer, in the Hugging Face format, into a folder.

The sentencepiece model ships in the PyPI package mistral-common
(mistral_common/data/tokenizer.model.v1, 32,000 tokens); transformers converts it
to tokenizer.json. Usage: python convert_tokenizer.py OUT_DIR [--chat-template chatml]
(hf_checkpoint.py imports write_tokenizer and write_chat_template; gen-model runs
this file's text with `python -c`).

--chat-template chatml puts a ChatML template into tokenizer_config.json, as the
Qwen checkpoints have (the Mistral vocabulary has no <|im_start|> or <|im_end|>
token: the template renders them as text).
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


CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
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
