"""A virtual environment of this interpreter that sees every package the machine has but
PyTorch's (torch, functorch, triton), for the GPU machine, whose transformers sits beside
PyTorch: importing mlx-lm there imports PyTorch (13-15 s a process on 2026-12-03; USE_TORCH=0
did not keep it out), and fusedqk's own environments (containers/, pyproject.toml) install no
PyTorch. Prints the new interpreter's path, or nothing where there is no PyTorch to hide.

    python3 tools/no_torch.py /tmp/no-torch
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HIDDEN = ("torch", "functorch", "triton")


def main() -> int:
    target = Path(sys.argv[1])
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        print("NO_TORCH: no PyTorch here, nothing to hide", file=sys.stderr)
        return 0
    site = Path(next(iter(spec.submodule_search_locations))).parent
    visible = target.with_name(target.name + "-site")
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(visible, ignore_errors=True)
    visible.mkdir(parents=True)
    for entry in site.iterdir():
        if not entry.name.startswith(HIDDEN):
            (visible / entry.name).symlink_to(entry)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(target)], check=True)
    purelib = sysconfig.get_paths("posix_prefix", vars={"base": str(target),
                                                        "platbase": str(target)})["purelib"]
    Path(purelib, "machine-packages.pth").write_text(f"import site; site.addsitedir({str(visible)!r})\n")
    print(target / "bin" / "python3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
