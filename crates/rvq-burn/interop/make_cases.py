"""Writes the interop cases (format `rvq-interop/1`, crates/rvq-burn/tests/fixtures/interop/README.md)
from the real EnCodec, Mimi (moshi) and vector-quantize-pytorch quantizers.

    .venv/bin/python crates/rvq-burn/interop/make_cases.py [OUT_DIR]

Each case: a quantizer trained for a few steps on clustered data (k-means init done, dead-code
replacement off unless the case is about it), its `state_dict()` under a key prefix
(`NAME.before.safetensors`), the same keys after one more training forward on `input`
(`NAME.after.safetensors`), and `encode(input)` and `decode(codes)` of the `before` state
(`NAME.json`). Deterministic for a given torch build (seeded).
"""

import copy
import json
import zlib
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_codecs import Codec, to_transformers  # noqa: E402

SOURCES = {
    "encodec": "encodec 0.1.1 encodec.quantization.core_vq.ResidualVectorQuantization",
    "mimi": "moshi 0.2.13 moshi.quantization.core_vq.ResidualVectorQuantization",
    "vqp": "vector-quantize-pytorch 1.32.0 ResidualVQ",
}

CASES = [
    # name, layout, key style, prefix, levels, K, D, decay, epsilon, extra
    ("encodec_m4_k64_d8", "encodec", "original", "quantizer.vq.", 4, 64, 8, 0.99, 1e-5, {}),
    ("encodec_hf_m6_k128_d24", "encodec", "transformers", "quantizer.", 6, 128, 24, 0.95, 1e-5, {}),
    ("mimi_m4_k64_d8", "mimi", "original", "quantizer.rvq_rest.vq.", 4, 64, 8, 0.99, 1e-5,
     {"whole_model_pt": True}),
    ("mimi_hf_m5_k128_d16", "mimi", "transformers",
     "quantizer.acoustic_residual_vector_quantizer.", 5, 128, 16, 0.9, 1e-5, {}),
    ("vqp_m4_k64_d8", "vqp", "original", "quantizer.", 4, 64, 8, 0.8, 1e-5, {}),
    ("vqp_m3_k128_d16", "vqp", "original", "", 3, 128, 16, 0.95, 1e-5, {}),
    # Mimi's dead-code rule: checked at every step, a code below 0.9 of the mean usage is
    # replaced before the EMA update. `expired` lists the codes Mimi replaced in the `after`
    # forward; their sums hold Mimi's random batch vectors, everything else is exact.
    ("mimi_dead_codes_m3_k64_d8", "mimi", "original", "", 3, 64, 8, 0.9, 1e-5,
     {"dead_code": {"threshold_usage_ratio": 0.9, "replaced_usage_ratio": 1.0, "check_every": 1}}),
    # The same, checked every 5 steps: the `after` state is 5 training forwards after loading
    # `before` into a fresh module (moshi counts the steps to the next check from there, as
    # the import does), so only the 5th forward checks.
    ("mimi_dead_codes_every5_m3_k64_d8", "mimi", "original", "", 3, 64, 8, 0.9, 1e-5,
     {"dead_code": {"threshold_usage_ratio": 0.9, "replaced_usage_ratio": 1.0, "check_every": 5}}),
    # EnCodec right after its k-means init, with no training step since (it runs the init in an
    # eval forward too): `embed` holds the centroids but `embed_avg` holds them too, not
    # centroid x count. The import rebuilds the sums from `embed` and says so; there is no
    # `after` (EnCodec's next update starts from the inconsistent sums, and so differs).
    ("encodec_fresh_init_m3_k32_d8", "encodec", "original", "quantizer.vq.", 3, 32, 8, 0.99, 1e-5,
     {"fresh_init": True}),
    # vector-quantize-pytorch's `codebook_dim` (learned projections in and out, the state in
    # the codebooks' space) and `use_cosine_sim` (L2-normalized residuals and codes). The
    # `gradients` cases also record the gradients of the `after` forward: one Euclidean level
    # (where vector-quantize-pytorch's per-level straight-through estimator is the layer's
    # single one), cosine levels at any depth.
    ("vqp_proj_m3_k64_d16_c4", "vqp", "original", "quantizer.", 3, 64, 16, 0.8, 1e-5,
     {"codebook_dim": 4}),
    ("vqp_cosine_m3_k64_d8", "vqp", "original", "", 3, 64, 8, 0.8, 1e-5, {"cosine": True}),
    # Cosine levels pass the gradient level by level, as vector-quantize-pytorch does: its
    # gradients are the layer's at two levels too.
    ("vqp_proj_cosine_m2_k32_d12_c6", "vqp", "original", "", 2, 32, 12, 0.9, 1e-5,
     {"codebook_dim": 6, "cosine": True, "gradients": True}),
    ("vqp_proj_grad_m1_k32_d12_c6", "vqp", "original", "", 1, 32, 12, 0.9, 1e-5,
     {"codebook_dim": 6, "gradients": True}),
    ("vqp_proj_cosine_grad_m1_k32_d12_c6", "vqp", "original", "", 1, 32, 12, 0.9, 1e-5,
     {"codebook_dim": 6, "cosine": True, "gradients": True}),
    # The same without the rotation trick: the plain straight-through estimator.
    ("vqp_proj_ste_grad_m1_k32_d12_c6", "vqp", "original", "", 1, 32, 12, 0.9, 1e-5,
     {"codebook_dim": 6, "gradients": True, "rotation_trick": False}),
    ("vqp_proj_cosine_ste_grad_m1_k32_d12_c6", "vqp", "original", "", 1, 32, 12, 0.9, 1e-5,
     {"codebook_dim": 6, "cosine": True, "gradients": True, "rotation_trick": False}),
]


