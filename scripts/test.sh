#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine, then runs every test:
#   bash scripts/test.sh [extra cargo test arguments]
# - Mesa's software Vulkan (the WGPU tests run on it where there is no GPU) and a C++ compiler
#   (torch-sys builds its wrapper), through apt-get where they are missing (needs root);
# - LibTorch 2.9.0 for the `tch` feature, into .libtorch the first time
#   (scripts/libtorch-env.sh: 0.5 GB from PyPI);
# then `cargo test --workspace --all-features`. CI (.ci/run) does the same after fmt, clippy
# and doc.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s mesa-vulkan-drivers libvulkan1 g++ >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 g++
fi
source scripts/libtorch-env.sh
cargo test --workspace --all-features "$@"
