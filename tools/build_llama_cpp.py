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
2. the sdist is fetched with `pip download --no-binary llama-cpp-python` into the cache folder (seconds);
3. its vendor/llama.cpp gets one patch (PATCHES: llama-debug flushes its logger before exiting, as common/log.h
   asks; without it the end of its dump is often lost), is configured with cmake (Release, CPU only, static
   libraries, no OpenSSL/HTTPS, no server, no tests) and the two targets are built with `-j2` (~9-10 minutes
   cold on 2 cores), in a tree kept in the cache (tree/);
4. the planted builds (PLANTS: llama-debug with one mistake edited into llama.cpp's source, e.g. the post-attention
   norm skipped) for the tests of `refprism compare --llama-cpp DIR`: one file recompiled in the kept tree and the
   edit undone (a minute or two), each into planted/<name>/.

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


# Builds with one mistake planted in llama.cpp's own source, for the tests of `refprism compare --llama-cpp DIR`
# (tests/test_other_llamacpp.py): each is the clean source with one edit, so that compare must find the first
# divergence and name the mistake from llama-debug's printed values alone. name -> (file, old, new).
PLANTS = {
    "post-norm-skipped": (
        "src/models/gemma3.cpp",
        "        cur = build_norm(cur,\n                model.layers[il].attn_post_norm, NULL,\n"
        "                LLM_NORM_RMS, il);\n        cb(cur, \"attn_post_norm\", il);",
        "        cb(cur, \"attn_post_norm\", il);  // refprism's planted mistake: the post-attention norm skipped",
    ),
    "gemma4-layer-scalar-skipped": (  # Gemma 4: each layer's output left unscaled by layer_output_scale
        "src/models/gemma4.cpp",
        "            cur = ggml_mul(ctx0, cur, model.layers[il].out_scale);\n",
        "            // refprism's planted mistake: layer_output_scale skipped\n",
    ),
    "gemma4-post-norm-skipped": (  # Gemma 4: the post-attention norm skipped, as post-norm-skipped in gemma3.cpp
        "src/models/gemma4.cpp",
        "        cur = build_norm(cur,\n                model.layers[il].attn_post_norm, nullptr,\n"
        "                LLM_NORM_RMS, il);\n        cb(cur, \"attn_post_norm\", il);",
        "        cb(cur, \"attn_post_norm\", il);  // refprism's planted mistake: the post-attention norm skipped",
    ),
    # Gemma 4's router (gemma4.cpp's build_moe_ffn call): the top-k probabilities left unrenormalised (norm_w false),
    # and per_expert_scale (ffn_down_exps_s, applied to each expert's down output) not passed
    "gemma4-router-root-d-missing": (  # the router's input not scaled by 1 / sqrt(n_embd)
        "src/models/gemma4.cpp",
        "            tmp = ggml_scale(ctx0, tmp, 1.0f / sqrtf((float) n_embd));\n",
        "            // refprism's planted mistake: the router's 1 / sqrt(n_embd) dropped\n",
    ),
    "gemma4-router-reads-expert-input": (  # the router fed the experts' normed input, not the residual
        "src/models/gemma4.cpp",
        "            ggml_tensor * tmp = ggml_rms_norm(ctx0, attn_out, hparams.f_norm_rms_eps);\n",
        "            ggml_tensor * tmp = ggml_rms_norm(ctx0, cur_moe, hparams.f_norm_rms_eps);"
        "  // refprism's planted mistake\n",
    ),
    "gemma4-topk-not-renormalised": (
        "src/models/gemma4.cpp",
        "                    LLM_FFN_GELU, true,\n",
        "                    LLM_FFN_GELU, false,  // refprism's planted mistake: top-k weights not renormalised\n",
    ),
    "gemma4-per-expert-scale-dropped": (
        "src/models/gemma4.cpp",
        "                    model.layers[il].ffn_down_exps_s);\n",
        "                    nullptr);  // refprism's planted mistake: per_expert_scale dropped\n",
    ),
    # Gemma 4's KV sharing (the Gemma 3n / Gemma 4 reuse callback): a sliding consumer reuses the K/V of layer
    # (first shared layer) - 4, not - 2; on tests/test_compare_gemma4_llamacpp.py's layout S F S F | S F F that is
    # layer 0 for consumer 4 (the first sliding layer; its producer is layer 2), a layer of the same shapes.
    "gemma4-kv-producer-wrong": (
        "src/llama-model.cpp",
        "                                return hparams.n_layer_kv_from_start - (hparams.is_swa(il) ? 2 : 1);\n",
        "                                return hparams.n_layer_kv_from_start - (hparams.is_swa(il) ? 4 : 1);"
        "  // refprism's planted mistake: the wrong producer\n",
    ),
}


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


