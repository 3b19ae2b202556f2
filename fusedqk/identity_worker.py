"""identity's fresh-process control, as a declared worker: a JSON spec in, traces out.

    python -m fusedqk.identity_worker < spec.json > traces.json

The spec (``identity.worker_spec``: format ``fusedqk-identity-worker/1``, the ``ModelRef`` and
``IdentitySettings`` fields, the paths) names the model and settings as the parent holds them,
so nothing is re-spelled as command-line flags. It prints the control traces of every path as a
JSON list on stdout; bad input is one line on stderr and exit status 2. It takes no device lock:
its parent, the identity check, holds it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from fusedqk import identity
from fusedqk.errors import UserError


def main() -> int:
    try:
        ref, settings, paths = identity.read_worker_spec(sys.stdin.read())
        prep = identity.prepare(ref, settings)
        traces = [asdict(identity.control_trace(prep, path, settings)) for path in paths]
    except UserError as e:
        print(f"fusedqk identity worker: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(traces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
