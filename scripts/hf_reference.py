"""Reference outputs of Hugging Face transformers on a checkpoint: the class its
config.json names (AutoModelForCausalLM), which must load every tensor of it and
find no other (a missing, unexpected or mismatched key is an error, not a random
or ignored weight).

Usage: python hf_reference.py --model DIR --request REQUEST.json --out OUT_PREFIX

REQUEST.json: {"prompts": [text, ...], "chats": [[message, ...], ...],
"greedy_tokens": N, "texts": [text, ...]}
Writes OUT_PREFIX.safetensors (fp32 logits of every prompt position, key
"logits.I" of shape [len, vocab]) and OUT_PREFIX.json with, per prompt, the
token ids, N greedy tokens (HF's own KV cache, no EOS stop) with the 5 best
(token, logit) pairs at each step, how close each prompt position's and
each greedy step's gates came to taking other experts (over the layers, the
smallest gap between a gate's k-th and k+1-th logits, in units in the last
place of the dtype at the k-th logit: 0 is a tie its top-k breaks by its own
order), and the token ids of each of "texts". Each of "chats" (OpenAI-style
messages) is rendered by the checkpoint's chat template with the generation
prompt (apply_chat_template) and written under "chats" as a prompt is. Tests run it at test time; nothing it writes is edited by hand.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def gate_gaps(router_logits, k: int, mantissa_bits: int) -> list:
    """Per row, the smallest gap over the layers' gate logits (a tuple of
    [rows, experts] per MoE layer) between their k-th and k+1-th largest,
    in units in the last place at the k-th (None where no layer has more
    than k experts)."""
    gaps = None
    for layer in router_logits:
        ordered = layer.float().sort(dim=-1, descending=True).values
        if ordered.shape[-1] <= k:
            continue
        kth = ordered[:, k - 1]
        ulp = torch.pow(2.0, torch.floor(torch.log2(kth.abs().clamp_min(1e-30))) - mantissa_bits)
        gap = (kth - ordered[:, k]) / ulp
        gaps = gap if gaps is None else torch.minimum(gaps, gap)
    return [] if gaps is None else [float(g) for g in gaps]


def record_gate_choices(model) -> list:
    """For gates that return no router logits (DeepSeek's, gpt-oss's): hooks recording,
    per call, the [rows, experts] values the gate's top-k picks from (its
    scores, V3's plus the correction bias, 0 outside the chosen groups), as
    the gate computes them from its fp32 logits. Returns the list they are
    appended to."""
    records = []

    def hook(module, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        logits = F.linear(x, module.weight.float())
        experts = logits.shape[-1]
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:  # V3: sigmoid, groups ranked by their two best
            choice = logits.sigmoid() + bias.float()
            groups, top = module.n_group, module.topk_group
            group_scores = choice.view(-1, groups, experts // groups).topk(2, dim=-1)[0].sum(-1)
        else:  # V2: softmax, greedy or groups ranked by their best
            choice = logits.softmax(dim=-1)
            if module.topk_method != "group_limited_greedy":
                records.append(choice)
                return
            groups, top = module.num_group, module.topk_group
            group_scores = choice.view(-1, groups, experts // groups).max(dim=-1).values
        kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(top, dim=-1)[1], 1)
        mask = kept.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts)
        records.append(choice.masked_fill(~mask.bool(), 0.0))

    def biased(module, inputs, _output):
        """gpt-oss's router (its recorded outputs are the weights, not the
        logits): the biased logits it takes the top-k of, as it computes them."""
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        records.append(F.linear(x, module.weight, module.bias))

    for module in model.modules():
        name = type(module).__name__
        if name.endswith("MoEGate") or name.endswith("TopkRouter"):
            module.register_forward_hook(hook)
        elif name == "GptOssTopKRouter":
            module.register_forward_hook(biased)
    return records


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
    for module in model.modules():
        # An MXFP4 checkpoint's experts, dequantized by transformers in bf16
        # (exactly), computed in the model's dtype.
        if type(module).__name__ == "GptOssExperts":
            module.to(dtype)
    gate_records = record_gate_choices(model)
    top_k = model.config.num_experts_per_tok
    mantissa_bits = {"f32": 23, "bf16": 7}[args.dtype]

    def router_logits(out):
        """What the hooks recorded, or the layers' gate logits."""
        return tuple(gate_records) or getattr(out, "router_logits", None) or ()

    def run(ids):
        """The prompt `ids`' logits at every position, and its greedy
        continuation as the module docstring says."""
        gate_records.clear()
        out = model(ids, output_router_logits=True)
        prompt_logits = out.logits[0].float().contiguous()
        prompt_gaps = gate_gaps(router_logits(out), top_k, mantissa_bits)
        greedy = []
        top = []
        greedy_gaps = []
        past = None
        step = ids
        for _ in range(request.get("greedy_tokens", 0)):
            gate_records.clear()
            out = model(step, past_key_values=past, use_cache=True, output_router_logits=True)
            past = out.past_key_values
            # The step's own token is the last row of each layer's logits.
            last = tuple(layer[-1:] for layer in router_logits(out))
            greedy_gaps += gate_gaps(last, top_k, mantissa_bits)
            step_logits = out.logits[0, -1].float()
            token = int(step_logits.argmax())
            best = torch.topk(step_logits, 5)
            top.append([[int(i), float(v)] for i, v in zip(best.indices, best.values)])
            greedy.append(token)
            step = torch.tensor([[token]])
        return prompt_logits, {"ids": ids[0].tolist(), "greedy": greedy, "top": top,
                               "gate_gaps": prompt_gaps, "greedy_gate_gaps": greedy_gaps}

    logits = {}
    prompts = []
    chats = []
    with torch.no_grad():
        for i, prompt in enumerate(request.get("prompts", [])):
            prompt_logits, reference = run(tokenizer(prompt, return_tensors="pt").input_ids)
            logits[f"logits.{i}"] = prompt_logits
            prompts.append(reference)
        for messages in request.get("chats", []):
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            chats.append(run(ids)[1])

    texts = [tokenizer(text).input_ids for text in request.get("texts", [])]
    if logits:
        save_file(logits, args.out + ".safetensors")
    json.dump({"prompts": prompts, "chats": chats, "texts": texts}, open(args.out + ".json", "w"))


if __name__ == "__main__":
    main()
