#!/usr/bin/env python3
"""The README's GPU table from the raw JSON lines `bench/gpu_check.sh` writes.

    python3 bench/gpu_table.py bench/results/gpu-DATE

Reads, from that folder, `rust.jsonl` (`cargo bench ... --bench throughput`, backends `wgpu`:
the kernel path, and `wgpu-tensor-dense`: the tensor path with dense statistics),
`torch.jsonl` (`bench/torch_baseline.py`: `plain` PyTorch and `vqp`, vector-quantize-pytorch's
ResidualVQ), `kernels.jsonl` (`--kernels`: launches per level) and `unsplit.jsonl` (the kernel
path with `RVQ_SEARCH_SPLITS=1`). Prints Markdown: median times, ratios as PyTorch's time over
the kernel path's (above 1: ours is faster), then the launches per level of each operation,
then the kernel path with its search split over the codes (the default) against it whole. A
missing measurement prints as "-".
"""

import json
import pathlib
import sys

SHAPES = ["small", "medium", "large", "codec"]
OPERATIONS = ["train_step", "encode", "decode"]
OURS = [("wgpu", "kernel path (wgpu)"), ("wgpu-tensor-dense", "tensor path, dense statistics")]
THEIRS = [("plain", "plain PyTorch"), ("vqp", "ResidualVQ")]


def rows(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main():
    folder = pathlib.Path(sys.argv[1])
    times = {}
    for row in rows(folder / "rust.jsonl"):
        if row.get("operation") in OPERATIONS:
            times[(row["backend"], row["shape"], row["operation"])] = row["median_seconds"]
    for row in rows(folder / "torch.jsonl"):
        if row.get("operation") in OPERATIONS and "shape" in row:
            times[(row["implementation"], row["shape"], row["operation"])] = row["median_seconds"]

    def cell(seconds):
        return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"

    def ratio(theirs, ours):
        return "-" if theirs is None or ours is None else f"{theirs / ours:.2f}x"

    header = [name for _, name in OURS + THEIRS]
    header += [f"kernel path vs {name}" for _, name in THEIRS]
    print("| shape | operation | " + " | ".join(header) + " |")
    print("|" + "---|" * (len(header) + 2))
    for shape in SHAPES:
        for operation in OPERATIONS:
            get = lambda key: times.get((key, shape, operation))  # noqa: E731
            if all(get(key) is None for key, _ in OURS + THEIRS):
                continue
            cells = [cell(get(key)) for key, _ in OURS + THEIRS]
            cells += [ratio(get(key), get("wgpu")) for key, _ in THEIRS]
            print(f"| {shape} | {operation} | " + " | ".join(cells) + " |")

    launches = [
        row
        for row in rows(folder / "kernels.jsonl")
        if "launches_per_level" in row and "kernel" not in row
    ]
    if launches:
        print()
        print("| shape | operation | launches | per level |")
        print("|---|---|---|---|")
        for row in launches:
            print(
                f"| {row['shape']} (M = {row['m']}) | {row['operation']} | {row['launches']} "
                f"| {row['launches_per_level']:.2f} |"
            )

    unsplit = [
        row for row in rows(folder / "unsplit.jsonl") if row.get("operation") in OPERATIONS
    ]
    if unsplit:
        print()
        print("| shape | operation | search split (default) | search whole | whole over split |")
        print("|---|---|---|---|---|")
        for row in unsplit:
            split = times.get(("wgpu", row["shape"], row["operation"]))
            whole = row["median_seconds"]
            print(
                f"| {row['shape']} | {row['operation']} | {cell(split)} | {cell(whole)} "
                f"| {ratio(whole, split)} |"
            )


if __name__ == "__main__":
    main()
