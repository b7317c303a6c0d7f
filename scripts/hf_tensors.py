"""The tensors transformers' own class makes for a config.json: every
state_dict entry's name and shape, built on the meta device (no memory, no
weights), the tied lm_head left out.

Usage: python hf_tensors.py CONFIG.json
Prints JSON: {"NAME": [SHAPE...], ...}. Tests run it at test time.
"""

import json
import sys

import torch
import transformers


def main() -> None:
    with open(sys.argv[1]) as f:
        config_dict = json.load(f)
    config_class = transformers.AutoConfig.for_model(config_dict["model_type"]).__class__
    config = config_class.from_dict(config_dict)
    model_class = getattr(transformers, config_dict["architectures"][0])
    with torch.device("meta"):
        model = model_class(config)
    tensors = {name: list(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    json.dump(tensors, sys.stdout)


if __name__ == "__main__":
    main()
