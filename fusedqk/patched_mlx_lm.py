"""mlx-lm's own command line with the fused path: ``python -m fusedqk.patched_mlx_lm CMD [mlx-lm flags]``.

    python -m fusedqk.patched_mlx_lm generate  --model DIR --prompt "..." --max-tokens 64
    python -m fusedqk.patched_mlx_lm benchmark --model DIR -p 64 -g 128 -n 5
    python -m fusedqk.patched_mlx_lm server    --model DIR --port 8080

Runs mlx-lm's unchanged entry point (``mlx_lm.generate``, ``mlx_lm.benchmark``,
``mlx_lm.server``) with ``fusedqk.patch`` applied to every model right after ``mlx_lm.load``
returns it; the toggle (``FUSEDQK_FUSED_QK_NORM``, ``FUSEDQK_FUSED_IMPL``, the per-backend
defaults) decides whether it patches. Output and timing are mlx-lm's; one line on stderr says
what was patched.
"""

from __future__ import annotations

import functools
import importlib
import sys

from fusedqk.errors import UserError

COMMANDS = {"generate": "mlx_lm.generate", "benchmark": "mlx_lm.benchmark", "server": "mlx_lm.server"}
LOADERS = ("load", "sharded_load")  # the names mlx-lm's entry points load models through


def _patching(load):
    @functools.wraps(load)
    def load_and_patch(*args, **kwargs):
        from fusedqk.patching import patch

        result = load(*args, **kwargs)
        print(patch(result[0]).summary(), file=sys.stderr, flush=True)
        return result
    return load_and_patch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] not in COMMANDS:
            given = repr(argv[0]) if argv else "nothing"
            raise UserError(f"command {given} is not accepted; use one of {', '.join(COMMANDS)} "
                            "followed by mlx-lm's own flags")
        entry = importlib.import_module(COMMANDS[argv[0]])
        for name in LOADERS:
            if hasattr(entry, name):
                setattr(entry, name, _patching(getattr(entry, name)))
        # A bad toggle value is one line here, before mlx-lm loads anything.
        from fusedqk.backend import current_backend
        from fusedqk.kernels.qkv_norm_rope import has_kernel
        from fusedqk.toggle import resolve

        resolve(current_backend(), has_kernel(current_backend()))
    except UserError as e:
        print(f"fusedqk.patched_mlx_lm: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [f"mlx_lm.{argv[0]}", *argv[1:]]
    entry.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
