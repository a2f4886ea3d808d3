#!/usr/bin/env python3
"""Prepare, on a machine with internet, a folder from which a GPU node without internet installs vecrl.

    python3 tools/offline_bundle.py DIR --python-version 3.12     # here: downloads ~50 MB into DIR
    ./dev offline-install DIR                                     # on the node (after copying DIR and the repo)

The node is expected to have jax (with its CUDA plugin), flax, optax, orbax-checkpoint, chex, numpy, scipy, lxml,
matplotlib and tqdm already, as GPU images do; what it lacks is MuJoCo, MJX and dm_control. The folder holds:
- the wheels of mujoco and mujoco-mjx (the pinned release) and of their small pure dependencies;
- dm_control's own wheel cut down to what the environments read: the packages `dm_control.suite` imports
  (`suite`, `mujoco`, `rl`, `utils`, `_render`) with the suite's XML and assets, published in the folder as version
  `<release>+suite` (locomotion, manipulation, composer, mjcf, the viewer and their 80 MB of assets dropped, and the
  requirements only those packages need); the whole dm_control wheel is 56 MB by itself;
- setuptools (to install the repository in editable mode without an index), and requirements.txt.

Only Python's standard library and pip are needed to run this; nothing is imported from vecrl.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile

# Versions within pyproject.toml's ranges, measured to work together (docs/dependencies.md).
MUJOCO = "3.17.0"
DM_CONTROL = "1.0.50"
# What mujoco, mujoco-mjx and the cut-down dm_control need beyond a GPU image's packages (no-deps downloads).
SMALL_WHEELS = ["glfw", "pyopengl", "websockets", "trimesh", "dm-env", "dm-tree", "attrs", "wrapt", "absl-py",
               "etils", "fsspec", "importlib_resources", "typing_extensions", "zipp", "setuptools>=68"]
# The dm_control packages that `dm_control.suite` imports (checked with sys.modules after importing every domain).
KEPT_PACKAGES = ("suite", "mujoco", "rl", "utils", "_render")
# Requirements of dm_control that the kept packages import (the others serve locomotion, mjcf, the viewer, ...).
KEPT_REQUIREMENTS = ("absl-py", "dm-env", "glfw", "lxml", "mujoco", "numpy", "pyopengl", "scipy")
LIMIT_BYTES = 60 * 2**20
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _kept(path: str, dist_info: str) -> bool:
    if path.startswith(dist_info + "/"):
        return True
    parts = path.split("/")
    if parts[0] != "dm_control":
        return False
    if len(parts) == 2:  # dm_control/__init__.py and other top-level modules
        return parts[1] == "__init__.py"
    return parts[1] in KEPT_PACKAGES and "__pycache__" not in parts and not parts[-1].endswith("_test.py")


def trim_dm_control(wheel: str, out_dir: str, local: str = "suite") -> str:
    """dm_control's wheel with only KEPT_PACKAGES, KEPT_REQUIREMENTS and the version `<version>+<local>`."""
    name = os.path.basename(wheel)
    m = re.match(r"(dm_control)-([^-]+)-(.+)\.whl$", name)
    if not m:
        raise ValueError(f"{name} is not a dm_control wheel")
    dist, version, tags = m.groups()
    new_version = f"{version}+{local}"
    old_info, new_info = f"{dist}-{version}.dist-info", f"{dist}-{new_version}.dist-info"
    out = os.path.join(out_dir, f"{dist}-{new_version}-{tags}.whl")
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not _kept(info.filename, old_info) or info.filename.endswith("/RECORD"):
                continue
            data = src.read(info.filename)
            path = info.filename.replace(old_info, new_info, 1)
            if path == f"{new_info}/METADATA":
                data = _trim_metadata(data.decode(), new_version).encode()
            dst.writestr(path, data)
            records.append((path, _record_hash(data), str(len(data))))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((f"{new_info}/RECORD", "", ""))
        dst.writestr(f"{new_info}/RECORD", buf.getvalue())
    return out


def _trim_metadata(text: str, version: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("Version:"):
            line = f"Version: {version}"
        elif line.startswith("Requires-Dist:"):
            requirement = line.split(":", 1)[1].strip()
            if ";" in requirement:  # extras (hdf5): not part of the cut-down package
                continue
            req_name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            if req_name not in KEPT_REQUIREMENTS:
                continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _download(packages: list[str], dest: str, python_version: str) -> None:
    platforms = [arg for p in MANYLINUX for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, *platforms, "--dest", dest, *packages]
    subprocess.run(cmd, check=True)


def prepare(out_dir: str, python_version: str) -> int:
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} is not empty: give a new folder (nothing there is overwritten)")
    os.makedirs(out_dir, exist_ok=True)
    _download([f"mujoco=={MUJOCO}", f"mujoco-mjx=={MUJOCO}", *SMALL_WHEELS], out_dir, python_version)
    with tempfile.TemporaryDirectory() as tmp:
        _download([f"dm_control=={DM_CONTROL}"], tmp, python_version)
        (full,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        trim_dm_control(full, out_dir)
    wheels = sorted(f for f in os.listdir(out_dir) if f.endswith(".whl"))
    with open(os.path.join(out_dir, "requirements.txt"), "w") as f:
        f.write(f"# Installed by ./dev offline-install with pip --no-index (Python {python_version}).\n")
        f.write(f"mujoco=={MUJOCO}\nmujoco-mjx=={MUJOCO}\ndm_control=={DM_CONTROL}+suite\n")
    total = sum(os.path.getsize(os.path.join(out_dir, w)) for w in wheels)
    for w in wheels:
        print(f"{os.path.getsize(os.path.join(out_dir, w)) / 2**20:7.2f} MB  {w}")
    print(f"{total / 2**20:7.2f} MB  in all, in {out_dir}")
    if total > LIMIT_BYTES:
        print(f"warning: more than {LIMIT_BYTES / 2**20:.0f} MB", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a new or empty folder")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU node's Python, e.g. 3.12 (default: this interpreter's)")
    args = parser.parse_args(argv)
    return prepare(args.out_dir, args.python_version)


if __name__ == "__main__":
    sys.exit(main())
