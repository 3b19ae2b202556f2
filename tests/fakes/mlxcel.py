"""A stand-in for lablup/mlxcel's three binaries, made from the facts table
config/engines/facts/mlxcel.yaml (what mlxcel's source says, each entry citing file@commit): it
takes exactly the flags the table lists for the version it stands in for, refuses the rest in
clap's words and exit status, prints the lines the table gives and nothing else, and serves the
routes, health answers, request schema and refusals the table gives. The tests run the engine
files through it, so a file that asks for what mlxcel would refuse, or reads a line mlxcel never
prints, fails there.

    python mlxcel.py mlxcel-bench-decode ARGS...   (FAKE_MLXCEL_BENCH: 56c3d08 or 10bee85)
    python mlxcel.py mlxcel ARGS...                (`mlxcel generate ...`, `mlxcel --version`)
    python mlxcel.py mlxcel-server ARGS...         (-m, --host, --port)

What only a stand-in does, each said where it happens: decoding is a deterministic function of
the prompt (no model: each generated word follows from the previous one); MLXCEL_FUSED_QK_NORM
(1/true/on/yes, any case) changes only the reported speed (150 against 120 tok/s), unless
FAKE_MLXCEL_DIFFER makes the fused arm's fourth word differ; FAKE_MLXCEL_EOS_AFTER=N ends the
fused arm's measured pass after N tokens (an end of sequence), which --ignore-eos overrides as
mlxcel's does; `--version` prints the binary's name and the stand-in version 0.0.0 (clap's
format, not a real version); a checkpoint without config.json fails to load with anyhow's
error chain around a cause the stand-in words itself.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

FACTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "engines" / "facts"
                        / "mlxcel.yaml").read_text())
CLAP = FACTS["clap"]
STAND_IN_VERSION = "0.0.0"


class ClapError(Exception):
    pass


def _flat(items: list) -> list[dict]:
    """The table's flag lists, with the shared TurboKvCacheArgs group (a YAML alias) spliced in."""
    out = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


@dataclass
class Parser:
    """clap's behaviour for one binary: each listed flag by its long and short name, `--x=v`,
    a switch taking no value, a value type checked, required flags last."""

    name: str
    flags: list[dict]

    def usage(self) -> str:
        required = " ".join(f"--{f['long']} <{f['long'].upper().replace('-', '_')}>"
                            for f in self.flags if f.get("required"))
        return f"{self.name} [OPTIONS] {required}".strip()

    def help(self) -> str:
        lines = [f"Usage: {self.usage()}", "", "Options:"]
        for f in self.flags:
            short = f"-{f['short']}, " if f.get("short") else "    "
            value = "" if f["takes"] == "switch" else f" <{f['long'].upper().replace('-', '_')}>"
            lines.append(f"  {short}--{f['long']}{value}")
        return "\n".join([*lines, "  -h, --help", ""])

    def parse(self, argv: list[str]) -> dict:
        by_name = {f"--{f['long']}": f for f in self.flags}
        by_name.update({f"-{f['short']}": f for f in self.flags if f.get("short")})
        values: dict = {f["long"]: ([] if f.get("many") else f.get("default")) for f in self.flags}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(self.help())
                sys.exit(0)
            name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            flag = by_name.get(name)
            if flag is None:
                raise ClapError(CLAP["unknown"].format(arg=arg))
            shown = f"--{flag['long']} <{flag['long'].upper().replace('-', '_')}>"
            if flag["takes"] == "switch":
                values[flag["long"]] = True
                i += 1
                continue
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ClapError(CLAP["no_value"].format(flag=shown))
            _check_type(value, flag["takes"], shown)
            if flag.get("many"):
                values[flag["long"]].append(value)
            else:
                values[flag["long"]] = value
        missing = [f for f in self.flags if f.get("required") and values[f["long"]] in (None, [])]
        if missing:
            raise ClapError(CLAP["missing"].format(args="\n  ".join(
                f"--{f['long']} <{f['long'].upper().replace('-', '_')}>" for f in missing)))
        return values


def _check_type(value: str, takes: str, shown: str) -> None:
    if takes in ("usize", "u16", "u64") and not value.isdigit():
        raise ClapError(CLAP["invalid"].format(value=value, flag=shown,
                                               why="invalid digit found in string"))
    if takes == "i32" and not value.lstrip("-").isdigit():
        raise ClapError(CLAP["invalid"].format(value=value, flag=shown,
                                               why="invalid digit found in string"))
    if takes == "f32":
        try:
            float(value)
        except ValueError:
            raise ClapError(CLAP["invalid"].format(value=value, flag=shown,
                                                   why="invalid float literal")) from None


