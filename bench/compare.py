#!/usr/bin/env python3
"""Runs the Rust throughput bench and the PyTorch baselines in one go, on the same machine,
and prints the ratio table the README carries.

    .venv/bin/python bench/compare.py --shapes small,medium,large,codec --threads 2

Ratios are speed-ups: PyTorch median time / Rust median time (above 1: Rust is faster).
"""

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(command):
    print("$", " ".join(command), file=sys.stderr, flush=True)
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="small,medium,large,codec")
    parser.add_argument("--backend", default="flex")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rust = run(["cargo", "bench", "-q", "-p", "rvq-burn", "--bench", "throughput", "--",
                "--backends", args.backend, "--shapes", args.shapes,
                "--repeats", str(args.repeats)])
    torch = run([sys.executable, "bench/torch_baseline.py", "--threads", str(args.threads),
                 "--shapes", args.shapes, "--repeats", str(args.repeats)])

    def median(rows, impl_key, impl, shape, op):
        for row in rows:
            if row.get(impl_key) == impl and row.get("shape") == shape and row["operation"] == op:
                return row["median_seconds"]
        return None

    def gflops(rows, impl_key, impl, shape):
        for row in rows:
            if row.get(impl_key) == impl and row.get("shape") == shape and row["operation"] == "gemm":
                return row["gflops"]
        return None

    print(f"| shape | operation | rvq-burn ({args.backend}) | plain PyTorch | ResidualVQ "
          "| vs plain | vs ResidualVQ |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for op in ["train_step", "encode", "decode"]:
            ours = median(rust, "backend", args.backend, shape, op)
            plain = median(torch, "implementation", "plain", shape, op)
            vqp = median(torch, "implementation", "vqp", shape, op)
            ratio = lambda other: f"{other / ours:.2f}x" if other and ours else "-"
            fmt = lambda t: f"{t * 1000:.1f} ms" if t else "-"
            print(f"| {shape} | {op} | {fmt(ours)} | {fmt(plain)} | {fmt(vqp)} "
                  f"| {ratio(plain)} | {ratio(vqp)} |")
    print()
    print("| shape | nearest-code search, rvq-burn (products' rate) | distance GEMM, Burn "
          "matmul | distance GEMM, PyTorch | search / PyTorch GEMM |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        search = None
        for row in rust:
            if row.get("backend") == args.backend and row.get("shape") == shape \
                    and row["operation"] == "search":
                search = row["gflops"]
        torch_gemm = gflops(torch, 'implementation', 'torch', shape)
        share = f"{search / torch_gemm:.0%}" if search and torch_gemm else "-"
        print(f"| {shape} | {search} GFLOP/s | {gflops(rust, 'backend', args.backend, shape)} "
              f"GFLOP/s | {torch_gemm} GFLOP/s | {share} |")
    for row in torch:
        if row["operation"].startswith("gemm_"):
            print(f"\nPyTorch {row['operation']}: {row['gflops']} GFLOP/s")


if __name__ == "__main__":
    main()
