"""A markdown table of `fusedqk generate --json` files: where each process's time to its first
token went. Each row is named by its file's name with PREFIX removed; a file that is not JSON (a
process that failed or was cut off) is a row saying so.

    python tools/generate_table.py PREFIX FILE...      (by tools/device.sh after, warmup, firstuse)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("start to first token s", "weights s", "warm-up s", "prefill s", "decode tok/s",
           "process s")


def row(path: Path, prefix: str) -> str:
    name = path.stem.removeprefix(prefix)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"| {name} | failed |" + " |" * (len(COLUMNS) - 1)
    s = d["seconds"]
    values = (d["start_to_first_token_s"], s["weights_s"], s.get("warmup_s", 0.0), d["prefill_s"],
              d["decode_tok_s"], s["process_s"])
    return f"| {name} | " + " | ".join(f"{v:.2f}" if v is not None else "—" for v in values) + " |"


def main(argv: list[str]) -> None:
    prefix, files = argv[0], argv[1:]
    print("| run | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for f in files:
        print(row(Path(f), prefix))


if __name__ == "__main__":
    main(sys.argv[1:])