def fused_on() -> bool:
    return os.environ.get("MLXCEL_FUSED_QK_NORM", "").lower() in ("1", "true", "on", "yes")


def decode(prompt: str, n: int) -> list[str]:
    """Stand-in decoding: word k+1 is a function of word k (a word-level vocabulary)."""
    words = prompt.split()
    last = int(words[-1][1:]) if words and words[-1][1:].isdigit() else 2
    out = []
    for _ in range(n):
        last = (last * 31 + 7) % 997 + 2
        out.append(f"t{last}")
    if fused_on() and os.environ.get("FAKE_MLXCEL_DIFFER") and len(out) > 3:
        out[3] = "t1"
    return out


def load_or_fail(path: str, failure: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(failure.format(cause=f"stand-in: no config.json in {path}"), file=sys.stderr)
        sys.exit(1)


def bench(argv: list[str]) -> None:
    version = os.environ.get("FAKE_MLXCEL_BENCH", "56c3d08")
    facts = FACTS["bench_decode"][version]
    args = Parser("mlxcel-bench-decode", _flat(facts["flags"])).parse(argv)
    load_or_fail(args["model"], facts["load_failure"])
    n = int(args["max-tokens"])
    prompt_tokens = len(args["prompt"].split())
    eos_after = os.environ.get("FAKE_MLXCEL_EOS_AFTER")
    ends_early = eos_after is not None and fused_on() and not args.get("ignore-eos")
    generated = min(n, int(eos_after)) if ends_early else n
    rate = (150.0 if fused_on() else 120.0) * random.uniform(0.995, 1.005)
    decode_ms = generated / rate * 1000.0
    prefill_ms = 12.5
    stats = [line.format(prompt_tokens=prompt_tokens, generated_tokens=generated,
                         prefill_ms=prefill_ms, prefill_tok_s=prompt_tokens / prefill_ms * 1e3,
                         decode_ms=decode_ms, decode_tok_s=rate if generated else 0.0)
             for line in FACTS["generation_stats"]]
    memory = {"a": 0.31, "c": 0.02, "t": 0.33, "p": 0.35}
    for line in facts["stdout"]:
        if line == "{stats}":
            print("\n".join(stats))
        else:
            print(line.format(cache_limit="none applied (allocator default)", load_s=0.412,
                              load_gb=0.31, peak_gb=0.35, **memory))


def generate(argv: list[str]) -> None:
    facts = FACTS["generate"][os.environ.get("FAKE_MLXCEL_GENERATE", "b0b78e7")]
    args = Parser("mlxcel generate", _flat(facts["flags"])).parse(argv)
    if args["prompt"] is None:  # the chat REPL: on an empty standard input it has nothing to do
        sys.stdin.read()
        return
    n = int(args["max-tokens"])
    model = args["model"]
    prompt = args["prompt"]
    words = decode(prompt, n)
    seconds = n / (150.0 if fused_on() else 120.0)
    values = {"device": "gpu", "gpu_gb": 79.6, "model_debug": json.dumps(model), "gpus": 1,
              "load_s": 0.412, "resident_gb": 0.31, "peak_gb": 0.31, "prompt": prompt,
              "generated": " " + " ".join(words), "tokens": len(words), "seconds": seconds,
              "rate": len(words) / seconds}
    lines = facts["stdout"]
    loading = lines.index("Detected {gpus} GPU(s).")
    print("\n".join(line.format(**values) for line in lines[:loading]))
    load_or_fail(model, FACTS["bench_decode"]["56c3d08"]["load_failure"])
    print("\n".join(line.format(**values) for line in lines[loading:]))


SERVER = FACTS["server"][os.environ.get("FAKE_MLXCEL_SERVER", "01c2035")]


class Handler(BaseHTTPRequestHandler):
    loaded_at = 0.0

    def log_message(self, fmt, *args):  # the access log, on stderr
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _error(self, message: str) -> None:  # ErrorResponse::new(.., "invalid_request_error")
        self._json(400, {"error": {"message": message, "type": "invalid_request_error",
                                   "code": None}})

    def do_GET(self):
        if self.path not in SERVER["routes"]["health"]:
            return self._send(404, b"", "text/plain")  # axum's fallback: 404, no body
        if time.monotonic() < self.loaded_at:
            return self._json(SERVER["health_loading"]["status"], SERVER["health_loading"]["body"])
        self._json(SERVER["health_ready"]["status"], SERVER["health_ready"]["body"])

    def do_POST(self):
        if self.path not in SERVER["routes"]["completions"]:
            return self._send(404, b"", "text/plain")
        time.sleep(max(0.0, self.loaded_at - time.monotonic()))
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = json.loads(raw)
        missing = SERVER["missing_field"]
        for field in SERVER["request_required"]:
            if field not in request:
                return self._send(missing["status"], missing["text"].format(
                    field=field, column=len(raw)).encode(), "text/plain; charset=utf-8")
        if not isinstance(request["prompt"], str):
            return self._send(422, ("Failed to deserialize the JSON body into the target type: "
                                    "prompt: invalid type: expected a string at line 1 column "
                                    f"{len(raw)}").encode(), "text/plain; charset=utf-8")
        refusals = SERVER["refusals"]
        if request["prompt"] and not request["prompt"].strip():
            return self._error(refusals["whitespace_prompt"])
        logprobs = request.get("logprobs")
        if logprobs is not None and logprobs > 5:
            return self._error(refusals["logprobs_above_5"])
        asked = int(request.get("max_tokens", 16))
        words = decode(request["prompt"], asked)
        rate = (150.0 if fused_on() else 120.0) * random.uniform(0.995, 1.005)
        finish = "length" if len(words) == asked else "stop"
        prompt_tokens = len(request["prompt"].split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        envelope = {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()),
                    "model": str(Path(self.server.model).name), "system_fingerprint": None}
        texts = [" " + w for w in words]
        if not request.get("stream"):
            time.sleep(len(words) / rate)
            offsets = [sum(len(t.encode()) for t in texts[:i]) for i in range(len(texts))]
            lp = None if logprobs is None else {
                "tokens": texts, "token_logprobs": [-0.5] * len(texts), "text_offset": offsets,
                "top_logprobs": [None] * len(texts)}
            return self._json(200, {**envelope, "choices": [
                {"index": 0, "text": "".join(texts), "finish_reason": finish, "logprobs": lp}],
                "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(doc: dict) -> None:
            self.wfile.write(f"data: {json.dumps({**envelope, **doc})}\n\n".encode())
            self.wfile.flush()
        offset = 0
        for text in texts:
            time.sleep(1.0 / rate)
            lp = None if logprobs is None else {"tokens": [text], "token_logprobs": [-0.5],
                                                "text_offset": [offset], "top_logprobs": [None]}
            offset += len(text.encode())
            event({"choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": lp}]})
        event({"choices": [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def server(argv: list[str]) -> None:
    args = Parser("mlxcel-server", SERVER["flags"]).parse(argv)
    if args["model"] is None:
        print("stand-in: the facts table holds no behaviour for mlxcel-server without -m",
              file=sys.stderr)
        sys.exit(2)
    load_or_fail(args["model"], FACTS["bench_decode"]["56c3d08"]["load_failure"])
    Handler.loaded_at = time.monotonic() + 0.5
    httpd = ThreadingHTTPServer((args["host"], int(args["port"])), Handler)
    httpd.model = args["model"]
    httpd.serve_forever()


def main() -> None:
    binary, argv = sys.argv[1], sys.argv[2:]
    if argv[:1] in (["--version"], ["-V"]) and binary in ("mlxcel", "mlxcel-server"):
        print(f"{binary} {STAND_IN_VERSION}")
        return
    if binary == "mlxcel" and argv[:1] in (["generate"], ["gen"]):
        run, rest, usage = generate, argv[1:], "mlxcel generate [OPTIONS] --model <MODEL>"
    elif binary == "mlxcel-bench-decode":
        run, rest, usage = bench, argv, "mlxcel-bench-decode [OPTIONS] --model <MODEL> --prompt <PROMPT>"
    elif binary == "mlxcel-server":
        run, rest, usage = server, argv, "mlxcel-server [OPTIONS]"
    else:
        print(CLAP["unknown"].format(arg=(argv or [""])[0]), file=sys.stderr)
        sys.exit(CLAP["exit_status"])
    try:
        run(rest)
    except ClapError as e:
        print(f"{e}{CLAP['footer'].format(usage=usage)}", file=sys.stderr)
        sys.exit(CLAP["exit_status"])


if __name__ == "__main__":
    main()
