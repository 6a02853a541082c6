#!/usr/bin/env python3
"""Build llama.cpp's `llama-debug` and `llama-quantize` once, from the llama-cpp-python sdist, and print where.

    python tools/build_llama_cpp.py          # prints the folder holding both binaries (builds when needed)
    python tools/build_llama_cpp.py --check  # prints it, or exits 1 with the command to build

refprism checks llama.cpp two ways (refprism/crosscheck/sides/llamacpp.py): logits at every position through
llama-cpp-python, and the per-tensor dump of llama.cpp's own `llama-debug` tool. Both must be the same llama.cpp,
so the binaries are built from the `vendor/llama.cpp` folder of the very sdist that llama-cpp-python is built
from (LLAMA_CPP_PYTHON in refprism/crosscheck/sides/llamacpp.py; pyproject's extra `llamacpp` pins the same version).

What this does, each step skipped when already done:
1. llama-cpp-python == LLAMA_CPP_PYTHON is importable, else `pip install llama-cpp-python==...` (pip builds it
   from source with cmake and g++, ~11 minutes on 2 cores, and caches the wheel under ~/.cache/pip);
2. the sdist is fetched with `pip download --no-binary :all:` into the cache folder;
3. its vendor/llama.cpp gets one patch (PATCHES: llama-debug flushes its logger before exiting, as common/log.h
   asks; without it the end of its dump is often lost), is configured with cmake (Release, CPU only, static
   libraries, no OpenSSL/HTTPS, no server, no tests) and the two targets are built with `-j2` (~9-10 minutes
   cold on 2 cores).

Cache: ~/.cache/refprism/llama.cpp/<version>/ (or $REFPRISM_CACHE/llama.cpp/<version>/), never the repository.
A stamp file records the build options and this machine's CPU flags (ggml is built with -march=native): a
cache restored on another CPU type is rebuilt rather than trusted. A cached run takes well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # refprism from this checkout, installed or not
from refprism.crosscheck.sides.llamacpp import BUILD_COMMAND, LLAMA_CPP_PYTHON, cache_dir  # noqa: E402  (one source of both)

TARGETS = ("llama-debug", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: nothing to find at run time
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS: these tools only read local files
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",  # llama-debug lives in examples/debug
    "-DLLAMA_BUILD_TOOLS=ON",  # llama-quantize lives in tools/quantize
    "-DGGML_NATIVE=ON",
)


def _cpu_key() -> str:
    """This machine's architecture and CPU feature flags, hashed: a -march=native build runs only where they match."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:16]


# One patch to the vendored sources, and only to the debug tool's exit: llama.cpp's logger prints from a worker
# thread, and common/log.h asks callers to "call common_log_flush() before exit if you want to ensure all logs are
# flushed"; examples/debug/debug.cpp does not, so the end of its tensor dump and its token ids are often lost when
# the process exits (about half of the runs on 2 busy cores). No computation is touched.
PATCHES = [(
    "examples/debug/debug.cpp",
    "    llama_backend_free();\n\n    return 0;\n}",
    "    llama_backend_free();\n\n    common_log_flush(common_log_main());  // refprism: print the whole dump\n"
    "    return 0;\n}",
)]


def _stamp() -> dict:
    return {"llama-cpp-python": LLAMA_CPP_PYTHON, "cmake": list(CMAKE_OPTIONS), "cpu": _cpu_key(),
            "patches": [f"{path}: {new.strip().splitlines()[-3].strip()}" for path, _, new in PATCHES]}


def _patch(src: Path) -> None:
    for rel, old, new in PATCHES:
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"build_llama_cpp: {rel} no longer reads as expected (the exit of main): "
                             "review PATCHES for this llama.cpp version")
        path.write_text(text.replace(old, new))


def locate() -> Path | None:
    """The folder holding llama-debug and llama-quantize of the pinned version built for this CPU, or None."""
    bin_dir = cache_dir() / "bin"
    try:
        stamp = json.loads((bin_dir / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    if stamp != _stamp() or not all(os.access(bin_dir / t, os.X_OK) for t in TARGETS):
        return None
    return bin_dir




def _say(*args) -> None:
    print("build_llama_cpp:", *args, file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> None:
    _say("$", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def ensure_python_package() -> None:
    """llama-cpp-python at the pinned version, installed with pip (a source build, cached by pip) when missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("llama-cpp-python") == LLAMA_CPP_PYTHON:
            return
    except PackageNotFoundError:
        pass
    _run([sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])


def _sdist() -> Path:
    folder = cache_dir() / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(folder)])
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not found:
        raise SystemExit(f"build_llama_cpp: pip download left no llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz in "
                         f"{folder}")
    return found[0]


def build_binaries(jobs: int = 2) -> Path:
    """Configure and build llama-debug and llama-quantize from the sdist's vendor/llama.cpp; return the bin folder."""
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_llama_cpp: {tool} is missing: apt-get install -y cmake g++")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    sdist = _sdist()
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        tmp = Path(tmp)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        src = tmp / prefix
        _patch(src)
        build = tmp / "build"
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS])
        _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)])
        staged = tmp / "bin"
        staged.mkdir()
        for t in TARGETS:
            shutil.copy2(build / "bin" / t, staged / t)
        (staged / "stamp.json").write_text(json.dumps(_stamp(), indent=1) + "\n")
        final = root / "bin"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)  # the bin folder appears whole or not at all
    return root / "bin"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report: print the folder, or exit 1 if not built")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args(argv)
    found = locate()
    if args.check:
        if found is None:
            print(f"llama.cpp {LLAMA_CPP_PYTHON} tools are not built for this machine: run {BUILD_COMMAND}",
                  file=sys.stderr)
            return 1
        print(found)
        return 0
    ensure_python_package()
    if found is None:
        found = build_binaries(args.jobs)
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
