"""Convert a Hugging Face model folder and save it in the format your server reads.

    python examples/convert_hf_model.py MODEL_DIR OUT_DIR [--format compressed-tensors]

MODEL_DIR is any local ``from_pretrained`` folder (or ``smollm2-135m``).  The
weights are quantized round-to-nearest, 4-bit, group 64; ``--format`` picks the
checkpoint layout: ``native`` (torchquant), ``compressed-tensors`` (vLLM,
llm-compressor), ``gptq`` (v1) or ``awq`` (GEMM).
"""

import argparse

from torchquant import QuantConfig, convert_model, scheme_from_name
from torchquant.formats.dispatch import FORMATS, save_checkpoint
from torchquant.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Hugging Face model folder, a .gguf file, smollm2-135m")
    parser.add_argument("out", help="checkpoint folder to write")
    parser.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    config = QuantConfig(default=scheme_from_name("w4a16", group_size=args.group_size))
    model, summary = convert_model(model, config)
    print(summary.table())
    save_checkpoint(model, args.out, args.format, config=config, tokenizer=tokenizer)
    print(f"saved {args.out} ({args.format})")


if __name__ == "__main__":
    main()
