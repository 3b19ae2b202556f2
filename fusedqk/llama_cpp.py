"""llama.cpp, built from pinned source, for the llama-bench and llama-server engine files.

llama.cpp publishes no binary that installs from the registries fusedqk uses, but PyPI carries
its source: the source distribution of ``llama-cpp-python`` vendors a whole llama.cpp tree. This
module takes that distribution (downloaded with pip, or a file given with ``--source``), unpacks
only what ``llama-bench`` and ``llama-server`` need, builds them with CMake for one backend, and
keeps them in ``$FUSEDQK_CACHE_DIR/llama.cpp/<commit>-<backend>/`` with a ``build.json`` that
names the commit, the backend and every CMake flag, so a second run builds nothing.

``GGML_CUDA_DISABLE_FUSION`` is the engine's own switch for every CUDA fusion it has
(``ggml/src/ggml-cuda/ggml-cuda.cu`` at the pinned commit: read with ``getenv`` once per process;
any non-zero integer turns fusion off). The engine files in ``config/engines/`` use it as the
toggle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fusedqk.errors import UserError, first_line

# The pin: llama-cpp-python's source distribution and the llama.cpp commit it vendors (the git
# metadata shipped in vendor/llama.cpp).
SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_INDEX = f"https://pypi.org/simple/{SDIST_NAME}/"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# llama.cpp numbers its builds by commit count (cmake/build-info.cmake asks git); the source
# distribution has no history, so CMake would count whatever repository encloses the build
# folder. The release of this commit is tagged b11312 (ggml-org/llama.cpp's release tags name
# that count), so the build says so, and the engine files' version checks can rely on it.
BUILD_NUMBER = 11312
VENDOR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
# What the two tools need of the tree; tools/CMakeLists.txt is replaced by one that adds only
# them and what the server links (mtmd, the UI stub).
PARTS = ("CMakeLists.txt", "LICENSE", "cmake/", "common/", "ggml/", "include/", "licenses/",
         "scripts/", "src/", "vendor/", "tools/llama-bench/", "tools/mtmd/", "tools/server/",
         "tools/ui/CMakeLists.txt", "tools/ui/sources.cmake", "tools/ui/ui.cpp.in",
         "tools/ui/ui.h.in")
TOOLS_CMAKE = """# Written by fusedqk: only the tools its engine files run.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(mtmd)
add_subdirectory(ui)
add_subdirectory(server)
"""
BINARIES = ("llama-bench", "llama-server")
BACKENDS = ("cpu", "cuda")
ENV_BIN = "FUSEDQK_LLAMA_CPP"  # a llama.cpp build of the user's own
ENV_SOURCE = "FUSEDQK_LLAMA_CPP_SOURCE"  # the source to build from, where PyPI cannot be reached


@dataclass(frozen=True)
class Build:
    """A finished build: its folder, the two binaries and what it was built from."""

    folder: Path
    info: dict


def cmake_flags(backend: str, cuda_arch: str) -> list[str]:
    """The configuration: static, release, no network (no curl, no prebuilt UI from a hub), no
    tests or examples; CPU code for any x86-64 (GGML_NATIVE off); CUDA for ``cuda_arch`` only."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
             "-DGGML_NATIVE=OFF", "-DGGML_CCACHE=OFF", f"-DLLAMA_BUILD_COMMIT={COMMIT[:7]}",
             f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}"]
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}",
                  "-DGGML_CUDA_NCCL=OFF"]
    return flags


def build_root() -> Path:
    from fusedqk.caches import cache_root

    root = cache_root()
    if root is None:
        raise UserError("FUSEDQK_CACHE_DIR=off: llama.cpp's build is kept in the cache folder; "
                        "give an absolute folder or leave it unset")
    return root / "llama.cpp"


def build_dir(backend: str, cuda_arch: str = "90") -> Path:
    suffix = f"-sm{cuda_arch}" if backend == "cuda" else ""
    return build_root() / f"{COMMIT[:12]}-{backend}{suffix}"


