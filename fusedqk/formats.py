"""The result files' one format: every one is written by ``dump`` (its version stamped first)
and read by ``load`` (its version and shape checked), whoever writes or reads it.

A file's ``format`` is ``fusedqk-<kind>/<version>``. Files written before versions existed have
no ``format`` key and read as version 1. The history of each format is docs/formats.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from fusedqk.errors import UserError, key_path

# The version each writer stamps now; readers accept every version from 1 to this one.
CURRENT = {"bench": 2, "identity": 2, "blockbench": 2, "decisions": 2}


def stamp(kind: str, doc: dict) -> dict:
    """``doc`` with its format first."""
    return {"format": f"fusedqk-{kind}/{CURRENT[kind]}", **doc}


def dumps(kind: str, doc: dict) -> str:
    """A ``kind`` document as the text of its file (for writers that write several files at
    once, ``atomic.write_files``)."""
    return json.dumps(stamp(kind, doc), indent=2, default=str) + "\n"


def dump(kind: str, doc: dict, path: Path) -> None:
    """Write a ``kind`` file whole or not at all (``atomic.write_text``)."""
    from fusedqk.atomic import write_text

    write_text(path, dumps(kind, doc))


def load(path: Path, kind: str | None = None) -> dict | None:
    """A result file, or None where it is absent; a file that is not JSON, or of a ``kind``
    format this version cannot read, is one line naming it."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); the file is damaged or "
                        "was cut short: rerun the job that writes it") from None
    if kind is not None:
        if kind in CURRENT:
            version(kind, doc, str(path))
        check_shape(kind, doc, str(path))
    return doc


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
    if not (number.isascii() and number.isdigit()):
        raise UserError(f"{source}: format {tag!r} is not a fusedqk {kind} format "
                        f"(expected {prefix}1 to {prefix}{CURRENT[kind]})")
    if int(number) > CURRENT[kind]:
        raise UserError(f"{source}: format {tag} is newer than this fusedqk reads "
                        f"(up to {prefix}{CURRENT[kind]}); upgrade fusedqk")
    return int(number)


_NUMBER = {"type": "number"}
# What every reader relies on in each kind of file, checked when it is read, so that a damaged or
# foreign file is one line naming it and the key, never a traceback from deep in a reader.
SHAPES = {
    "bench": {"type": "object", "required": ["summary", "speedups"],
              "properties": {
                  "settings": {"type": "object"},
                  "paths": {"type": "array", "items": {"type": "string"}},
                  "summary": {"type": "array", "items": {
                      "type": "object", "required": ["model", "path", "decode_tok_s_mean"],
                      "properties": {"model": {"type": "string"}, "path": {"type": "string"},
                                     "decode_tok_s_mean": _NUMBER}}},
                  "speedups": {"type": "array", "items": {
                      "type": "object", "required": ["path", "point", "lo", "hi"],
                      "properties": {"path": {"type": "string"}, "point": _NUMBER, "lo": _NUMBER,
                                     "hi": _NUMBER}}},
                  "warnings": {"type": "array", "items": {"type": "string"}},
                  "meta": {"type": "object"}}},
    "identity": {"type": "object", "required": ["verdict"],
                 "properties": {"model": {"type": "string"}, "impl": {"type": "string"},
                                "verdict": {"enum": ["EQUAL", "DIFFERS", "INCONCLUSIVE"]},
                                "graph_distinct_greedy_tokens": {"type": "array"},
                                "settings": {"type": "object"}, "controls": {"type": "object"},
                                "free_running": {"type": "object"}}},
    "blockbench": {"type": "object", "required": ["rows"],
                   "properties": {"rows": {"type": "array", "items": {
                       "type": "object", "required": ["model", "path", "layer_us"],
                       "properties": {"layer_us": _NUMBER}}}}},
    "decisions": {"type": "object", "required": ["backends"],
                  "properties": {
                      "rule": {"type": "object"},
                      "backends": {"type": "object", "additionalProperties": {
                          "type": "object", "required": ["recommendation", "impl"],
                          "properties": {"recommendation": {"type": "string"},
                                         "impl": {"type": "string"},
                                         "per_impl": {"type": "object"}}}}}},
    "status": {"type": "object", "required": ["ok"],
               "properties": {"ok": {"type": "boolean"}, "error": {"type": ["string", "null"]},
                              "seconds": {"type": "object",
                                          "additionalProperties": {"type": "number"}}}},
    "environment": {"type": "object"},
}


def check_shape(kind: str, doc: object, source: str) -> None:
    """``doc`` has what readers of a ``kind`` file rely on, or one line naming the first gap."""
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(SHAPES[kind]).iter_errors(doc))
    if error is not None:
        where = key_path(error.absolute_path) or "the top level"
        message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
        raise UserError(f"{source}: not a fusedqk {kind} file ({where}: {message}); the file is "
                        "damaged or foreign: rerun the job that writes it")
