#!/usr/bin/env python3
"""The demo's recipe in plain PyTorch, as a yardstick for `cargo run --release --example train`.

Same data (the 10,000 embedded digits: first 9,000 train, last 1,000 validate), same model
(Conv 1->32->64->16, 4-level EMA residual quantizer with 64 codes, mirrored decoder, sigmoid),
same quantizer algorithm (helia-edge 0.6.2 EmaResidualVectorQuantizer: EMA counts and sums,
Laplace smoothing, commitment loss only, one straight-through estimator on the sum), same
loss (pixel MSE + commitment), Adam 1e-3, batch 64, same epochs. Prints one JSON object per
epoch with the fields the demo writes to metrics.jsonl.

    python3 -m venv .venv && .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/torch_vqvae.py --threads 2

With `--vqp`, the quantizer is vector-quantize-pytorch's `ResidualVQ` instead, configured as the
demo's (decay 0.99, eps 1e-5, commitment weight 0.25, the straight-through estimator rather
than its default rotation trick), with the demo's `--codebook-dim N`, `--cosine` and
`--kmeans-init`: the yardstick for those settings. `--reference-init` starts its codebooks at the
reference's `U(-1/K, 1/K)` (counts one, sums equal to the codebooks), as the demo's do, instead
of vector-quantize-pytorch's Kaiming-uniform init.
"""

import argparse
import gzip
import json
import math
import pathlib
import struct
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

DATA = pathlib.Path(__file__).resolve().parent.parent / "crates" / "vqvae-demo" / "data"


def read_idx(path):
    data = gzip.open(path, "rb").read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


class EmaRvq(nn.Module):
    """helia-edge 0.6.2 EmaResidualVectorQuantizer, in PyTorch."""

    def __init__(self, levels, codes, dim, beta=0.25, decay=0.99, eps=1e-5):
        super().__init__()
        self.beta, self.decay, self.eps, self.codes = beta, decay, eps, codes
        limit = 1.0 / codes
        for l in range(levels):
            cb = torch.empty(codes, dim).uniform_(-limit, limit)
            self.register_buffer(f"count{l}", torch.ones(codes))
            self.register_buffer(f"weight{l}", cb.clone())
        self.levels = levels

    def codebook(self, l):
        c, w = getattr(self, f"count{l}"), getattr(self, f"weight{l}")
        n = c.sum()
        smoothed = (c + self.eps) / (n + self.codes * self.eps) * n
        return w / smoothed[:, None]

    def forward(self, x, levels=None):
        flat = x.reshape(-1, x.shape[-1])
        residual, q_sum, loss, all_idx = flat, torch.zeros_like(flat), 0.0, []
        for l in range(levels or self.levels):
            cb = self.codebook(l)
            with torch.no_grad():
                dist = (cb * cb).sum(1)[None, :] - 2.0 * residual.detach() @ cb.t()
                idx = dist.argmin(1)
            q = cb[idx]
            loss = loss + self.beta * ((q.detach() - residual) ** 2).mean()
            if self.training:
                with torch.no_grad():
                    counts = torch.zeros(self.codes).index_add_(0, idx, torch.ones(len(idx)))
                    sums = torch.zeros_like(cb).index_add_(0, idx, residual.detach())
                    c, w = getattr(self, f"count{l}"), getattr(self, f"weight{l}")
                    c.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                    w.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            residual = residual - q.detach()
            q_sum = q_sum + q.detach()
            all_idx.append(idx)
        y = flat + (q_sum - flat).detach()
        return y.reshape(x.shape), loss, all_idx


