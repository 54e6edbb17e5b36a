"""The PyTorch residual quantizers that `rvq_burn::interop` reads and writes, built from the real
packages (versions in requirements.txt), shared by make_cases.py and roundtrip.py.

encodec and moshi are imported module by module: their `quantization/core_vq.py` needs torch and
einops only, while their package `__init__` pulls in audio I/O and the language model.
"""

import importlib
import importlib.util
import sys
import types

import torch


def _core_vq(package):
    """`<package>.quantization.core_vq`, without running `<package>/__init__.py`."""
    if f"{package}.quantization.core_vq" in sys.modules:
        return sys.modules[f"{package}.quantization.core_vq"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (see crates/rvq-burn/interop/requirements.txt)")
    root = list(spec.submodule_search_locations)[0]
    for name, path in ((package, root), (f"{package}.quantization", f"{root}/quantization")):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    return importlib.import_module(f"{package}.quantization.core_vq")


# The layouts' key names: (original, transformers) per field, after `layers.{l}.`.
KEYS = {
    "encodec": {
        "original": ("_codebook.", {"initialized": "inited", "count": "cluster_size", "sum": "embed_avg", "embed": "embed"}),
        "transformers": ("codebook.", {"initialized": "inited", "count": "cluster_size", "sum": "embed_avg", "embed": "embed"}),
    },
    "mimi": {
        "original": ("_codebook.", {"initialized": "_initialized", "count": "cluster_usage", "sum": "embedding_sum"}),
        "transformers": ("codebook.", {"initialized": "initialized", "count": "cluster_usage", "sum": "embed_sum"}),
    },
    "vqp": {
        "original": ("_codebook.", {"initialized": "initted", "count": "cluster_size", "sum": "embed_avg", "embed": "embed"}),
    },
}


def rename(layout, state, source, target):
    """A quantizer's keys in the `source` naming ("original" or "transformers") renamed to the
    `target` one, as the transformers conversion does."""
    module, fields = KEYS[layout][source]
    new_module, new_fields = KEYS[layout][target]
    renamed = {}
    for key, value in state.items():
        head, _, field = key.rpartition(".")
        head = head[: -len(module.rstrip("."))] + new_module.rstrip(".")
        name = next(k for k, v in fields.items() if v == field)
        renamed[f"{head}.{new_fields[name]}"] = value
    return renamed


def to_transformers(layout, state):
    return rename(layout, state, "original", "transformers")


def from_transformers(layout, state):
    return rename(layout, state, "transformers", "original")


class Codec:
    """One layout's residual quantizer, with `train_step`, `encode` and `decode` on rows `[N, D]`."""

    def __init__(self, layout, num_levels, codebook_size, dim, decay, epsilon, dead_code=None,
                 codebook_dim=None, cosine=False, rotation_trick=None):
        self.layout = layout
        self.dim = dim
        if layout == "encodec":
            core_vq = _core_vq("encodec")
            self.module = core_vq.ResidualVectorQuantization(
                num_quantizers=num_levels, dim=dim, codebook_size=codebook_size, decay=decay,
                epsilon=epsilon, kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=0)
        elif layout == "mimi":
            core_vq = _core_vq("moshi")
            dead_code = dead_code or {}
            self.module = core_vq.ResidualVectorQuantization(
                num_quantizers=num_levels, codebook_offset=0, dim=dim, codebook_size=codebook_size,
                decay=decay, epsilon=epsilon,
                threshold_usage_ratio=dead_code.get("threshold_usage_ratio", 0.0),
                replaced_usage_ratio=dead_code.get("replaced_usage_ratio", 1.0),
                check_unused_every=dead_code.get("check_every", 5))
        elif layout == "vqp":
            from vector_quantize_pytorch import ResidualVQ

            self.module = ResidualVQ(
                dim=dim, num_quantizers=num_levels, codebook_size=codebook_size, decay=decay,
                eps=epsilon, kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=0,
                codebook_dim=codebook_dim, use_cosine_sim=cosine, rotation_trick=rotation_trick)
        else:
            raise ValueError(f"unknown layout {layout!r}")

    def _codec_input(self, rows):
        # encodec and moshi take [B, D, T]; vector-quantize-pytorch takes [B, N, D].
        rows = torch.as_tensor(rows, dtype=torch.float32)
        return rows.T[None] if self.layout in ("encodec", "mimi") else rows[None]

    def train_step(self, rows):
        self.module.train()
        with torch.no_grad():
            self.module(self._codec_input(rows))

    def eval_forward(self, rows):
        """A forward in eval mode (EnCodec runs its k-means init in it all the same)."""
        self.module.eval()
        with torch.no_grad():
            self.module(self._codec_input(rows))

    def encode(self, rows):
        """`[M, N]` codes."""
        self.module.eval()
        with torch.no_grad():
            x = self._codec_input(rows)
            if self.layout == "vqp":
                _, indices, _ = self.module(x)  # [1, N, M]
                return indices[0].T.contiguous()
            return self.module.encode(x)[:, 0]  # [M, 1, N] -> [M, N]

    def decode(self, codes):
        """`[N, D]` rows."""
        self.module.eval()
        codes = torch.as_tensor(codes, dtype=torch.long)
        with torch.no_grad():
            if self.layout == "vqp":
                return self.module.get_output_from_indices(codes.T[None])[0]
            return self.module.decode(codes[:, None])[0].T.contiguous()

    def state(self):
        """The quantizer's own `state_dict()`, tensors contiguous."""
        return {k: v.detach().clone().contiguous() for k, v in self.module.state_dict().items()}

    def load(self, state):
        self.module.load_state_dict(state, strict=True)
