#!/usr/bin/env python3
"""The demo against its PyTorch yardstick, one after the other, in rounds: the demo's default
build (`cargo run --release --example train`) and `bench/torch_vqvae.py --threads 2`, the same
recipe and epochs. Keeps every run's metrics under --out and prints, per round and overall, the
median epoch's images per second of each, their ratio, and the last epoch's validation PSNR.

    .venv/bin/python bench/demo_vs_torch.py --rounds 3 --epochs 20 --out bench/results/DIR

Extra arguments after `--` go to the demo (e.g. `-- --backend tch` with the tch feature built:
then pass --features tch too).
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def summary(rows):
    return {
        "median_images_per_second": statistics.median(r["images_per_second"] for r in rows),
        "val_psnr_db": rows[-1]["val_psnr_db"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--features", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("demo_args", nargs="*")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    features = ["--features", args.features] if args.features else []
    build = ["cargo", "build", "--release", "--example", "train", *features]
    subprocess.run(build, cwd=ROOT, check=True)
    ratios = []
    for round_ in range(1, args.rounds + 1):
        demo_dir = out / f"round{round_}_1_demo"
        demo = [
            str(ROOT / "target" / "release" / "examples" / "train"),
            "--epochs", str(args.epochs), "--out", str(demo_dir), *args.demo_args,
        ]
        print("$", " ".join(demo), file=sys.stderr, flush=True)
        subprocess.run(demo, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        torch_file = out / f"round{round_}_2_torch_vqvae_metrics.jsonl"
        torch = [
            sys.executable, str(ROOT / "bench" / "torch_vqvae.py"),
            "--threads", "2", "--epochs", str(args.epochs),
        ]
        print("$", " ".join(torch), file=sys.stderr, flush=True)
        with torch_file.open("w") as sink:
            subprocess.run(torch, cwd=ROOT, check=True, stdout=sink)
        rust, py = summary(metrics(demo_dir / "metrics.jsonl")), summary(metrics(torch_file))
        ratio = rust["median_images_per_second"] / py["median_images_per_second"]
        ratios.append(ratio)
        line = {"round": round_, "demo": rust, "torch": py, "ratio": ratio}
        print(json.dumps(line), flush=True)
        with (out / "summary.jsonl").open("a") as sink:
            sink.write(json.dumps(line) + "\n")
    print(json.dumps({"rounds": args.rounds, "median_ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