class Vqp(nn.Module):
    """vector-quantize-pytorch's ResidualVQ with EmaRvq's interface (`levels` at evaluation
    takes the first levels' codes of a full-depth forward)."""

    def __init__(self, levels, codes, dim, codebook_dim=None, cosine=False, kmeans_init=False,
                 reference_init=False):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.levels, self.codes = levels, codes
        self.rvq = ResidualVQ(dim=dim, num_quantizers=levels, codebook_size=codes, decay=0.99,
                              eps=1e-5, commitment_weight=0.25, rotation_trick=False,
                              codebook_dim=codebook_dim, use_cosine_sim=cosine,
                              kmeans_init=kmeans_init, threshold_ema_dead_code=0)
        if reference_init:
            for layer in self.rvq.layers:
                book = layer._codebook
                start = torch.empty_like(book.embed).uniform_(-1.0 / codes, 1.0 / codes)
                book.embed.copy_(start)
                book.embed_avg.copy_(start)
                book.cluster_size.fill_(1.0)

    def forward(self, x, levels=None):
        shape = x.shape
        flat = x.reshape(1, -1, shape[-1])
        y, idx, losses = self.rvq(flat)
        if levels is not None and levels < self.levels:
            codes = self.rvq.get_codes_from_indices(idx)[:levels].sum(0)  # [1, N, C]
            y = self.rvq.project_out(codes)
        return y.reshape(shape), losses.sum(), list(idx[0].T)


class VqVae(nn.Module):
    def __init__(self, levels, codes, dim=16, quantizer=None):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, dim, 3, 1, 1))
        self.rvq = quantizer or EmaRvq(levels, codes, dim)
        self.dec = nn.Sequential(
            nn.Conv2d(dim, 64, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, images, levels=None):
        z = self.enc(images).permute(0, 2, 3, 1)
        q, commit, idx = self.rvq(z, levels)
        return self.dec(q.permute(0, 3, 1, 2)), commit, idx


def psnr(mse):
    return 10 * math.log10(1 / max(mse, 1e-12))


def evaluate(model, images, batch):
    model.eval()
    levels, codes = model.rvq.levels, model.rvq.codes
    hist = [torch.zeros(codes) for _ in range(levels)]
    sse = [0.0] * levels
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            for n in range(1, levels + 1):
                rec, _, idx = model(x, levels=n)
                sse[n - 1] += ((rec - x) ** 2).sum().item()
            for l, i in enumerate(idx):
                hist[l] += torch.bincount(i, minlength=codes).float()
    pixels = images.numel()
    usage, perplexity, bits = [], [], 0.0
    for h in hist:
        p = h / h.sum()
        entropy = -(p * torch.log2(p + 1e-10)).sum().item()
        usage.append((h > 0).float().mean().item())
        perplexity.append(2 ** entropy)
        bits += entropy
    mse = sse[-1] / pixels
    model.train()
    return dict(val_mse=mse, val_psnr_db=psnr(mse), val_usage=usage, val_perplexity=perplexity,
                val_bits_per_vector=bits, val_psnr_db_by_levels=[psnr(s / pixels) for s in sse])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vqp", action="store_true")
    parser.add_argument("--codebook-dim", type=int, default=None)
    parser.add_argument("--cosine", action="store_true")
    parser.add_argument("--kmeans-init", action="store_true")
    parser.add_argument("--reference-init", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    pixels = torch.from_numpy(read_idx(DATA / "images-idx3-ubyte.gz").copy()).float() / 255.0
    pixels = pixels[:, None]
    train, valid = pixels[:9000], pixels[9000:]
    quantizer = None
    if args.vqp:
        quantizer = Vqp(args.levels, args.codebook_size, 16, args.codebook_dim, args.cosine,
                        args.kmeans_init, args.reference_init)
    model = VqVae(args.levels, args.codebook_size, quantizer=quantizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), generator=generator)
        started, total, steps = time.time(), 0.0, 0
        for start in range(0, len(train), args.batch_size):
            x = train[order[start:start + args.batch_size]]
            rec, commit, _ = model(x)
            loss = F.mse_loss(rec, x) + commit
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        seconds = time.time() - started
        record = dict(epoch=epoch, train_loss=total / steps, train_seconds=seconds,
                      images_per_second=len(train) / seconds)
        record.update(evaluate(model, valid, args.batch_size))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
