#!/usr/bin/env bash
# Bounded fuzzing of every loader that reads untrusted bytes: the demo's IDX parser, quantizer
# checkpoints (burnpack records), compressed streams and PyTorch codec checkpoints (.pt and
# safetensors, `interop`).
#
#   fuzz/run.sh            # 60 s per target
#   fuzz/run.sh 600 idx    # 10 min on one target
#
# Installs cargo-fuzz when missing. Runs on the pinned stable toolchain with `--sanitizer
# none` (the code is safe Rust: what fuzzing looks for is panics, hangs and runaway
# allocations, which libFuzzer reports without a sanitizer). Crashes land in
# fuzz/artifacts/<target>/; corpora grow in fuzz/corpus/<target>/ (both ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx checkpoint stream interop)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Seeds: the embedded digits, a real checkpoint and real streams.
mkdir -p fuzz/corpus/idx
cp -n crates/vqvae-demo/data/*.gz fuzz/corpus/idx/ 2>/dev/null || true
cargo run -q -p rvq-burn --example fuzz_seeds -- fuzz/corpus
# The interop cases of the seed shape (4 levels, 64 codes of 8), and the whole-model .pt.
mkdir -p fuzz/corpus/interop
cp -n crates/rvq-burn/tests/fixtures/interop/*_m4_k64_d8.before.safetensors \
  crates/rvq-burn/tests/fixtures/interop/*.pt fuzz/corpus/interop/

for target in "${targets[@]}"; do
  echo "== $target: ${seconds} s"
  cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536
done
