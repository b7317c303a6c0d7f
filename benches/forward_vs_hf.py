"""In-process forward of Tramontane against transformers (the checkpoint's own
class: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE) and llama.cpp, per dtype.

All run the same checkpoint on the CPU with the same thread count, one after
the other in this run: ours and transformers on the same prompts
(pseudo-random token ids from a formula shared with `tramontane
bench-forward`), llama.cpp through ../shared/peers/llamacpp.sh (llama-bench
pp512 and llama-batched-bench with 128-token prompts; skipped with a note
when that script is absent), and ours again with every projection on
libtorch's GEMMs (TRAMONTANE_NO_KERNELS=1, the baseline of the small-batch
kernels). Prints tokens/s for prefill (1x512, 8x128) and
greedy decode (batch 1, 8, 32 after a 128-token prompt) per dtype, and ours /
theirs per row; llama.cpp's q8_0 is printed beside bf16 for reference. The
`int8` rows are ours with `--dtype bf16 --quantize int8 --quantize-dense`
(every projection but the gates in int8) against llama.cpp's q8_0
(transformers has no int8 CPU path to compare with).
This host's speed moves by tens of percent within minutes, so ours and
llama.cpp each run twice, at the start and at the end, and the better of the
two runs counts for each. The host's memory read rate is measured between
them (torch summing 1 GiB on the same threads), with the decode batch 1 rate
it allows: the bytes a token reads (the dense weights, k experts per layer,
lm_head) at that rate.

Usage: python benches/forward_vs_hf.py --model DIR --bin target/release/tramontane
       [--threads 2] [--dtypes f32,bf16,int8] [--peers ../shared/peers]
"""

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM

from benchlib import Column, print_table, run_json  # beside this file, which Python puts on sys.path


def bench_token(sequence: int, position: int, vocab: int) -> int:
    mixed = ((sequence * 7919 + position * 104729) * 2654435761) % 2**64
    return 3 + mixed % (vocab - 3)


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.tensor([[bench_token(s, p, vocab) for p in range(length)] for s in range(batch)])


def time_prefill(model, batch, length, repeats):
    ids = prompts(batch, length, model.config.vocab_size)
    model(ids, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"name": f"prefill {batch}x{length}", "tokens": batch * length, "seconds": seconds,
            "tokens_per_s": batch * length / seconds}


def time_decode(model, batch, prompt_len, steps, repeats):
    vocab = model.config.vocab_size
    ids = prompts(batch, prompt_len, vocab)
    times = []
    for repeat in range(repeats + 1):
        out = model(ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        step = torch.tensor([[bench_token(s, prompt_len, vocab)] for s in range(batch)])
        start = time.perf_counter()
        for _ in range(steps):
            out = model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = out.logits[:, -1].argmax(-1, keepdim=True)
        if repeat > 0:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"name": f"decode batch {batch}", "tokens": batch * steps, "seconds": seconds,
            "tokens_per_s": batch * steps / seconds}


LLAMA_KEYS = ["prefill_1x512", "prefill_8x128", "decode_b1", "decode_b8", "decode_b32"]
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def llama_cpp(peers, model, threads, types):
    """llama.cpp's figures per GGUF type, or None (with the reason) when it cannot run."""
    script = os.path.join(peers, "llamacpp.sh")
    if not os.path.exists(script):
        return None, f"{script} is absent: llama.cpp columns skipped"
    out = subprocess.run(["bash", script, model, str(threads), ",".join(types)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None, f"llama.cpp failed: {out.stderr.strip()[-400:]}"
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["type"]: row for row in rows}, None


# Per row dtype: our flags, transformers' dtype (None: not run) and llama.cpp's GGUF type.
VARIANTS = {
    "f32": (["--dtype", "f32"], "f32", "f32"),
    "bf16": (["--dtype", "bf16"], "bf16", "bf16"),
    "int8": (["--dtype", "bf16", "--quantize", "int8", "--quantize-dense"], None, "q8_0"),
}


def ours(args, dtype, kernels=True):
    """Our rows; without the small-batch kernels (TRAMONTANE_NO_KERNELS=1) every projection is libtorch's."""
    env = dict(os.environ, TRAMONTANE_NO_KERNELS="0" if kernels else "1")
    return run_json(
        [args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
         *VARIANTS[dtype][0], "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
         "--decode-prompt", str(args.decode_prompt)], env)["rows"]


def best_of(*runs):
    """Row by row, the faster of several runs of the same rows."""
    return [max(rows, key=lambda row: row["tokens_per_s"]) for rows in zip(*runs)]


def best_llama(first, second):
    if first is None or second is None:
        return first or second
    return {kind: {key: max(first[kind][key], second.get(kind, {}).get(key, 0)) if key in LLAMA_KEYS
                   else value for key, value in first[kind].items()} for kind in first}


def read_rate(threads):
    """GB/s at which torch sums a 1 GiB tensor on `threads` threads (best of 5)."""
    data = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def moe_layers(config):
    """Which layers are MoE layers: every layer for Mixtral and OLMoE; for
    Qwen2/3-MoE those not in `mlp_only_layers` on the `decoder_sparse_step`;
    for DeepSeek those from `first_k_dense_replace` on."""
    layers = config["num_hidden_layers"]
    if config["model_type"] in ("deepseek_v2", "deepseek_v3"):
        return [l >= config.get("first_k_dense_replace", 0) for l in range(layers)]
    if config["model_type"] not in ("qwen2_moe", "qwen3_moe"):
        return [True] * layers
    dense, step = set(config.get("mlp_only_layers") or []), config.get("decoder_sparse_step", 1)
    return [l not in dense and config["num_experts"] > 0 and (l + 1) % step == 0 for l in range(layers)]


def token_bytes(model_dir, dtype):
    """Weight bytes one decode token at batch 1 reads: everything but the
    embeddings and the experts not routed to (k of each MoE layer's)."""
    config = json.load(open(os.path.join(model_dir, "config.json")))
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    if "kv_lora_rank" in config:  # DeepSeek's latent attention: q (low rank or not), kv_a, kv_b, o
        rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
        nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
        q_rank = config.get("q_lora_rank")
        query = h * q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        attention = query + h * (rank + rope) + rank * heads * (nope + v) + heads * v * h
    else:
        d = config.get("head_dim") or h // heads
        attention = h * heads * d * 2 + h * kv * d * 2
    experts = config.get("num_local_experts") or config.get("n_routed_experts") or config["num_experts"]
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    shared = config.get("shared_expert_intermediate_size") or (config.get("n_shared_experts") or 0) * width
    moe = config["num_experts_per_tok"] * 3 * h * width + experts * h + (3 * h * shared + h if shared else 0)
    dense = 3 * h * config["intermediate_size"]
    elements = sum(attention + (moe if is_moe else dense) for is_moe in moe_layers(config))
    elements += config["vocab_size"] * h
    # int8: one byte a weight (its scales, 4 bytes a row, left out).
    return elements * {"f32": 4, "bf16": 2, "int8": 1}[dtype]


def transformers_rows(args, dtype):
    """transformers' rows, or None for a dtype it does not run (int8)."""
    if VARIANTS[dtype][1] is None:
        return None
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=TORCH_DTYPES[dtype])
    model.eval()
    with torch.no_grad():
        rows = [
            time_prefill(model, 1, 512, args.repeats),
            time_prefill(model, 8, 128, args.repeats),
            time_decode(model, 1, args.decode_prompt, args.decode_steps, args.repeats),
            time_decode(model, 8, args.decode_prompt, args.decode_steps, args.repeats),
            time_decode(model, 32, args.decode_prompt, args.decode_steps, args.repeats),
        ]
    del model
    return rows


