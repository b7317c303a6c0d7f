"""Decode tokens/s of Tramontane against llama.cpp in paired rounds.

This host's memory read rate moves by tens of percent within minutes (other
machines share it), and decode batch 1 is bound by it. Each round runs ours
and then llama.cpp once, back to back. The ratio is taken within the
round, so both sides see about the same rate. The script prints every
round's rows and ratios, then the median ratio of each row with its range.

`int8` is ours with `--dtype bf16 --quantize int8 --quantize-dense` against
llama.cpp's q8_0; `bf16` and `f32` against llama.cpp in the same type.

Usage: python benches/paired_rounds.py --model DIR --bin target/release/tramontane
       [--threads 2] [--dtype int8] [--rounds 9] [--peers ../shared/peers]
"""

import argparse
import os
import statistics
import sys

from benchlib import Column, print_table, run_json  # beside this file, which Python puts on sys.path
from forward_vs_hf import VARIANTS, llama_cpp

ROWS = [("decode batch 1", "decode-1", "decode_b1"), ("decode batch 8", "decode-8", "decode_b8"),
        ("decode batch 32", "decode-32", "decode_b32")]


def ours(args):
    rows = run_json([args.bin, "bench-forward", "--model", args.model, "--threads", str(args.threads), "--json",
                     *VARIANTS[args.dtype][0], "--rows", ",".join(row for _, row, _ in ROWS),
                     "--repeats", str(args.repeats)])["rows"]
    return {row["name"]: row["tokens_per_s"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(VARIANTS), default="int8")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers"))
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    kind = VARIANTS[args.dtype][2]

    ratios = {name: [] for name, _, _ in ROWS}
    lines = []
    for round_ in range(1, args.rounds + 1):
        mine = ours(args)
        llama, note = llama_cpp(args.peers, args.model, args.threads, [kind])
        if llama is None:
            sys.exit(f"llama.cpp cannot run: {note}")
        for name, _, key in ROWS:
            theirs = llama[kind][key]
            ratios[name].append(mine[name] / theirs)
            lines.append([str(round_), name, f"{mine[name]:.1f}", f"{theirs:.1f}", f"{mine[name] / theirs:.2f}x"])
        print(f"round {round_} of {args.rounds} done", file=sys.stderr, flush=True)

    print(f"{args.model}, {args.threads} threads: ours {args.dtype} against llama.cpp {kind},"
          f" {args.rounds} paired rounds (ours, then llama.cpp); tokens/s")
    print_table([Column("round"), Column("row", align="<"), Column("ours"), Column(f"llama.cpp {kind}"),
                 Column("ratio")], lines)
    print()
    summary = [[name, f"{statistics.median(values):.2f}x", f"{min(values):.2f}x", f"{max(values):.2f}x"]
               for name, values in ratios.items()]
    print_table([Column("row", align="<"), Column("median ratio"), Column("lowest"), Column("highest")], summary)


if __name__ == "__main__":
    main()
