"""Versions of the result files: every writer stamps its document, every reader checks it.

A file's ``format`` is ``fusedqk-<kind>/<version>``. Files written before versions existed have
no ``format`` key and read as version 1. The history of each format is docs/formats.md.
"""

from __future__ import annotations

from fusedqk.errors import UserError

# The version each writer stamps now; readers accept every version from 1 to this one.
CURRENT = {"bench": 2, "identity": 2, "blockbench": 2, "decisions": 2}


def stamp(kind: str, doc: dict) -> dict:
    """``doc`` with its format first."""
    return {"format": f"fusedqk-{kind}/{CURRENT[kind]}", **doc}


def version(kind: str, doc: object, source: str) -> int:
    """The format version of ``doc`` (a ``kind`` file read from ``source``), or one line that
    says what cannot be read."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: not a fusedqk {kind} file (expected a JSON object)")
    tag = doc.get("format")
    if tag is None:
        return 1
    prefix = f"fusedqk-{kind}/"
    number = tag[len(prefix):] if isinstance(tag, str) and tag.startswith(prefix) else ""
    if not number.isdigit():
        raise UserError(f"{source}: format {tag!r} is not a fusedqk {kind} format "
                        f"(expected {prefix}1 to {prefix}{CURRENT[kind]})")
    if int(number) > CURRENT[kind]:
        raise UserError(f"{source}: format {tag} is newer than this fusedqk reads "
                        f"(up to {prefix}{CURRENT[kind]}); upgrade fusedqk")
    return int(number)
