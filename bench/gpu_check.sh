#!/usr/bin/env bash
# The one-shot GPU check: on one GPU machine, in one go,
#   1. the reference cases and the kernel-path property test on WGPU (the GPU's Vulkan driver),
#   2. the throughput bench, kernel path and tensor path (medians of 5, four shapes),
#   3. the kernels of a training step, an evaluation forward, encode and decode: launches per
#      level and each kernel's time (`--kernels`), and the codec shape's throughput with its
#      search never split over the codes (`RVQ_SEARCH_SPLITS=1`),
#   4. PyTorch's yardsticks on CUDA (`bench/torch_baseline.py --device cuda`, plain PyTorch and
#      vector-quantize-pytorch's ResidualVQ),
# raw JSON lines and logs into one folder, then the README's GPU table from them
# (`bench/gpu_table.py`). It prints its own elapsed time after each stage.
#
#   bash bench/gpu_check.sh --prepare     # here: build and gather what the GPU machine lacks
#   bash bench/gpu_check.sh [OUT]         # there (OUT defaults to bench/results/gpu-DATE)
#   bash bench/gpu_check.sh --smoke OUT   # anywhere: the same stages, small shape, 1 repeat
#
# GPU machines reach no registry, so `--prepare` runs where cargo does: it builds the release
# test and bench binaries (feature wgpu), strips and packs them, downloads the wheels of
# vector-quantize-pytorch and its dependencies (the GPU machines have PyTorch but not it) and
# the Vulkan loader's Debian packages, all into .gpu-check/ (ignored by git, about 40 MiB: it
# travels with the working tree). The test binaries read the fixtures under the path they were
# built in; the run links that path to this checkout when it differs.
#
# The `cuda` backend is not here: Burn 0.22.1's CUDA runtime downloads an LLVM bundle from
# GitHub when it builds (see the README's GPU section).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
start=$(date +%s)
elapsed() { echo "gpu_check: $(($(date +%s) - start)) s: $*" >&2; }
pack=.gpu-check
# vector-quantize-pytorch as bench/requirements.txt pins it, and what it needs beyond PyTorch.
wheels=(vector-quantize-pytorch==1.32.0 einx==0.4.3 einops==0.8.2 frozendict==2.5.1
  loguru==0.7.3 torch-einops-utils==0.2.0)

prepare() {
  rm -rf "$pack"
  mkdir -p "$pack/bin" "$pack/whl" "$pack/gl"
  local messages
  messages=$(mktemp)
  cargo test --release -p rvq-burn --features wgpu --test reference_replay --test properties \
    --no-run --message-format json >"$messages"
  cargo bench -p rvq-burn --features wgpu --bench throughput --no-run \
    --message-format json >>"$messages"
  # Each binary's path, from cargo's own messages; stripped and packed (about 11 MiB each).
  python3 - "$messages" "$pack/bin" <<'EOF'
import json, shutil, subprocess, sys
messages, out = sys.argv[1], sys.argv[2]
for line in open(messages):
    message = json.loads(line)
    if message.get("reason") != "compiler-artifact" or not message.get("executable"):
        continue
    name = message["target"]["name"]
    shutil.copy(message["executable"], f"{out}/{name}")
    subprocess.run(["strip", f"{out}/{name}"], check=True)
    subprocess.run(["xz", "-T2", "-6", f"{out}/{name}"], check=True)
    print(f"gpu_check: {out}/{name}.xz", file=sys.stderr)
EOF
  rm -f "$messages"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$pack/whl" "${wheels[@]}"
  # The Vulkan loader (the device README's recipe), for a GPU machine without one.
  local lists
  lists=$(mktemp -d)
  mkdir -p "$lists/partial"
  local apt_options=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64
    "-oDir::State::Lists=$lists")
  apt-get "${apt_options[@]}" update -qq
  (cd "$pack/gl" && apt-get "${apt_options[@]}" download libvulkan1)
  rm -rf "$lists"
  echo "$root" >"$pack/built-in"
  du -sh "$pack" >&2
  elapsed "prepared"
}

smoke=false
case "${1:-}" in
  --prepare)
    prepare
    exit 0
    ;;
  --smoke)
    smoke=true
    shift
    ;;
