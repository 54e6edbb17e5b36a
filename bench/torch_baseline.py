#!/usr/bin/env python3
"""PyTorch baselines for `cargo bench -p rvq-burn --bench throughput`.

Times, on the same shapes and thread count, one training step (forward + EMA update +
backward of the commitment loss through the input), `encode` and `decode` of
  * `plain`: a faithful plain-PyTorch implementation of the reference algorithm (helia-edge
    0.6.2 EmaResidualVectorQuantizer; EMA sums accumulated with index_add_), and
  * `vqp`: vector_quantize_pytorch.ResidualVQ (EMA codebooks, same sizes and decay),
and a float32 matrix product to measure the machine's GEMM rate. Prints one JSON object per
(implementation, shape, operation), like the Rust bench.

    .venv/bin/python bench/torch_baseline.py --threads 2 --shapes small,medium
    python3 bench/torch_baseline.py --device cuda          # GPU figures
"""

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "small": (4096, 64, 256, 4),
    "medium": (16384, 128, 1024, 8),
    "large": (65536, 128, 1024, 8),
    "codec": (8192, 128, 2048, 12),
}


class PlainRvq:
    """The reference algorithm in plain PyTorch."""

    def __init__(self, n_levels, k, d, beta=0.25, decay=0.99, eps=1e-5, device="cpu"):
        limit = 1.0 / k
        self.k, self.beta, self.decay, self.eps = k, beta, decay, eps
        self.counts = [torch.ones(k, device=device) for _ in range(n_levels)]
        self.weights = [torch.empty(k, d, device=device).uniform_(-limit, limit)
                        for _ in range(n_levels)]

    def codebook(self, l):
        c = self.counts[l]
        n = c.sum()
        return self.weights[l] / ((c + self.eps) / (n + self.k * self.eps) * n)[:, None]

    def nearest(self, r, cb):
        return ((cb * cb).sum(1)[None, :] - 2.0 * (r @ cb.t())).argmin(1)

    def train_step(self, x):
        residual, q_sum, loss = x, torch.zeros_like(x), 0.0
        for l in range(len(self.counts)):
            cb = self.codebook(l)
            with torch.no_grad():
                idx = self.nearest(residual.detach(), cb)
            q = cb[idx]
            loss = loss + self.beta * ((q - residual) ** 2).mean()
            with torch.no_grad():
                counts = torch.zeros_like(self.counts[l]).index_add_(
                    0, idx, torch.ones(len(idx), device=idx.device))
                sums = torch.zeros_like(cb).index_add_(0, idx, residual.detach())
                self.counts[l].mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.weights[l].mul_(self.decay).add_(sums, alpha=1 - self.decay)
            residual = residual - q
            q_sum = q_sum + q
        y = x + (q_sum - x).detach()
        return y, loss

    @torch.no_grad()
    def encode(self, x):
        residual, codes = x, []
        for l in range(len(self.counts)):
            cb = self.codebook(l)
            idx = self.nearest(residual, cb)
            codes.append(idx)
            residual = residual - cb[idx]
        return codes

    @torch.no_grad()
    def decode(self, codes):
        return sum(self.codebook(l)[idx] for l, idx in enumerate(codes))


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(repeats, run):
    """Median wall time of `repeats` runs after one warm-up, waiting for the GPU after each."""
    run()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(impl, shape, n, d, k, m, op, seconds):
    print(json.dumps(dict(implementation=impl, shape=shape, n=n, d=d, k=k, m=m, operation=op,
                          median_seconds=round(seconds, 6),
                          vectors_per_second=round(n / seconds, 1))), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="small,medium,large,codec")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-vqp", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    # Plain float32 everywhere, as the Rust side (no TF32 on the GPU).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    a, b = torch.randn(4096, 1024, device=dev), torch.randn(1024, 1024, device=dev)
    gemm = median_seconds(5, lambda: a @ b)
    print(json.dumps(dict(implementation="torch", operation="gemm_4096x1024x1024",
                          median_seconds=round(gemm, 6),
                          gflops=round(2 * 4096 * 1024 * 1024 / gemm / 1e9, 1))), flush=True)

    for shape in args.shapes.split(","):
        n, d, k, m = SHAPES[shape]
        repeats = min(args.repeats, 3) if n >= 65536 else args.repeats
        x = torch.randn(n, d, device=dev)
        plain = PlainRvq(m, k, d, device=dev)
        for _ in range(2):
            plain.train_step(x)

        def train():
            xi = x.clone().requires_grad_(True)
            _, loss = plain.train_step(xi)
            loss.backward()

        report("plain", shape, n, d, k, m, "train_step", median_seconds(repeats, train))
        report("plain", shape, n, d, k, m, "encode", median_seconds(repeats, lambda: plain.encode(x)))
        codes = plain.encode(x)
        report("plain", shape, n, d, k, m, "decode", median_seconds(repeats, lambda: plain.decode(codes)))
        cb = torch.randn(k, d, device=dev)
        products = median_seconds(repeats, lambda: [x @ cb.t() for _ in range(m)])
        print(json.dumps(dict(implementation="torch", shape=shape, operation="gemm",
                              median_seconds=round(products, 6),
                              gflops=round(2 * n * d * k * m / products / 1e9, 1))), flush=True)

        if args.skip_vqp:
            continue
        from vector_quantize_pytorch import ResidualVQ
        vqp = ResidualVQ(dim=d, num_quantizers=m, codebook_size=k, decay=0.99,
                         commitment_weight=0.25).to(dev)
        vqp.train()
        xb = x[None]

        def vqp_train():
            xi = xb.clone().requires_grad_(True)
            _, _, loss = vqp(xi)
            loss.sum().backward()

        report("vqp", shape, n, d, k, m, "train_step", median_seconds(repeats, vqp_train))
        vqp.eval()
        with torch.no_grad():
            report("vqp", shape, n, d, k, m, "encode",
                   median_seconds(repeats, lambda: vqp(xb)[1]))
            _, indices, _ = vqp(xb)
            report("vqp", shape, n, d, k, m, "decode",
                   median_seconds(repeats, lambda: vqp.get_output_from_indices(indices)))


if __name__ == "__main__":
    main()
