"""Reference outputs of Hugging Face transformers on a checkpoint: the class its
config.json names (AutoModelForCausalLM), which must load every tensor of it and
find no other (a missing, unexpected or mismatched key is an error, not a random
or ignored weight).

Usage: python hf_reference.py --model DIR --request REQUEST.json --out OUT_PREFIX

REQUEST.json: {"prompts": [text, ...], "greedy_tokens": N, "texts": [text, ...]}
Writes OUT_PREFIX.safetensors (fp32 logits of every prompt position, key
"logits.I" of shape [len, vocab]) and OUT_PREFIX.json with, per prompt, the
token ids, N greedy tokens (HF's own KV cache, no EOS stop) with the 5 best
(token, logit) pairs at each step, and the token ids of each of "texts". Tests run it at test time; nothing it writes is edited by hand.
"""

import argparse
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                        help="dtype the model computes in (logits are written as fp32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    request = json.load(open(args.request))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, loading = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, output_loading_info=True)
    problems = [f"{kind} {', '.join(map(str, loading[kind]))}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if loading.get(kind)]
    if problems:
        sys.exit(f"transformers does not load {args.model} fully: {'; '.join(problems)}")
    model.eval()

    logits = {}
    prompts = []
    with torch.no_grad():
        for i, prompt in enumerate(request.get("prompts", [])):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            logits[f"logits.{i}"] = model(ids).logits[0].float().contiguous()
            greedy = []
            top = []
            past = None
            step = ids
            for _ in range(request.get("greedy_tokens", 0)):
                out = model(step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                step_logits = out.logits[0, -1].float()
                token = int(step_logits.argmax())
                best = torch.topk(step_logits, 5)
                top.append([[int(i), float(v)] for i, v in zip(best.indices, best.values)])
                greedy.append(token)
                step = torch.tensor([[token]])
            prompts.append({"ids": ids[0].tolist(), "greedy": greedy, "top": top})

    texts = [tokenizer(text).input_ids for text in request.get("texts", [])]
    if logits:
        save_file(logits, args.out + ".safetensors")
    json.dump({"prompts": prompts, "texts": texts}, open(args.out + ".json", "w"))


if __name__ == "__main__":
    main()