COLUMNS = [Column("dtype", 5, "<"), Column("row", 16, "<"), Column("ours", 8), Column("libtorch only", 14),
           Column("gain", 6), Column("transformers", 13), Column("ratio", 6)]
LLAMA_COLUMNS = [Column("llama.cpp", 10), Column("ratio", 6), Column("llama q8_0", 11)]


def table_row(dtype, i, rows, llama):
    """Row `i` of `dtype`: ours, ours on libtorch only, transformers (and llama.cpp when it ran)."""
    o, t, b = rows
    assert o["name"] == b["name"] and (t is None or t["name"] == o["name"]), (o, t, b)
    ours = o["tokens_per_s"]
    cells = [dtype, o["name"], f"{ours:.1f}", f"{b['tokens_per_s']:.1f}", f"{ours / b['tokens_per_s']:.2f}x"]
    cells += [f"{t['tokens_per_s']:.1f}", f"{ours / t['tokens_per_s']:.2f}x"] if t else ["-", "-"]
    if llama:
        peer = llama.get(VARIANTS[dtype][2], {}).get(LLAMA_KEYS[i])
        q8 = llama.get("q8_0", {}).get(LLAMA_KEYS[i])
        cells += [f"{peer:.1f}", f"{ours / peer:.2f}x"] if peer else ["-", "-"]
        cells.append(f"{q8:.1f}" if q8 else "-")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--dtypes", default="f32,bf16,int8")
    parser.add_argument("--peers", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers"))
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)

    gguf_types = sorted({VARIANTS[dtype][2] for dtype in dtypes} | {"q8_0"})
    llama, note = llama_cpp(args.peers, args.model, args.threads, gguf_types)
    first = {dtype: ours(args, dtype) for dtype in dtypes}
    results = {}
    for dtype in dtypes:
        results[dtype] = (transformers_rows(args, dtype), ours(args, dtype, kernels=False))
    rate = read_rate(args.threads)
    again, _ = llama_cpp(args.peers, args.model, args.threads, gguf_types)
    llama = best_llama(llama, again)
    results = {dtype: (best_of(first[dtype], ours(args, dtype)),) + results[dtype] for dtype in dtypes}

    config = json.load(open(os.path.join(args.model, "config.json")))
    print(f"{config['architectures'][0]} ({args.model}), {args.threads} threads, torch {torch.__version__};"
          " tokens/s, ratio = ours / theirs")
    print("ours and llama.cpp: the better of two runs, one at the start and one at the end")
    print(f"memory read rate: {rate:.1f} GB/s; at that rate decode batch 1 reads its weights "
          + ", ".join(f"{dtype} {rate * 1e9 / token_bytes(args.model, dtype):.1f} tokens/s"
                      for dtype in dtypes))
    if note:
        print(f"note: {note}")
    print("libtorch only = ours with every projection on libtorch's GEMMs (TRAMONTANE_NO_KERNELS=1)")
    columns = COLUMNS + (LLAMA_COLUMNS if llama else [])
    print_table(columns, [table_row(dtype, i, (o[i], t[i] if t else None, b[i]), llama) for dtype in dtypes
                          for (o, t, b) in [results[dtype]] for i in range(len(o))])


if __name__ == "__main__":
    main()