esac
out="${1:-bench/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$out"
if [ ! -f "$pack/bin/throughput.xz" ]; then
  command -v cargo >/dev/null || {
    echo "gpu_check: no $pack/ here and no cargo: run 'bash bench/gpu_check.sh --prepare' where cargo is, and carry $pack" >&2
    exit 1
  }
  prepare
fi
bin=$(mktemp -d)
for packed in "$pack"/bin/*.xz; do
  name=$(basename "$packed" .xz)
  xz -dc "$packed" >"$bin/$name"
  chmod +x "$bin/$name"
done
built_in="$(cat "$pack/built-in")"
if [ "$built_in" != "$root" ] && [ ! -e "$built_in" ]; then
  mkdir -p "$(dirname "$built_in")"
  ln -s "$root" "$built_in"
fi
if ! ldconfig -p | grep libvulkan.so.1 >/dev/null; then
  for deb in "$pack"/gl/*.deb; do dpkg -x "$deb" /; done
  ldconfig
fi
# NVIDIA's Vulkan driver where the image keeps it outside the loader's search path.
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
  export VK_DRIVER_FILES="$nvidia_icd"
fi
site=$(mktemp -d)
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  "$pack"/whl/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

# At most 8 files come back from a GPU machine: machine.txt, replay.txt, rust.jsonl,
# kernels.jsonl, unsplit.jsonl, torch.jsonl, table.md and log.txt (every stage's standard
# error).
log="$out/log.txt"
: >"$log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))' || true
  if command -v vulkaninfo >/dev/null; then vulkaninfo --summary | grep -E 'deviceName|driverName' || true; fi
  echo "smoke: $smoke; VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
} 2>&1 | tee "$out/machine.txt"
if $smoke; then
  shapes=small repeats=1 kernel_shapes=small split_shapes=small torch_device=cpu
  torch_threads=2
else
  shapes=small,medium,large,codec repeats=5 kernel_shapes=medium,large split_shapes=codec
  torch_device=cuda torch_threads=16
fi
failed=()
# Runs a stage, its standard error into the log; a failed stage is named at the end, and the
# stages after it still run (their figures are then of a build that failed a check).
stage() {
  local name="$1"
  shift
  if ! "$@" 2>>"$log"; then
    failed+=("$name")
    echo "gpu_check: FAILED: $name" | tee -a "$log" >&2
  fi
  elapsed "$name" 2>&1 | tee -a "$log" >&2
}
elapsed "start"

# 1. Correctness first: every reference case and the property test through the kernel path.
stage "reference replay on wgpu" \
  "$bin/reference_replay" reference_cases_replay_on_wgpu >"$out/replay.txt"
stage "kernel path property test" "$bin/properties" kernel_path >>"$out/replay.txt"
grep -E '^test |test result' "$out/replay.txt" >&2 || true
# 2. Kernel path and tensor path: training step, encode, decode.
stage "throughput" "$bin/throughput" --backends wgpu,wgpu-tensor-dense --shapes "$shapes" \
  --repeats "$repeats" >"$out/rust.jsonl"
# 3. Launches per level and each kernel's time.
stage "kernels" "$bin/throughput" --backends wgpu --shapes "$kernel_shapes" --kernels \
  --repeats 3 >"$out/kernels.jsonl"
# 3b. The search whole where it would be split (codec: 128 cubes of rows, its codes in two
#     splits by default), to time the split against it.
stage "search unsplit" env RVQ_SEARCH_SPLITS=1 "$bin/throughput" --backends wgpu \
  --shapes "$split_shapes" --repeats "$repeats" >"$out/unsplit.jsonl"
# 4. PyTorch on the same shapes.
if python3 -c 'import torch' 2>/dev/null; then
  PYTHONUNBUFFERED=1 stage "PyTorch" python3 bench/torch_baseline.py --device "$torch_device" \
    --threads "$torch_threads" --shapes "$shapes" --repeats "$repeats" >"$out/torch.jsonl"
else
  echo "gpu_check: SKIPPED PyTorch's yardsticks: no torch in python3" | tee -a "$log" >&2
fi
python3 bench/gpu_table.py "$out" | tee "$out/table.md"
rm -rf "$bin" "$site"
elapsed "done" 2>&1 | tee -a "$log" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]}" | tee -a "$log" >&2
  exit 1
fi
