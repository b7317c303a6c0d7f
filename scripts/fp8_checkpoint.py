"""Quantizes a Hugging Face checkpoint to FP8 as published FP8 checkpoints
store it (Qwen3 `-FP8`, DeepSeek-V3: `quantization_config.quant_method ==
"fp8"`, `fmt` e4m3, `weight_block_size` [128, 128]), for the tests of
loading them.

Every projection of the attention and of the MLPs and experts (tensors named
`*_proj.weight`, or Mixtral's `w1`/`w2`/`w3.weight`) becomes
`weight` in float8_e4m3fn and `weight_scale_inv` in f32, one scale per block
of BLOCK × BLOCK (the last blocks of a row or column may be partial): the
block's largest magnitude maps to 448, e4m3's largest, and
`weight ≈ fp8 · weight_scale_inv[row / BLOCK, column / BLOCK]`. The
embeddings, lm_head, norms, biases and the routers' gates stay as they were
(they are in the published checkpoints). Also writes, with --dequantized
DIR, the same checkpoint with every quantized weight replaced by its
dequantized value in f32: what the FP8 checkpoint stands for.

Usage: python fp8_checkpoint.py --model DIR --out DIR [--block 128]
           [--dequantized DIR] [--bad-scale NAME]

--bad-scale NAME writes the scale of tensor NAME one block row short (for
the test that such a checkpoint is refused, naming it).
"""

import argparse
import json
import pathlib
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.dont_write_bytecode = True

QUANTIZED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
E4M3_MAX = 448.0


def quantize(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    w = weight.to(torch.float32)
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(br, block, bc, block)
    largest = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(largest > 0, largest / E4M3_MAX, torch.ones_like(largest))
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    fp8 = (w / expanded).to(torch.float8_e4m3fn)
    return fp8, scale


def dequantize(fp8: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = fp8.shape
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return fp8.to(torch.float32) * expanded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--dequantized")
    parser.add_argument("--bad-scale")
    args = parser.parse_args()
    source, out = pathlib.Path(args.model), pathlib.Path(args.out)
    files = sorted(source.glob("*.safetensors"))
    if not files:
        sys.exit(f"no safetensors in {source}")
    targets = [out] + ([pathlib.Path(args.dequantized)] if args.dequantized else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        for other in source.iterdir():
            if other.is_file() and other.suffix != ".safetensors" and other.name != "model.safetensors.index.json":
                shutil.copy(other, target / other.name)
    weight_map = {}
    for file in files:
        tensors = load_file(file)
        quantized, reference = {}, {}
        for name, tensor in tensors.items():
            if QUANTIZED.search(name) and tensor.dim() == 2:
                fp8, scale = quantize(tensor, args.block)
                if name == args.bad_scale:
                    scale = scale[:-1] if scale.shape[0] > 1 else scale[:, :0]
                quantized[name] = fp8
                quantized[name + "_scale_inv"] = scale.contiguous()
                reference[name] = dequantize(fp8, scale, args.block) if name != args.bad_scale else tensor
            else:
                quantized[name] = tensor
                reference[name] = tensor
        save_file(quantized, out / file.name, metadata={"format": "pt"})
        weight_map.update({name: file.name for name in quantized})
        if args.dequantized:
            save_file({k: v.contiguous() for k, v in reference.items()},
                      pathlib.Path(args.dequantized) / file.name, metadata={"format": "pt"})
    if (source / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        if args.dequantized:
            shutil.copy(source / "model.safetensors.index.json",
                        pathlib.Path(args.dequantized) / "model.safetensors.index.json")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [args.block, args.block],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(out)


if __name__ == "__main__":
    main()