def clustered(generator, centers, rows, spread=0.35):
    """`rows` vectors around random picks of `centers`."""
    picks = torch.randint(0, centers.shape[0], (rows,), generator=generator)
    return centers[picks] + spread * torch.randn(rows, centers.shape[1], generator=generator)


def floats(t):
    return [[float(v) for v in row] for row in t.tolist()]


def make(out_dir, name, layout, style, prefix, levels, k, d, decay, epsilon, extra):
    torch.manual_seed(zlib.crc32(name.encode()))
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    centers = torch.randn(3 * k, d, generator=generator)
    codebook_dim, cosine = extra.get("codebook_dim"), extra.get("cosine", False)
    codec = Codec(layout, levels, k, d, decay, epsilon, extra.get("dead_code"),
                  codebook_dim=codebook_dim, cosine=cosine,
                  rotation_trick=extra.get("rotation_trick"))
    # Centres in the space the codebooks search: the model's, or through a projection that
    # keeps their spread.
    if codebook_dim is not None:
        centers = centers * 2.0
    fresh = extra.get("fresh_init", False)
    if fresh:
        codec.eval_forward(clustered(generator, centers, 512))
    else:
        # Mimi initializes one level per step (a level waits for the one before it).
        for _ in range(levels + 6):
            codec.train_step(clustered(generator, centers, 512))
    inputs = clustered(generator, centers, 96)

    before = codec.state()
    codes = codec.encode(inputs)
    quantized = codec.decode(codes)
    expired = None
    gradients = None
    after_steps = 1
    if not fresh:
        if layout == "mimi" and "dead_code" in extra:
            # A fresh module with the `before` state, as after loading a checkpoint.
            codec = Codec(layout, levels, k, d, decay, epsilon, extra["dead_code"])
            codec.load(before)
            after_steps = extra["dead_code"]["check_every"]
            for _ in range(after_steps - 1):
                codec.train_step(inputs)
            expired = record_expired(codec, inputs)
        else:
            if extra.get("gradients"):
                gradients = record_gradients(copy.deepcopy(codec.module), inputs, generator)
            codec.train_step(inputs)
    after = codec.state()

    def write(state, suffix):
        if style == "transformers":
            state = to_transformers(layout, state)
        save_file({prefix + key: value for key, value in state.items()},
                  os.path.join(out_dir, f"{name}.{suffix}.safetensors"))

    write(before, "before")
    if extra.get("whole_model_pt"):
        # The same state inside a whole model's torch.save checkpoint, nested under "model",
        # next to other weights (one of them another quantizer of another size).
        model = {"encoder.conv.weight": torch.randn(4, 3, 5), "encoder.conv.bias": torch.randn(4)}
        other = Codec(layout, 1, k // 2, d, decay, epsilon)
        other.train_step(clustered(generator, centers, 128))
        model.update({"quantizer.rvq_first.vq." + key: v for key, v in other.state().items()})
        model.update({prefix + key: value for key, value in before.items()})
        torch.save({"model": model, "epoch": 12, "config": {"codebook_size": k}},
                   os.path.join(out_dir, f"{name}.model.pt"))
    if not fresh:
        write(after, "after")
    case = {
        "format": "rvq-interop/1",
        "source": SOURCES[layout] + (" (keys renamed as in transformers)" if style == "transformers" else ""),
        "layout": layout,
        "prefix": prefix,
        "num_levels": levels,
        "codebook_size": k,
        "dim": d,
        "decay": decay,
        "epsilon": epsilon,
        "before": f"{name}.before.safetensors",
        "after": None if fresh else f"{name}.after.safetensors",
        "input": floats(inputs),
        "codes": codes.tolist(),
        "quantized": floats(quantized),
    }
    if codebook_dim is not None:
        case["codebook_dim"] = codebook_dim
    if cosine:
        case["cosine"] = True
    if gradients is not None:
        case["gradients"] = gradients
    if fresh:
        case["rebuilt_levels"] = list(range(levels))
    if expired is not None:
        case["dead_code"] = dict(extra["dead_code"], expired=expired)
        case["after_steps"] = after_steps
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(case, f)
        f.write("\n")
    summary = f"expired per level {[len(e) for e in expired]}" if expired else ""
    print(f"{name}: {layout} ({style}), {levels} levels, K={k}, D={d} {summary}")


def record_gradients(module, inputs, generator):
    """Runs the training forward of a copy of `module` with gradients: `sum(output *
    output_grad) + sum(losses)` (commitment weight 1) back-propagated to the input and the
    projections. The estimator is vector-quantize-pytorch's default: the rotation trick when
    the codebooks' dim is > 1. In float64 (vector-quantize-pytorch still searches and updates
    its codebooks in float32), so the values compared are the exact ones rather than one f32
    summation order's."""
    module = module.double()
    module.train()
    module.zero_grad()
    x = inputs[None].clone().double().requires_grad_(True)
    quantized, _, losses = module(x)
    output_grad = torch.randn(quantized.shape[1:], generator=generator).double()
    ((quantized[0] * output_grad).sum() + losses.sum()).backward()
    grads = {"output_grad": floats(output_grad), "output": floats(quantized[0].detach()),
             "loss": float(losses.sum().detach()), "commitment_weight": 1.0,
             "rotation_trick": bool(module.layers[0].rotation_trick), "input": floats(x.grad[0])}
    for name in ("project_in", "project_out"):
        layer = getattr(module, name)
        grads[f"{name}.weight"] = floats(layer.weight.grad)
        grads[f"{name}.bias"] = [float(v) for v in layer.bias.grad]
    return grads


def record_expired(codec, inputs):
    """Runs the training forward, recording the codes each Mimi level replaces."""
    expired = []
    for layer in codec.module.layers:
        book = layer._codebook
        original = book._replace_expired_codes

        def replace(samples, mask, original=original):
            expired.append([int(i) for i in mask.nonzero().flatten()])
            original(samples, mask)

        book._replace_expired_codes = replace
    codec.train_step(inputs)
    for layer in codec.module.layers:
        del layer._codebook._replace_expired_codes
    if len(expired) != len(codec.module.layers):
        raise SystemExit("the dead-code check did not run at every level")
    return expired


class Evil:
    """Pickles as a call of os.system, as a malicious checkpoint would."""

    def __reduce__(self):
        return (os.system, ("echo this command ran > /tmp/rvq-interop-pwned",))


def malicious(out_dir):
    """A torch.save zip whose state dict is a valid EnCodec quantizer state, plus an entry that
    calls os.system when PyTorch loads the file (saving it calls nothing)."""
    state = load_state(os.path.join(out_dir, "encodec_m4_k64_d8.before.safetensors"))
    torch.save({"model": state, "hook": Evil()}, os.path.join(out_dir, "malicious.pt"))


def load_state(path):
    from safetensors.torch import load_file

    return load_file(path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "tests", "fixtures", "interop")
    os.makedirs(out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    for case in CASES:
        make(out_dir, *case)
    malicious(out_dir)


if __name__ == "__main__":
    main()