def _plant_stamp(name: str) -> dict:
    file, old, new = PLANTS[name]
    return {**_stamp(), "planted": name, "edit": hashlib.sha256(f"{file}\0{old}\0{new}".encode()).hexdigest()}


def locate_planted(name: str) -> Path | None:
    """The folder holding llama-debug built with the mistake PLANTS[name], or None when it is not built here."""
    folder = cache_dir() / "planted" / name
    try:
        stamp = json.loads((folder / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    return folder if stamp == _plant_stamp(name) and os.access(folder / "llama-debug", os.X_OK) else None


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
    # --no-binary for this package alone: with :all: pip also built the sdist's build backend from source, most of
    # a cold 33-minute run on 2 busy cores; this way 12 s (its wheels are fine: only llama.cpp's source is wanted)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(folder)])
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not found:
        raise SystemExit(f"build_llama_cpp: pip download left no llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz in "
                         f"{folder}")
    return found[0]


def _tree() -> tuple[Path, Path]:
    """The sdist's vendor/llama.cpp, patched (PATCHES), and its configured build folder: kept in the cache
    (cache_dir()/tree/) so that a planted build recompiles only the file it edits. CMake records absolute paths,
    so both are made in place; a stamp written last marks the tree whole (an interrupted one is made again)."""
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_llama_cpp: {tool} is missing: apt-get install -y cmake g++")
    root = cache_dir()
    tree = root / "tree"
    src, build, stamp = tree / "src", tree / "build", tree / "stamp.json"
    try:
        if json.loads(stamp.read_text()) == _stamp():
            return src, build
    except (OSError, ValueError):
        pass
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    sdist = _sdist()
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / prefix, src)
    _patch(src)
    _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS])
    stamp.write_text(json.dumps(_stamp(), indent=1) + "\n")
    return src, build


def _stage(files: dict[str, Path], stamp: dict, final: Path) -> Path:
    """Copy the built files into `final` with their stamp; the folder appears whole or not at all."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=".stage-"))
    for name, path in files.items():
        shutil.copy2(path, staged / name)
    (staged / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    return final


def build_binaries(jobs: int = 2) -> Path:
    """Build llama-debug and llama-quantize from the sdist's vendor/llama.cpp; return the bin folder."""
    _src, build = _tree()
    _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)])
    return _stage({t: build / "bin" / t for t in TARGETS}, _stamp(), cache_dir() / "bin")


def build_planted(name: str, jobs: int = 2) -> Path:
    """Build llama-debug with the mistake PLANTS[name] in its source (one file edited, recompiled, then restored:
    the clean bin/ folder is untouched); return its folder, cache_dir()/planted/<name>/."""
    src, build = _tree()
    rel, old, new = PLANTS[name]
    path = src / rel
    clean = path.read_text()
    if clean.count(old) != 1:
        raise SystemExit(f"build_llama_cpp: {rel} no longer reads as the planted mistake {name!r} expects: "
                         "review PLANTS for this llama.cpp version")
    try:
        path.write_text(clean.replace(old, new))
        _run(["cmake", "--build", str(build), "--target", "llama-debug", "-j", str(jobs)])
        return _stage({"llama-debug": build / "bin" / "llama-debug"}, _plant_stamp(name),
                      cache_dir() / "planted" / name)
    finally:
        path.write_text(clean)  # the tree is clean again (its next build recompiles this file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report: print the folder, or exit 1 if not built")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args(argv)
    found = locate()
    if args.check:
        if found is None or any(locate_planted(name) is None for name in PLANTS):
            print(f"llama.cpp {LLAMA_CPP_PYTHON} tools are not built for this machine: run {BUILD_COMMAND}",
                  file=sys.stderr)
            return 1
        print(found)
        return 0
    ensure_python_package()
    if found is None:
        found = build_binaries(args.jobs)
    for name in PLANTS:  # the planted builds the tests check `compare --llama-cpp DIR` on
        if locate_planted(name) is None:
            build_planted(name, args.jobs)
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
