# Source this (`source scripts/libtorch-env.sh`) before building with the `tch` feature, which
# `cargo test --workspace --all-features` turns on. The first time, it installs a CPU-only
# LibTorch 2.9.0, unpacked from PyPI's wheels (scripts/libtorch_install.py), into .libtorch at
# the root of the repository (about 20 s and 0.5 GB; the wheels, 0.9 GB, are deleted after).
# Then it points torch-sys at it (LIBTORCH) and the dynamic loader at its libraries
# (LD_LIBRARY_PATH): binaries built with `tch` load libtorch_cpu.so at start and have no rpath
# to find it. It returns false, after saying why, when there is no LibTorch.
_rvq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rvq_libtorch="$_rvq_root/.libtorch"
if [ "$(cat "$_rvq_libtorch/build-version" 2>/dev/null)" != 2.9.0 ]; then
  echo "libtorch-env: installing LibTorch 2.9.0 (CPU) into $_rvq_libtorch" >&2
  python3 "$_rvq_root/scripts/libtorch_install.py" "$_rvq_libtorch" \
    || echo "libtorch-env: the install failed" >&2
fi
if [ "$(cat "$_rvq_libtorch/build-version" 2>/dev/null)" = 2.9.0 ]; then
  export LIBTORCH="$_rvq_libtorch"
  export LD_LIBRARY_PATH="$_rvq_libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libtorch-env: LIBTORCH=$LIBTORCH" >&2
  unset _rvq_root _rvq_libtorch
else
  echo "libtorch-env: no LibTorch 2.9.0 in $_rvq_libtorch; the tch feature will not build" >&2
  unset _rvq_root _rvq_libtorch
  false
fi
