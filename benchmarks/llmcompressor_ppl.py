"""The baseline for calibration_ppl.py and fp4_ppl.py: llm-compressor's GPTQ, AWQ, SmoothQuant
and its FP4 / microscaled presets.

Same model, the same calibration windows (``torchquant.calibration.calibration_tokens``)
and the same perplexity (``torchquant.evaluation``).  llm-compressor pins its own
transformers, so this runs in a separate environment::

    python3 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0
    .venv-llmc/bin/pip install "llmcompressor==0.14.*" gguf
    .venv-llmc/bin/pip install --no-deps -e .
    nice -n 10 .venv-llmc/bin/python benchmarks/llmcompressor_ppl.py \\
        --calib ../shared/data/text/wikipedia_excerpt.txt \\
        --text ../shared/data/text/austen/prideprejudice.txt

llm-compressor refuses a group size that does not divide a layer's input width (576
on SmolLM2-135M), so the grouped rows default to group 64; run calibration_ppl.py
with ``--group-size 64`` for the matching torchquant rows.  Its ``FP8_BLOCK`` preset
(``fp8-block``) fails there too, in its dynamic 1x128 activation groups ("unflatten:
Provided sizes [5, 128] don't multiply up to ... 576"); ``fp8-block 128x64`` is the preset
with 128x64 weight blocks and 1x64 activation groups, which fp8_block_ppl.py's row of the
same name matches.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from calibration_setup import PeakRSS, add_run_args, add_w4a8_alphas, load_average, load_run
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from llmcompressor.pipelines.cache import IntermediatesCache

from torchquant.evaluation import perplexity

IGNORE = ["lm_head"]


def weight_groups(bits: int, group: int) -> dict:
    """Asymmetric INT weights per group, as calibration_ppl.py's wNa16 rows."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": group,
    }
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def microscaled_recipes() -> dict[str, list]:
    """The FP4 / FP8 presets (fp4_ppl.py's rows): RTN, GPTQ and AWQ on the weight-only
    ones, RTN on those that quantize activations too (NVFP4's activation global scale
    is calibrated, as fp4_ppl.py's ``nvfp4 static``)."""
    rows: dict[str, list] = {}
    for preset in ("NVFP4A16", "MXFP4A16"):
        rows[f"{preset} RTN"] = [
            QuantizationModifier(scheme=preset, targets="Linear", ignore=IGNORE)
        ]
        rows[f"{preset} GPTQ"] = [
            GPTQModifier(scheme=preset, targets="Linear", ignore=IGNORE, actorder=None)
        ]
        rows[f"{preset} AWQ"] = [
            AWQModifier(),
            QuantizationModifier(scheme=preset, targets="Linear", ignore=IGNORE),
        ]
    for preset in ("NVFP4", "MXFP4", "MXFP8"):
        rows[f"{preset} RTN"] = [
            QuantizationModifier(scheme=preset, targets="Linear", ignore=IGNORE)
        ]
    return rows