def find(backend: str, cuda_arch: str = "90") -> Build | None:
    """The cached build for ``backend`` made with today's flags, or None."""
    folder = build_dir(backend, cuda_arch)
    try:
        info = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if (info.get("commit") != COMMIT or info.get("cmake_flags") != cmake_flags(backend, cuda_arch)
            or not all((folder / b).is_file() for b in BINARIES)):
        return None
    return Build(folder, info)


def fetch_sdist(into: Path) -> Path:
    """The pinned source distribution, downloaded from PyPI (set-up time only) and checked by
    its sha256. Not through ``pip download``: pip prepares an sdist's metadata, which builds its
    build requirements (CMake among them) from source when binaries are refused."""
    import urllib.request

    name = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    try:
        # PyPI's simple index (PEP 691, JSON), the one pip itself reads.
        index = urllib.request.Request(SDIST_INDEX,
                                       headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(index, timeout=60) as answer:
            files = json.load(answer)["files"]
        url = next(f["url"] for f in files if f.get("filename") == name)
        target = into / name
        with urllib.request.urlopen(url, timeout=600) as answer, target.open("wb") as out:
            shutil.copyfileobj(answer, out)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise UserError(f"could not download {SDIST_NAME} {SDIST_VERSION} from PyPI "
                        f"({first_line(e) or type(e).__name__}); give the file with --source "
                        f"(or {ENV_SOURCE})") from None
    return target


def unpack(source: Path, into: Path) -> None:
    """The parts of llama.cpp the tools need, from the source distribution or from a pack made
    by ``pack_source`` (both hold the tree under ``VENDOR``)."""
    try:
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name)]
            if not members:
                raise UserError(f"--source {str(source)!r} holds no llama.cpp tree under "
                                f"{VENDOR}; give {SDIST_NAME} {SDIST_VERSION}'s source "
                                "distribution (.tar.gz) or a pack made by --pack-source")
            for m in members:
                m.name = m.name[len(VENDOR):]
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"--source {str(source)!r} is not a readable source archive "
                        f"({first_line(e)})") from None
    (into / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKE)


def _wanted(name: str) -> bool:
    if not name.startswith(VENDOR):
        return False
    rest = name[len(VENDOR):]
    return any(rest == p or (p.endswith("/") and rest.startswith(p)) for p in PARTS)


def pack_source(source: Path, out: Path) -> Path:
    """The parts the build needs, as one small xz tarball (about 4 MB) that keeps the layout of
    the source distribution: for a machine that cannot reach PyPI."""
    try:
        with tarfile.open(source) as tar, tarfile.open(out, "w:xz") as packed:
            for m in tar.getmembers():
                if _wanted(m.name):
                    packed.addfile(m, tar.extractfile(m) if m.isfile() else None)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"--source {str(source)!r}: cannot pack it ({first_line(e)})") from None
    return out


def check_source(source: Path) -> None:
    """Refuse a source distribution whose bytes are not the pinned one's (a pack made by
    ``pack_source`` is a subset of it, trusted as the caller's own file)."""
    if source.name.endswith(".tar.gz"):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise UserError(f"--source {str(source)!r} is not {SDIST_NAME} {SDIST_VERSION}'s "
                            f"source distribution (sha256 {digest[:16]}…, expected "
                            f"{SDIST_SHA256[:16]}…)")


