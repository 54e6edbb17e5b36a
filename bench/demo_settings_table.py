"""The README's table of demo runs with different quantizer settings, from their metrics.jsonl.

    python3 bench/demo_settings_table.py NAME=RUN_DIR [NAME=RUN_DIR ...]

For each run: validation PSNR by levels after the last epoch, level-1 perplexity (of K codes)
and usage after the first and the last epoch, and the median training images/s. The runs are
`cargo run --release --example train -- --out RUN_DIR [flags]`.
"""

import json
import statistics
import sys


def main():
    print("| setting | PSNR at 1/2/3/4 levels (dB), epoch 20 | level-1 perplexity, usage: epoch 1 | epoch 20 | per-level perplexity, epoch 20 | images/s (median) |")
    print("|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        name, _, run = arg.partition("=")
        with open(f"{run}/metrics.jsonl") as f:
            epochs = [json.loads(line) for line in f if line.strip()]
        first, last = epochs[0], epochs[-1]
        psnr = " / ".join(f"{v:.2f}" for v in last["val_psnr_db_by_levels"])
        level1 = lambda e: f"{e['val_perplexity'][0]:.1f}, {100 * e['val_usage'][0]:.0f} %"
        per_level = " / ".join(f"{v:.1f}" for v in last["val_perplexity"])
        speed = statistics.median(e["images_per_second"] for e in epochs)
        print(f"| {name} | {psnr} | {level1(first)} | {level1(last)} | {per_level} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
