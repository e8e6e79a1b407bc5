"""Quick start: quantize SmolLM2-135M to 4-bit weights, generate, and save.

    python examples/quickstart.py [--out smollm2-w4]

The model is fetched once into ~/.cache/torchquant (or taken from the folder named
by TORCHQUANT_DATA).
"""

import argparse

import torch

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.models import load_model
from torchquant.serialization import save_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="smollm2-w4", help="checkpoint folder to write")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    # 4-bit weights in groups of 64 along the input; lm_head stays in float by default
    config = QuantConfig(default=scheme_from_name("w4a16", group_size=64))
    model, summary = convert_model(model, config)
    print(summary.table())

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))

    save_quantized(model, args.out, config=config, tokenizer=tokenizer)
    print(f"saved {args.out}; reload with torchquant.models.load_model({args.out!r})")


if __name__ == "__main__":
    main()