def build(backend: str, source: Path | None = None, cuda_arch: str = "90",
          jobs: int | None = None, log=print) -> Build:
    """Build (or find) llama-bench and llama-server for ``backend``; one build at a time per
    folder, written beside its final place and renamed, so a killed build leaves nothing used."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not accepted; use one of {', '.join(BACKENDS)}")
    if not cuda_arch.isdigit():
        raise UserError(f"--cuda-arch {cuda_arch!r} is not accepted; give a compute capability "
                        "as digits, e.g. 90 for Hopper")
    final = build_dir(backend, cuda_arch)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process's build of the same folder: wait
        found = find(backend, cuda_arch)
        if found is not None:
            return found
        for tool in ("cmake", "ninja") + (("nvcc",) if backend == "cuda" else ()):
            if shutil.which(tool) is None:
                raise UserError(f"{tool} is not on PATH; building llama.cpp for {backend} needs "
                                f"cmake and ninja{' and CUDA’s nvcc' if backend == 'cuda' else ''}")
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
            work = Path(tmp)
            if source is None:
                source = fetch_sdist(work)
            elif not source.is_file():
                raise UserError(f"--source {str(source)!r} is not a file")
            check_source(source)
            src, out = work / "src", work / "out"
            src.mkdir()
            out.mkdir()
            unpack(source, src)
            flags = cmake_flags(backend, cuda_arch)
            started = time.monotonic()
            logfile = out / "build.log"
            steps = [["cmake", "-S", str(src), "-B", str(work / "build"), "-G", "Ninja", *flags],
                     ["cmake", "--build", str(work / "build"), "-j", str(jobs or os.cpu_count()),
                      "--target", *BINARIES]]
            with logfile.open("w") as sink:
                for step in steps:
                    log(f"llama.cpp: {' '.join(step[:3])} …")
                    sink.write("$ " + " ".join(step) + "\n")
                    sink.flush()
                    if subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT).returncode:
                        kept = final.parent / f"{final.name}.failed.log"
                        shutil.copy(logfile, kept)
                        raise UserError(f"building llama.cpp for {backend} failed at "
                                        f"`{' '.join(step[:2])}`; its output is in {kept}")
            for name in BINARIES:
                shutil.copy2(work / "build" / "bin" / name, out / name)
            info = {"commit": COMMIT, "source": f"{SDIST_NAME} {SDIST_VERSION}",
                    "backend": backend, "cuda_arch": cuda_arch if backend == "cuda" else None,
                    "cmake_flags": flags, "build_seconds": round(time.monotonic() - started, 1),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            out.rename(final)
    return Build(final, info)



def _backend() -> str:
    from fusedqk.backend import current_backend

    backend = current_backend()
    if backend not in BACKENDS:
        raise UserError(f"llama.cpp is built here for {' or '.join(BACKENDS)}, not {backend}; set "
                        f"{ENV_BIN} to the folder of a llama.cpp build of your own")
    return backend


def bin_dir() -> Path:
    """The folder whose llama-bench and llama-server the engine files run: ``$FUSEDQK_LLAMA_CPP``
    (a build of the user's own), else fusedqk's build for this machine's backend, built now
    (once per machine; from ``$FUSEDQK_LLAMA_CPP_SOURCE`` where set, else downloaded) when
    there is none."""
    given = os.environ.get(ENV_BIN)
    if given is not None:
        folder = Path(given)
        missing = [b for b in BINARIES if not (folder / b).is_file()]
        if not given.strip() or missing:
            raise UserError(f"{ENV_BIN}={given!r} is not accepted; give the folder holding "
                            f"{' and '.join(BINARIES)} (missing there: {', '.join(missing) or '-'})")
        return folder
    backend = _backend()
    found = find(backend)
    if found is not None:
        return found.folder
    source = os.environ.get(ENV_SOURCE)
    return build(backend, Path(source) if source else None,
                 log=lambda line: print(line, file=sys.stderr, flush=True)).folder


def build_info() -> dict | None:
    """What the engine files' llama.cpp is: fusedqk's build.json, or the folder a user gave."""
    given = os.environ.get(ENV_BIN)
    if given is not None:
        try:  # a folder of fusedqk's own making still says how it was built
            return {"folder": given, **json.loads((Path(given) / "build.json").read_text())}
        except (OSError, ValueError):
            return {"folder": given, "built_by": "the user (no build.json)"}
    try:
        found = find(_backend())
    except UserError:
        return None
    return {"folder": str(found.folder), **found.info} if found else None
