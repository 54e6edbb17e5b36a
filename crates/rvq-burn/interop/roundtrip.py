"""Round trip through Burn and back into the real PyTorch modules (run by hand, not in CI).

For each interop case (default: every case with an `after` file in
crates/rvq-burn/tests/fixtures/interop/): the Burn layer imports the codec's `before` state,
trains STEPS steps (examples/interop_roundtrip.rs), exports the state in the codec's layout; this
script loads the export into a fresh EnCodec / Mimi / vector-quantize-pytorch quantizer with
`load_state_dict(strict=True)` and compares its codes of the case's input with the Burn layer's.

    .venv/bin/python crates/rvq-burn/interop/roundtrip.py [--steps 20] [CASE.json ...]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pytorch_codecs import Codec, from_transformers  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))


def roundtrip(case_path, steps, out_dir):
    with open(case_path) as f:
        case = json.load(f)
    name = os.path.splitext(os.path.basename(case_path))[0]
    subprocess.run(
        ["cargo", "run", "-q", "--release", "-p", "rvq-burn", "--features", "pytorch",
         "--example", "interop_roundtrip", "--", case_path, out_dir, str(steps)],
        cwd=ROOT, check=True)
    export = load_file(os.path.join(out_dir, f"{name}.export.safetensors"))
    with open(os.path.join(out_dir, f"{name}.codes.json")) as f:
        burn_codes = torch.tensor(json.load(f))
    state = {key[len(case["prefix"]):]: value for key, value in export.items()}
    if "transformers" in case["source"]:
        state = from_transformers(case["layout"], state)
    codec = Codec(case["layout"], case["num_levels"], case["codebook_size"], case["dim"],
                  case["decay"], case["epsilon"])
    codec.load(state)
    if case["layout"] == "mimi":
        # moshi caches `initialized` in a Python attribute, not the state dict.
        for layer in codec.module.layers:
            layer._codebook._cached_initialized = False
    torch_codes = codec.encode(case["input"])
    same = int((torch_codes == burn_codes).sum())
    total = burn_codes.numel()
    before = torch.tensor(case["codes"])
    moved = int((before != burn_codes).sum())
    print(f"{name}: {case['layout']}, {steps} Burn training steps; codes equal {same}/{total}"
          f" ({moved} codes changed by the training)")
    return same == total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("cases", nargs="*")
    args = parser.parse_args()
    cases = args.cases or [
        path for path in sorted(glob.glob(os.path.join(ROOT, "crates/rvq-burn/tests/fixtures/interop/*.json")))
        if json.load(open(path))["after"] is not None and "dead_codes" not in path]
    with tempfile.TemporaryDirectory() as out_dir:
        results = [roundtrip(os.path.abspath(case), args.steps, out_dir) for case in cases]
    print("all codes equal" if all(results) else "CODES DIFFER")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
