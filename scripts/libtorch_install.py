"""Installs a CPU-only LibTorch 2.9.0 for the `tch` feature into a folder (argument 1).

PyPI's torch wheel carries LibTorch: its headers and shared libraries. This keeps only what a
CPU build links and loads (libtorch_cpu, libc10, libgomp and the two CUDA libraries that
libtorch_cpu names), about 0.5 GB, instead of a venv with the whole CUDA stack (6.7 GB). The
folder gets LibTorch's own layout (include/, lib/, build-version), which torch-sys reads
through LIBTORCH and checks the version of. The wheels are pinned by hash
(scripts/libtorch-requirements.txt) and deleted once unpacked.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "2.9.0"
# wheel member prefix -> folder under the install, and the files kept from it (None: all).
KEEP = [
    ("torch/include/", "include/", None),
    ("torch/lib/", "lib/", {"libtorch_cpu.so", "libc10.so", "libgomp.so.1"}),
    ("nvidia/cuda_runtime/lib/", "lib/", {"libcudart.so.12"}),
    ("nvidia/cuda_cupti/lib/", "lib/", {"libcupti.so.12"}),
]
# torch-sys links `-ltorch` too. The wheel's libtorch.so holds no code: it only names
# libtorch_cpu.so and libtorch_cuda.so. A linker script naming the first does the same job
# without pulling in the CUDA part; torch-sys also links CUDA when it sees libtorch_cuda.so,
# which is not unpacked.
LIBTORCH_SO = "/* libtorch.so without its CUDA half (scripts/libtorch_install.py) */\nINPUT(libtorch_cpu.so)\n"


def main(dest: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    staging = dest + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    # Downloads (and pip's own temporary files) beside the destination, not in /tmp, which
    # may be a small tmpfs.
    with tempfile.TemporaryDirectory(dir=parent, prefix=".libtorch-wheels-") as wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--python-version", "3.11",
             "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
             "--require-hashes",
             "-r", os.path.join(here, "libtorch-requirements.txt"), "-d", wheels],
            check=True,
            env=dict(os.environ, TMPDIR=wheels),
        )
        for name in sorted(os.listdir(wheels)):
            with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
                for member in wheel.infolist():
                    for prefix, folder, files in KEEP:
                        rest = member.filename[len(prefix):]
                        if not member.filename.startswith(prefix) or member.is_dir():
                            continue
                        if files is not None and rest not in files:
                            continue
                        target = os.path.join(staging, folder, rest)
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with wheel.open(member) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
    lib = os.path.join(staging, "lib")
    missing = [f for _, _, files in KEEP if files for f in files if not os.path.exists(os.path.join(lib, f))]
    if missing:
        sys.exit(f"libtorch_install: the wheels lack {', '.join(missing)}")
    with open(os.path.join(lib, "libtorch.so"), "w") as f:
        f.write(LIBTORCH_SO)
    with open(os.path.join(staging, "build-version"), "w") as f:
        f.write(VERSION)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(staging, dest)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: libtorch_install.py DEST")
    main(sys.argv[1])