def preset_groups(preset: str, group: int) -> dict:
    """The library's ``preset`` (``W4A8``, ``W4AFP8``) with its weight groups of ``group``
    columns: its own 128 does not divide SmolLM2's 576-wide inputs, which it refuses."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights = scheme.weights.model_copy(update={"group_size": group})
    return {"group_0": scheme}


def fp8_block_groups(columns: int) -> dict:
    """The ``FP8_BLOCK`` preset with ``128 x columns`` weight blocks and ``1 x columns``
    activation groups."""
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    scheme.weights = scheme.weights.model_copy(update={"block_structure": [128, columns]})
    scheme.input_activations = scheme.input_activations.model_copy(update={"group_size": columns})
    return {"group_0": scheme}


def recipes(group: int, alpha: float, w4a8_alphas: list[float]) -> dict[str, list | None]:
    """Row name -> recipe (``None``: the float model); the W4A8 presets smoothed and
    GPTQ-rounded once per alpha of ``w4a8_alphas``, named as calibration_ppl.py's rows."""
    rows: dict[str, list | None] = {}
    for bits in (4, 3):
        groups = weight_groups(bits, group)
        rows[f"w{bits}a16 g{group} RTN"] = [
            QuantizationModifier(config_groups=groups, ignore=IGNORE)
        ]
        rows[f"w{bits}a16 g{group} GPTQ"] = [
            GPTQModifier(config_groups=groups, ignore=IGNORE, actorder=None)
        ]
        # 0.14 accepts only "weight"/"static" act-order (no g_idx), its GPTQ default
        rows[f"w{bits}a16 g{group} GPTQ act-order static"] = [
            GPTQModifier(config_groups=groups, ignore=IGNORE, actorder="static")
        ]
        rows[f"w{bits}a16 g{group} AWQ"] = [
            AWQModifier(),
            QuantizationModifier(config_groups=groups, ignore=IGNORE),
        ]
    rows.update(microscaled_recipes())
    rows["w8a8 dynamic"] = [QuantizationModifier(scheme="W8A8", targets="Linear", ignore=IGNORE)]
    rows[f"w8a8 dynamic SmoothQuant {alpha}"] = [
        SmoothQuantModifier(smoothing_strength=alpha),
        QuantizationModifier(scheme="W8A8", targets="Linear", ignore=IGNORE),
    ]
    for a in w4a8_alphas:
        for name, preset in (("w4a8", "W4A8"), ("w4a8-fp8", "W4AFP8")):
            rows[f"{name} g{group} SmoothQuant {a}+GPTQ"] = [
                SmoothQuantModifier(smoothing_strength=a),
                GPTQModifier(config_groups=preset_groups(preset, group), ignore=IGNORE),
            ]
    rows["fp8-block"] = [QuantizationModifier(scheme="FP8_BLOCK", targets="Linear", ignore=IGNORE)]
    rows["fp8-block 128x64"] = [
        QuantizationModifier(config_groups=fp8_block_groups(64), ignore=IGNORE)
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, calib_samples=16, group_size=64)
    parser.add_argument("--only", nargs="*", help="substrings selecting rows to run")
    add_w4a8_alphas(parser)
    parser.add_argument(
        "--reference", type=float, default=None, help="fp32 perplexity, to skip measuring it"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        # 0.14's sequential pipeline pins cached activations, which fails without CUDA
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, value: None)

    base, tokenizer, ids, calib = load_run(args)
    # oneshot re-reads the config from disk; a GGUF folder has none, so give it a plain one
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    base.config.save_pretrained(config_dir)
    base.config._name_or_path = config_dir
    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    table = [] if args.reference is None else [("fp32 (given)", args.reference, 0.0, 0.0)]
    rows = recipes(args.group_size, args.alpha, args.w4a8_alphas or [args.alpha])
    for name, recipe in {"fp32": None, **rows}.items():
        if name == "fp32" and args.reference is not None:
            continue
        if args.only and name != "fp32" and not any(s in name for s in args.only):
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        with PeakRSS() as mem:
            if recipe is not None:
                oneshot(
                    model=model,
                    tokenizer=tokenizer,
                    dataset=dataset,
                    recipe=recipe,
                    num_calibration_samples=calib.shape[0],
                    max_seq_length=calib.shape[1],
                    shuffle_calibration_samples=False,
                )
        seconds = time.perf_counter() - start
        ppl = perplexity(model, ids, args.seq_len, progress=False).perplexity
        table.append((name, ppl, seconds, mem.peak / 2**30))
        print(
            f"{name}: ppl {ppl:.3f}, calibrate {seconds:.0f} s, peak RSS {mem.peak / 2**30:.2f} "
            f"GiB, load average {load_average()}",
            flush=True,
        )
        del model

    ref = table[0][1]
    print(
        f"\n{'method (llm-compressor)':<36}{'ppl':>9}{'delta %':>9}{'calib s':>9}"
        f"{'peak RSS GiB':>14}"
    )
    for name, ppl, secs, peak in table:
        print(f"{name:<36}{ppl:>9.3f}{100 * (ppl / ref - 1):>+9.2f}{secs:>9.1f}{peak:>14.2f}")


if __name__ == "__main__":
    main()
