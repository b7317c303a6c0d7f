"""In-process forward of Tramontane against transformers' MixtralForCausalLM.

Both run the same checkpoint in fp32 on the CPU with the same thread count and
the same prompts (pseudo-random token ids from a formula shared with
`tramontane bench-forward`), one after the other in this run. Prints tokens/s
for prefill (1x512, 8x128) and greedy decode (batch 1, 8, 32 after a 128-token
prompt), and ours / transformers per row.

Usage: python benches/forward_vs_hf.py --model DIR --bin target/release/tramontane [--threads 2]
"""

import argparse
import json
import statistics
import subprocess
import time

import torch
from transformers import MixtralForCausalLM


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--decode-prompt", type=int, default=128)
    args = parser.parse_args()

    ours = json.loads(subprocess.run(
        [args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
         "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
         "--decode-prompt", str(args.decode_prompt)],
        check=True, capture_output=True, text=True).stdout)["rows"]

    torch.set_num_threads(args.threads)
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = [
            time_prefill(model, 1, 512, args.repeats),
            time_prefill(model, 8, 128, args.repeats),
            time_decode(model, 1, args.decode_prompt, args.decode_steps, args.repeats),
            time_decode(model, 8, args.decode_prompt, args.decode_steps, args.repeats),
            time_decode(model, 32, args.decode_prompt, args.decode_steps, args.repeats),
        ]

    print(f"fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'row':<16} {'tramontane tok/s':>17} {'transformers tok/s':>19} {'ratio':>7}")
    for o, t in zip(ours, theirs):
        assert o["name"] == t["name"], (o["name"], t["name"])
        print(f"{o['name']:<16} {o['tokens_per_s']:>17.1f} {t['tokens_per_s']:>19.1f} "
              f"{o['tokens_per_s'] / t['tokens_per_s']:>6.2f}x")


if __name__ == "__main__":
    main()
