"""A small checkpoint of one MoE family made by transformers' own model class,
for parity tests of the families the project serves.

Usage: python hf_checkpoint.py --family FAMILY --config JSON --out DIR
           [--seed N] [--dtype f32|bf16] [--max-shard-size SIZE]
           [--chat-template chatml|qwen-tools|gpt-oss]

FAMILY: mixtral, qwen3_moe, qwen2_moe, olmoe, deepseek_v2, deepseek_v3 or gpt_oss. The
family's config class gets small shapes (hidden 64, 2 layers, 8 experts top-2;
DeepSeek's 3 layers, the first dense), then every field of JSON
(a field the class does not know is refused); vocab_size is the tokenizer's
(it may be given larger, a padded vocabulary, never smaller). XForCausalLM(config)
is built and its weights drawn again under --seed so that a model ignoring one
of them gives other logits: weights N(0, 1/fan_in), embeddings N(0, 1) (N(0,
1/hidden) when tied to the lm_head), every RMSNorm weight about 1 + 0.2·N(0, 1),
every bias 0.1·N(0, 1), DeepSeek-V3's gate correction bias 0.1·N(0, 1) (a
buffer, saved with the weights), gpt-oss's sinks N(0, 1) and its experts'
gate/up projection 3·N(0, 1/fan_in) (so that its clamp at 7 cuts in). Drawn
in fp32; --dtype bf16 rounds them.

save_pretrained writes safetensors (sharded, with an index, under
--max-shard-size) and a config.json with its architectures and dtype (as
torch_dtype and dtype); the tokenizer is the project's Mistral one
(convert_tokenizer.py). --chat-template NAME writes convert_tokenizer.py's
template NAME as gen-model does: chatml and qwen-tools (the one gen-model
writes for the Qwen families) into tokenizer_config.json, gpt-oss (the
released gpt-oss checkpoints' harmony template) as chat_template.jinja.
Tests run it at test time. Prints DIR.
"""

import argparse
import json
import pathlib
import sys

import torch
import transformers

sys.dont_write_bytecode = True  # no __pycache__ in scripts/ at test time
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from convert_tokenizer import CHAT_TEMPLATES, write_chat_template, write_tokenizer  # noqa: E402

# Each family's config class and what it is given before --config.
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, {
        "intermediate_size": 128, "num_local_experts": 8,
    }),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {
        "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
    }),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {
        "intermediate_size": 128, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "num_experts": 8,
    }),
    "olmoe": (transformers.OlmoeConfig, {
        "intermediate_size": 32, "num_experts": 8,
    }),
    # Latent attention at small widths, one dense layer first, 8 experts
    # and shared ones; every head its own key and value (as published).
    "deepseek_v2": (transformers.DeepseekV2Config, {
        "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    }),
    "deepseek_v3": (transformers.DeepseekV3Config, {
        "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
        "n_group": 4, "topk_group": 2,
    }),
    # A window of 4 positions at even layers, so that short prompts see it.
    "gpt_oss": (transformers.GptOssConfig, {
        "intermediate_size": 32, "num_local_experts": 8, "head_dim": 16, "sliding_window": 4,
        "max_position_embeddings": 131072,
    }),
}
SHAPE = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
}
# Fields the class does not declare but its attention reads (getattr).
EXTRA_FIELDS = {"qwen3_moe": {"head_dim"}, "qwen2_moe": {"head_dim"}}

NORM_SPREAD = 0.2
BIAS_STD = 0.1

def check_fields(family: str, overrides: dict) -> None:
    config_class, _ = FAMILIES[family]
    known = set(config_class().to_dict()) | EXTRA_FIELDS.get(family, set())
    unknown = sorted(set(overrides) - known)
    if unknown:
        sys.exit(f"--config: {config_class.__name__} has no field {', '.join(unknown)}")


