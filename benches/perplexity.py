"""Perplexity of a checkpoint on a public-domain text, unquantized and with
int8 experts (and int8 dense projections), in process, on the same text,
windows and positions (`tramontane perplexity`).

With random weights (every checkpoint here) the perplexity is near or above
the vocabulary size whatever the dtype: it does not say how well a model
knows English. What it shows is how far quantization moves the model's
predictive distribution over real text, in the one unit everyone reads: the
ratio of the quantized model's perplexity to the unquantized one's (1.000
is no change); the logit-level figures are the tests' (it/quantized.rs).

Usage: python benches/perplexity.py --model DIR --bin target/release/tramontane
       --text target/corpus/genesis.txt [--threads 2] [--max-tokens 16384]
"""

import argparse

from benchlib import Column, print_table, run_json  # beside this file, which Python puts on sys.path

VARIANTS = [
    ("f32", ["--dtype", "f32"]),
    ("bf16", ["--dtype", "bf16"]),
    ("bf16, int8 experts", ["--dtype", "bf16", "--quantize", "int8"]),
    ("bf16, int8 experts and dense", ["--dtype", "bf16", "--quantize", "int8", "--quantize-dense"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    results = []
    for name, flags in VARIANTS:
        results.append((name, run_json(
            [args.bin, "perplexity", "--model", args.model, "--text", args.text, "--json",
             "--threads", str(args.threads), "--window", str(args.window),
             "--max-tokens", str(args.max_tokens), *flags])))
    bf16 = dict(results)["bf16"]["perplexity"]
    first = results[0][1]
    print(f"{args.model} on {args.text}: {first['tokens']} tokens in {first['windows']} windows"
          f" of {args.window}")
    columns = [Column("weights", 30, "<"), Column("perplexity", 12), Column("NLL (nats)", 11),
               Column("/ bf16", 7)]
    print_table(columns, [[name, f"{r['perplexity']:.1f}", f"{r['nll']:.4f}",
                           f"{r['perplexity'] / bf16:.4f}"] for name, r in results])


if __name__ == "__main__":
    main()
