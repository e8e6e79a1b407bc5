"""Load a compressed-tensors checkpoint (from llm-compressor or torchquant) and run it.

    python examples/load_compressed_tensors.py CHECKPOINT_DIR ["prompt"]

The model is built on the meta device and its packed weights go straight into
``QuantLinear`` layers: no full-precision copy is ever made.  GPTQ and AWQ
folders load the same way.
"""

import sys

import torch

from torchquant.formats.dispatch import detect_format
from torchquant.inspection import report_model
from torchquant.models import load_model


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"

    # -- the folder's tokenizer too, with the same guarantees: no code from the folder runs
    model, tokenizer = load_model(directory)
    print(report_model(model, directory, detect_format(directory)).table())

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