def make_config(family: str, overrides: dict, tokenizer):
    config_class, defaults = FAMILIES[family]
    vocab = overrides.get("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        sys.exit(f"--config: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    # The tokenizer's special tokens, not the family's (OLMoE's pad_token_id 1
    # would be Mistral's <s>, and its embedding row zeroed).
    fields = {
        **SHAPE, **defaults,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None, **overrides, "vocab_size": vocab,
    }
    return config_class(**fields)


def draw_weights(model: torch.nn.Module) -> None:
    """Draws every parameter again (the class's own init gives norms of exactly
    1, biases of 0 and logits of a few hundredths); fails on a parameter no
    rule covers, so a new kind of weight is not left at its init."""
    drawn = set()

    def draw(parameter: torch.nn.Parameter, values: torch.Tensor) -> None:
        if id(parameter) not in drawn:  # a tied lm_head keeps the embedding's values
            parameter.copy_(values)
            drawn.add(id(parameter))

    # Tied, the embedding is also the lm_head and is scaled as one, else the
    # logits spread over tens of units and greedy decoding repeats one token.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                std = module.embedding_dim ** -0.5 if tied else 1.0
                draw(module.weight, std * torch.randn_like(module.weight))
            elif isinstance(module, torch.nn.Linear):
                draw(module.weight, torch.randn_like(module.weight) / module.in_features ** 0.5)
                if module.bias is not None:
                    draw(module.bias, BIAS_STD * torch.randn_like(module.bias))
            if type(module).__name__ == "GptOssAttention":
                draw(module.sinks, torch.randn_like(module.sinks))
            if type(module).__name__.endswith("RMSNorm"):
                scale = 1 + NORM_SPREAD * torch.randn_like(module.weight)
                draw(module.weight, scale.clamp(min=0.1))
            elif type(module).__name__ == "GptOssTopKRouter":
                draw(module.weight, torch.randn_like(module.weight) / module.weight.shape[1] ** 0.5)
                draw(module.bias, BIAS_STD * torch.randn_like(module.bias))
            elif type(module).__name__ == "GptOssExperts":
                # [experts, in, out]; the gate/up outputs spread over ±3 units.
                for name, spread in (("gate_up_proj", 3.0), ("down_proj", 1.0)):
                    weight = getattr(module, name)
                    draw(weight, spread * torch.randn_like(weight) / weight.shape[1] ** 0.5)
                    bias = getattr(module, name + "_bias")
                    draw(bias, BIAS_STD * torch.randn_like(bias))
            elif type(module).__name__.endswith(("MoEGate", "TopkRouter")):
                draw(module.weight, torch.randn_like(module.weight) / module.weight.shape[1] ** 0.5)
                bias = getattr(module, "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(BIAS_STD * torch.randn_like(bias))
    left = [name for name, p in model.named_parameters() if id(p) not in drawn]
    if left:
        sys.exit(f"no rule draws {', '.join(left)}")


def write_dtype(out: pathlib.Path, dtype_name: str) -> None:
    """transformers writes `dtype`; readers before 4.56 (and ours) read `torch_dtype`."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["torch_dtype"] = config["dtype"] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True, choices=list(FAMILIES))
    parser.add_argument("--config", default="{}", help="JSON object of config fields")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--max-shard-size", help="e.g. 200KB: sharded safetensors with an index")
    parser.add_argument("--chat-template", choices=list(CHAT_TEMPLATES))
    args = parser.parse_args()
    try:
        overrides = json.loads(args.config)
    except json.JSONDecodeError as error:
        sys.exit(f"--config is not JSON: {error}")
    if not isinstance(overrides, dict):
        sys.exit("--config must be a JSON object")
    check_fields(args.family, overrides)
    out = pathlib.Path(args.out)

    tokenizer = write_tokenizer(out)
    config = make_config(args.family, overrides, tokenizer)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(args.seed)
    try:
        model = model_class(config)
    except ValueError as error:  # e.g. Qwen2-MoE and OLMoE want head_dim · heads = hidden
        sys.exit(f"{model_class.__name__} refuses --config: {error}")
    draw_weights(model)
    dtype, dtype_name = {
        "f32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"),
    }[args.dtype]
    model.to(dtype)
    config.dtype = dtype
    saving = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **saving)
    write_dtype(out, dtype_name)
    if args.chat_template:
        write_chat_template(out, args.chat_template)
    print(out)


if __name__ == "__main__":
    main()
