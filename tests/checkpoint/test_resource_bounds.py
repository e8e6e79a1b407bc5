"""Converting and loading a model bigger than the memory the process is allowed.

A child process caps its address space (``RLIMIT_AS``) at what it already maps
after importing torch plus a budget half the model's float32 size.  It converts
the model from a float safetensors file layer by layer, saves it, and loads the
quantized checkpoint onto a meta skeleton, all under the cap.  Then, under the
same cap, materialising the float model for ``convert_model`` must run out of
memory, which shows the cap is real.
"""

import json
import subprocess
import sys
import textwrap

import torch

WIDTH = 512
LAYERS = 64
FLOAT_BYTES = LAYERS * (WIDTH * WIDTH + WIDTH) * 4  # 64 MiB of float32
BUDGET = 32 * 2**20
# glibc raises its mmap threshold after big frees, so freed layer buffers would stay in the
# heap and fragment it (measured: 133 MiB instead of 79 MiB peak growth for a 192 MiB model);
# a fixed threshold hands each layer's float buffers back to the OS as soon as they are freed.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "PATH": "/usr/bin:/bin",
}

CHILD = textwrap.dedent(
    """
    import re, resource, sys
    import torch
    from torch import nn
    from torchquant import QuantConfig, convert_model
    from torchquant.serialization import load_quantized, save_quantized
    from torchquant.streaming import convert_from_safetensors

    source, target, budget, width, layers = sys.argv[1:6]
    width, layers = int(width), int(layers)
    torch.set_num_threads(1)

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def skeleton(device="meta"):
        with torch.device(device):
            return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    # -- warm up: the first matmul maps the BLAS libraries (a fixed cost, not model data)
    config = QuantConfig("w4a16", ignore=())
    warm, _ = convert_model(nn.Sequential(nn.Linear(64, 64)), config, progress=False)
    warm(torch.randn(2, 64))
    limit = status("VmSize") * 1024 + int(budget)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # -- reset the peak-RSS counter so imports and warm-up do not count towards the peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before = status("VmRSS") * 1024

    model, _ = convert_from_safetensors(skeleton(), [source], config, progress=False)
    save_quantized(model, target, config=config)
    want = model.state_dict()
    del model
    loaded = load_quantized(target, skeleton()).state_dict()
    assert want.keys() == loaded.keys()
    assert all(torch.equal(want[k], loaded[k]) for k in want)
    peak = status("VmHWM") * 1024
    print("PEAK_GROWTH", peak - rss_before)
    del want, loaded
    try:
        convert_model(skeleton("cpu"), config, progress=False)
    except (MemoryError, RuntimeError) as exc:
        print("CONTROL_OOM", type(exc).__name__)
    """
)


def write_float_safetensors(path, width, layers):
    """A float32 checkpoint of ``layers`` linear layers, written one tensor at a time."""
    shapes = {}
    for i in range(layers):
        shapes[f"{i}.weight"] = [width, width]
        shapes[f"{i}.bias"] = [width]
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            f.write((torch.randn(*shape, generator=gen) * 0.05).numpy().tobytes())


def test_streamed_conversion_and_loading_fit_under_a_cap_smaller_than_the_model(tmp_path):
    assert FLOAT_BYTES >= 2 * BUDGET
    source = tmp_path / "float.safetensors"
    write_float_safetensors(source, WIDTH, LAYERS)
    args = [source, tmp_path / "ck", BUDGET, WIDTH, LAYERS]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHILD_ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    growth = int(proc.stdout.split("PEAK_GROWTH")[1].split()[0])
    assert 0 < growth < BUDGET
    assert "CONTROL_OOM" in proc.stdout, proc.stdout
