"""A stand-in for lablup/mlxcel's two binaries, strict where mlxcel is: the flags and output lines
of its source at commit 56c3d08 (src/bin/bench_decode.rs, src/main.rs and
src/commands/generate.rs, GenerationStats::print), so that config/engines/mlxcel.yaml fails a
test here the moment it asks for something mlxcel would refuse or reads a line mlxcel never prints.

    python mlxcel.py mlxcel-bench-decode ARGS...   (the bench binary)
    python mlxcel.py mlxcel ARGS...                (`mlxcel generate ...`, `mlxcel --version`)
    python mlxcel.py mlxcel-server ARGS...         (the HTTP server: -m, --host, --port)

The server (src/bin/mlx_server.rs, src/server/app.rs, routes/health.rs, routes/completions.rs)
answers GET /health with 503 and the "Loading model" envelope while it "loads", then 200
{"status": "ok"}; POST /v1/completions streams one `text_completion` event per token, a finish
event, a usage event when `stream_options.include_usage` is set and `data: [DONE]`, or answers
once with the legacy logprobs object (`logprobs.tokens`, the token texts) when `logprobs` is a
number. It decodes at 120 tok/s, or 150 with the fused path on (sleeping per token).
FAKE_MLXCEL_SERVER_FAIL=1 makes it exit at start-up with an error line.

Like clap, an unknown flag or a missing required one is `error: ...` on stderr and exit status 2,
before anything is loaded. Decoding is a deterministic function of the prompt (no MLX): each
generated word follows from the previous one, and MLXCEL_FUSED_QK_NORM (1/true/on/yes, any case)
changes only the reported speed, unless FAKE_MLXCEL_DIFFER makes the fused arm's text differ.
FAKE_MLXCEL_EOS_AFTER=N ends the fused arm's measured pass after N tokens (an early EOS).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "mlxcel 0.4.3"


class ClapError(Exception):
    pass


@dataclass
class Flag:
    long: str
    short: str | None = None
    takes_value: bool = True
    required: bool = False
    default: str | None = None
    many: bool = False  # num_args = 1..


@dataclass
class Parser:
    name: str
    flags: list[Flag] = field(default_factory=list)

    def parse(self, argv: list[str]) -> dict:
        by_name = {f"--{f.long}": f for f in self.flags}
        by_name.update({f"-{f.short}": f for f in self.flags if f.short})
        values: dict = {f.long: ([] if f.many else f.default) for f in self.flags}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(f"Usage: {self.name} [OPTIONS]")
                sys.exit(0)
            name, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            flag = by_name.get(name)
            if flag is None:
                raise ClapError(f"unexpected argument '{arg}' found")
            if not flag.takes_value:
                values[flag.long] = True
                i += 1
                continue
            if inline:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ClapError(f"a value is required for '--{flag.long} <{flag.long.upper()}>' "
                                "but none was supplied")
            if flag.many:
                values[flag.long].append(value)
            else:
                values[flag.long] = value
        missing = [f for f in self.flags if f.required and values[f.long] in (None, [])]
        if missing:
            raise ClapError("the following required arguments were not provided:\n"
                            + "\n".join(f"  --{f.long} <{f.long.upper()}>" for f in missing))
        return values


# The KV-cache flag group both binaries flatten in (TurboKvCacheArgs).
TURBO = [Flag("cache-type-k"), Flag("cache-type-v"), Flag("kv-cache-mode"), Flag("turbo-boundary-v")]

BENCH = Parser("mlxcel-bench-decode", [
    Flag("model", "m", required=True), Flag("prompt", "p", required=True),
    Flag("max-tokens", "n", default="100"), Flag("warmup-tokens", default="20"),
    Flag("prompt-tokens"), Flag("image", many=True),
    Flag("no-chat-template", takes_value=False, default=False), *TURBO])

GENERATE = Parser("mlxcel generate", [
    Flag("model", "m", required=True), Flag("adapter"), Flag("draft-model"),
    Flag("num-draft-tokens", default="3"), Flag("prompt", "p"), Flag("image", many=True),
    Flag("max-tokens", "n", default="100"), Flag("profile", takes_value=False, default=False),
    Flag("no-chat-template", takes_value=False, default=False),
    Flag("temp", "t", default="0.0"), Flag("top-p", default="1.0"), Flag("top-k", default="0"),
    Flag("min-p", default="0.0"), Flag("repetition-penalty", default="1.0"), Flag("seed"), *TURBO])


SERVER = Parser("mlxcel-server", [
    Flag("model", "m"), Flag("host", default="127.0.0.1"), Flag("port", default="8080"),
    Flag("alias"), Flag("parallel"), Flag("max-batch-size"), Flag("offline", takes_value=False),
    Flag("metrics", takes_value=False), Flag("no-warmup", takes_value=False), *TURBO])


def fused_on() -> bool:
    return os.environ.get("MLXCEL_FUSED_QK_NORM", "").lower() in ("1", "true", "on", "yes")


def count(text: str, flag: str) -> int:
    if not text.isdigit():
        raise ClapError(f"invalid value '{text}' for '--{flag} <N>': invalid digit found in string")
    return int(text)


def decode(prompt: str, n: int) -> list[str]:
    """Greedy 'decoding': word k+1 is a function of word k (a word-level vocabulary)."""
    words = prompt.split()
    last = int(words[-1][1:]) if words and words[-1][1:].isdigit() else 2
    out = []
    for _ in range(n):
        last = (last * 31 + 7) % 997 + 2
        out.append(f"t{last}")
    if fused_on() and os.environ.get("FAKE_MLXCEL_DIFFER") and len(out) > 3:
        out[3] = "t1"
    return out


def check_model(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"Error: failed to load model\n\nCaused by:\n    {path}/config.json not found",
              file=sys.stderr)
        sys.exit(1)


def bench(argv: list[str]) -> None:
    args = BENCH.parse(argv)
    check_model(args["model"])
    n = count(args["max-tokens"], "max-tokens")
    count(args["warmup-tokens"], "warmup-tokens")
    print(f"[Load] wall: {0.412:.3f} s  MLX peak: {0.31:.2f} GB")
    prompt_tokens = len(args["prompt"].split())
    eos_after = os.environ.get("FAKE_MLXCEL_EOS_AFTER")
    generated = min(n, int(eos_after)) if eos_after and fused_on() else n
    rate = (150.0 if fused_on() else 120.0) * random.uniform(0.995, 1.005)
    decode_ms = generated / rate * 1000.0
    prefill_ms = 12.5
    print("[Profile Results]")
    print(f"  Prompt tokens:    {prompt_tokens}")
    print(f"  Generated tokens: {generated}")
    print(f"  Prefill:          {prefill_ms:.2f} ms ({prompt_tokens / prefill_ms * 1000.0:.2f} tok/s)")
    # No token decoded (end of sequence first): mlxcel's rate is 0.00 tok/s.
    print(f"  Decode:           {decode_ms:.2f} ms ({rate if generated else 0.0:.2f} tok/s)")
    print(f"  MLX peak memory:  {0.35:.2f} GB")


def generate(argv: list[str]) -> None:
    args = GENERATE.parse(argv)
    if args["prompt"] is None:
        print("error: interactive chat needs a terminal", file=sys.stderr)
        sys.exit(1)
    n = count(args["max-tokens"], "max-tokens")
    model = args["model"]
    print("Runtime device: gpu")
    print("GPU memory: 139.8 GB (no wired limit)")
    print(f'Loading model from "{model}"...')
    check_model(model)
    print("Detected 1 GPU(s).")
    print("Model loaded in 0.412s (resident: 0.31 GB, peak: 0.31 GB).")
    print("Generating...")
    prompt = args["prompt"]
    sys.stdout.write(prompt)
    sys.stdout.flush()
    words = decode(prompt, n)
    sys.stdout.write(" " + " ".join(words))
    print()
    print()
    seconds = n / (150.0 if fused_on() else 120.0)
    print(f"[Generated {len(words)} tokens in {seconds:.2f}s = {len(words) / seconds:.2f} tok/s]")


class Handler(BaseHTTPRequestHandler):
    loaded_at = 0.0

    def log_message(self, fmt, *args):  # the server's access log, on stderr like mlxcel's tracing
        print(f"INFO request {fmt % args}", file=sys.stderr, flush=True)

    def _json(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path not in ("/health", "/v1/health"):
            return self._json(404, {"error": {"code": 404, "message": "Not Found"}})
        if time.monotonic() < self.loaded_at:
            return self._json(503, {"error": {"code": 503, "message": "Loading model",
                                              "type": "unavailable_error"}})
        self._json(200, {"status": "ok"})

    def do_POST(self):
        if self.path != "/v1/completions":
            return self._json(404, {"error": {"code": 404, "message": "Not Found"}})
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(body)
        # src/server/types/request.rs (01eea6d): `model: String` is required; axum's Json
        # extractor refuses a body without it with 422 and serde's message, as text.
        if "model" not in request:
            return self._text(422, "Failed to deserialize the JSON body into the target type: "
                                   f"missing field `model` at line 1 column {len(body)}")
        words = decode(request["prompt"], int(request.get("max_tokens", 16)))
        rate = (150.0 if fused_on() else 120.0) * random.uniform(0.995, 1.005)
        if not request.get("stream"):
            time.sleep(len(words) / rate)
            choice = {"index": 0, "text": " " + " ".join(words), "finish_reason": "length",
                      "logprobs": None}
            if request.get("logprobs") is not None:
                choice["logprobs"] = {"tokens": [" " + w for w in words],
                                      "token_logprobs": [-0.5] * len(words),
                                      "text_offset": list(range(len(words))),
                                      "top_logprobs": [None] * len(words)}
            return self._json(200, {"id": "cmpl-1", "object": "text_completion", "model": "m",
                                    "choices": [choice], "usage": {
                                        "prompt_tokens": len(request["prompt"].split()),
                                        "completion_tokens": len(words)}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(doc: dict) -> None:
            self.wfile.write(f"data: {json.dumps(doc)}\n\n".encode())
            self.wfile.flush()
        for w in words:
            time.sleep(1.0 / rate)
            event({"id": "cmpl-1", "object": "text_completion", "model": "m",
                   "choices": [{"index": 0, "text": " " + w, "finish_reason": None}]})
        event({"id": "cmpl-1", "object": "text_completion", "model": "m",
               "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            event({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [],
                   "usage": {"prompt_tokens": len(request["prompt"].split()),
                             "completion_tokens": len(words)}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def server(argv: list[str]) -> None:
    args = SERVER.parse(argv)
    if args["model"] is None:
        print("Error: -m/--model is required to start the server", file=sys.stderr)
        sys.exit(1)
    check_model(args["model"])
    if os.environ.get("FAKE_MLXCEL_SERVER_FAIL"):
        print("Error: failed to initialise the CUDA backend", file=sys.stderr)
        sys.exit(1)
    print(f"INFO mlxcel-server loading {args['model']} (fused QK-norm: {fused_on()})",
          file=sys.stderr, flush=True)
    Handler.loaded_at = time.monotonic() + 0.5
    httpd = ThreadingHTTPServer((args["host"], count(args["port"], "port")), Handler)
    print(f"INFO listening on http://{args['host']}:{args['port']}", file=sys.stderr, flush=True)
    httpd.serve_forever()


def main() -> None:
    binary, argv = sys.argv[1], sys.argv[2:]
    if binary == "mlxcel" and argv[:1] in (["--version"], ["-V"]):
        print(VERSION)
        return
    if binary == "mlxcel" and argv[:1] in (["generate"], ["gen"]):
        run, rest = generate, argv[1:]
    elif binary == "mlxcel-bench-decode":
        run, rest = bench, argv
    elif binary == "mlxcel-server" and argv[:1] in (["--version"], ["-V"]):
        print(VERSION.replace("mlxcel", "mlxcel-server"))
        return
    elif binary == "mlxcel-server":
        run, rest = server, argv
    else:
        print(f"error: unrecognized subcommand '{(argv or [''])[0]}'", file=sys.stderr)
        sys.exit(2)
    try:
        run(rest)
    except ClapError as e:
        print(f"error: {e}\n\nUsage: {binary} [OPTIONS]\n\nFor more information, try '--help'.",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
