# Source this (`source scripts/libtorch-env.sh`) before building with the `tch` feature, which
# `cargo test --workspace --all-features` turns on. The first time, it installs LibTorch 2.9.0
# (the PyPI torch wheel, scripts/libtorch-requirements.txt) into .venv-libtorch at the root of
# the repository (a few minutes, about 6.7 GB). Then it points torch-sys at it (LIBTORCH) and
# the dynamic loader at its libraries (LD_LIBRARY_PATH): binaries built with `tch` load
# libtorch_cpu.so at start and have no rpath to find it.
_rvq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rvq_venv="$_rvq_root/.venv-libtorch"
# The torch package's folder in the venv (it holds lib/ and include/), empty if there is none.
_rvq_torch_dir() {
  "$_rvq_venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true
}
_rvq_torch="$(_rvq_torch_dir)"
if [ -z "$_rvq_torch" ]; then
  echo "libtorch-env: installing LibTorch 2.9.0 into $_rvq_venv" >&2
  rm -rf "$_rvq_venv"
  python3 -m venv "$_rvq_venv" \
    && "$_rvq_venv/bin/pip" install --quiet --disable-pip-version-check \
      -r "$_rvq_root/scripts/libtorch-requirements.txt" \
    || echo "libtorch-env: the install failed" >&2
  _rvq_torch="$(_rvq_torch_dir)"
fi
unset _rvq_root _rvq_venv
unset -f _rvq_torch_dir
if [ -n "$_rvq_torch" ] && [ -f "$_rvq_torch/lib/libtorch_cpu.so" ]; then
  export LIBTORCH="$_rvq_torch"
  export LD_LIBRARY_PATH="$_rvq_torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libtorch-env: LIBTORCH=$LIBTORCH" >&2
  unset _rvq_torch
else
  echo "libtorch-env: no LibTorch in .venv-libtorch; the tch feature will not build" >&2
  unset _rvq_torch
  false
fi
