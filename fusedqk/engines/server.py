"""Server engines: one long-lived HTTP server per arm, spoken to through OpenAI-style completions.

A server engine's file (``kind: server``, docs/engines.md) gives the command that starts the
server (with ``{host}`` and ``{port}``), its health route and its completions route. fusedqk
starts each arm's server in its own process group on 127.0.0.1 and a free port, waits until the
health route answers 200 (or the startup timeout passes, or the server exits), and then sends it
completions: streamed ones for the bench, timed chunk by chunk as they arrive, and greedy
non-streamed ones for identity. The servers end with the measurement, however it ends
(``engines.process.background``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import regex
import requests
import urllib3

from fusedqk.engines.process import (
    MAX_OUTPUT_BYTES,
    Background,
    EngineFailure,
    background,
    pin_group,
    printable,
)
from fusedqk.errors import UserError

HOST = "127.0.0.1"
_HEALTH_POLL_S = 0.25
_HEALTH_READ_S = 5.0  # one health answer, whole
# What fusedqk sets in every completion request; an engine file's extra fields may not.
RESERVED_FIELDS = ("prompt", "max_tokens", "temperature", "stream", "stream_options")


@dataclass(frozen=True)
class ServerCommand:
    """How to start one arm's server and how to talk to it (the ``server`` key)."""

    argv: list[str]
    health: str = "/health"
    completions: str = "/v1/completions"
    startup_timeout_s: float = 900
    request_timeout_s: float = 600
    request: dict = field(default_factory=dict)  # extra JSON fields of every completion request
    identity_request: dict = field(default_factory=dict)  # and of identity's greedy ones
    identity_tokens: str | None = None  # where the greedy tokens are in choices[0]; None: text
    timing_field: str | None = None  # the server's own decode tok/s in the last event, if any
    cpus_per_arm: int | None = None  # each arm's server on this many cores of its own, if set
    shared_cpus: int | None = None  # both arms' servers on the same this many cores, round by round
    prompt_ids: bool = False  # send the prompt as its token ids (the seeded words t<id>), not text
    # identity's greedy completions go here instead (the engine's own route), and
    # identity_tokens is then a path in its response, not in choices[0]
    identity_route: str | None = None

    def prompt(self, text: str) -> str | list[int]:
        """The request's prompt: the seeded text, or its token ids (``prompt_ids``)."""
        return [int(word[1:]) for word in text.split()] if self.prompt_ids else text


@dataclass(frozen=True)
class Streamed:
    """One streamed completion as the client saw it."""

    text: str
    chunk_times: list[float]  # time.perf_counter() of each event that carried text
    started: float
    completion_tokens: int | None  # the server's usage count, where it sends one
    server_tok_s: float | None  # the server's own decode rate (``timing_field``), where set

    @property
    def chunks(self) -> int:
        return len(self.chunk_times)

    @property
    def first_token_s(self) -> float:
        return self.chunk_times[0] - self.started

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive text events: one per decoded token after the first."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def stream_tok_s(self) -> float | None:
        """Decode tokens per second from the chunks' arrival times: (chunks - 1) over the time
        from the first to the last. mlx-lm's and mlxcel's servers send one event per token."""
        if self.chunks < 2 or self.chunk_times[-1] <= self.chunk_times[0]:
            return None
        return (self.chunks - 1) / (self.chunk_times[-1] - self.chunk_times[0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def field_path(doc: object, path: str) -> object:
    """``a.b.c`` into nested JSON; a list on the way maps the rest of the path over its items
    (``logprobs.content.id``: the id of every entry). Raises KeyError where a step is missing."""
    head, _, rest = path.partition(".")
    if isinstance(doc, list):
        return [field_path(item, path) for item in doc]
    if not isinstance(doc, dict) or head not in doc:
        raise KeyError(head)
    return field_path(doc[head], rest) if rest else doc[head]


class ArmServer:
    """One arm's running server: the process, its address and an HTTP session to it."""

    def __init__(self, process: Background, port: int, command: ServerCommand, label: str):
        self.process = process
        self.base = f"http://{HOST}:{port}"
        self.command = command
        self.label = label
        self.http = requests.Session()
        self.started_s = 0.0  # seconds from start to healthy
        self.confirmation: str | None = None  # the log line in which ``expect`` matched

    def wait_healthy(self) -> None:
        start = time.monotonic()
        url = self.base + self.command.health
        while True:
            self.process.check()
            if self._health_status(url) == 200:
                self.started_s = time.monotonic() - start
                return
            if time.monotonic() - start > self.command.startup_timeout_s:
                raise EngineFailure(f"{self.label}: {self.command.health} did not answer 200 within "
                                    f"{self.command.startup_timeout_s:g} s (server.startup_timeout_s)")
            time.sleep(_HEALTH_POLL_S)

    def _health_status(self, url: str) -> int | None:
        """The health route's status, its whole answer read within _HEALTH_READ_S (a route that
        trickles its body forever counts as not healthy), or None when nothing answers."""
        try:
            with self.http.get(url, timeout=_HEALTH_READ_S, stream=True) as response:
                for _ in _chunks(response, _HEALTH_READ_S):
                    pass
                return response.status_code
        except (TimeoutError, *_BROKEN):
            return None  # not listening yet, trickling, or gone (process.check says which)

    def expect(self, pattern: regex.Pattern | None, key: str) -> None:
        """The server's log must match ``pattern`` once it is healthy (the toggle took effect)."""
        if pattern is None:
            return
        try:
            seen = pattern.search(self.process.log(), timeout=10)
        except TimeoutError:
            raise EngineFailure(f"{self.label}: {key}: matching took longer than 10 s") from None
        if not seen:
            raise EngineFailure(f"{self.label}: its log lacks {pattern.pattern!r} ({key}): the toggle "
                                "did not take effect, so the arms may not differ")
        # Kept with the results: the server's own word on what its arm runs (fusedqk's names the
        # implementation and kernel call), which the arm's environment alone does not say.
        text = seen.string
        start = text.rfind("\n", 0, seen.start()) + 1
        end = text.find("\n", seen.end())
        self.confirmation = text[start:end if end >= 0 else len(text)].strip()

    def _post(self, body: dict, stream: bool, route: str | None = None) -> requests.Response:
        route = route or self.command.completions
        try:
            response = self.http.post(self.base + route, json=body, stream=stream,
                                      timeout=(10, self.command.request_timeout_s))
        except requests.RequestException as e:
            self.process.check()
            raise EngineFailure(f"{self.label}: POST {route} failed "
                                f"({type(e).__name__})") from None
        if response.status_code != 200:
            text = printable(response.text.strip().replace("\n", " ")[:160])
            raise EngineFailure(f"{self.label}: POST {route} answered "
                                f"{response.status_code}: {text}")
        return response

    def _answer(self, response: requests.Response, what: str) -> Iterator[bytes]:
        """The chunks of an answer as they arrive, the whole of it within request_timeout_s
        (keep-alive lines or a trickle of bytes must not hold a round forever; each read alone
        is bounded by the same timeout); a broken connection is one line."""
        try:
            yield from _chunks(response, self.command.request_timeout_s)
        except TimeoutError:
            raise EngineFailure(f"{self.label}: the {what} did not finish within "
                                f"{self.command.request_timeout_s:g} s "
                                "(server.request_timeout_s)") from None
        except _BROKEN as e:
            self.process.check()
            raise EngineFailure(f"{self.label}: the {what} broke off ({type(e).__name__}: silence "
                                "past server.request_timeout_s, or the connection closed)") from None

    def stream(self, prompt: str, max_tokens: int) -> Streamed:
        """A streamed greedy completion, timed as its events arrive. No seed is sent: greedy
        decoding needs none, and mlx-lm's server serves a request with a seed outside its
        batched generator, which is not the path its users get."""
        body = {**self.command.request, "prompt": self.command.prompt(prompt),
                "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        response = self._post(body, stream=True)
        text, times, usage, server_rate, last = [], [], None, None, None
        with response:
            for event in self._events(response):
                choices = event.get("choices")
                choices = choices if isinstance(choices, list) else []  # a number, an object
                piece = choices[0].get("text") if choices and isinstance(choices[0], dict) else None
                if isinstance(piece, str) and piece:
                    times.append(time.perf_counter())
                    text.append(piece)
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"].get("completion_tokens")
                last = event
        if self.command.timing_field and last is not None:
            try:
                value = field_path(last, self.command.timing_field)
                if isinstance(value, bool):
                    raise TypeError
                server_rate = float(value)
            except (KeyError, TypeError, ValueError, OverflowError):
                raise EngineFailure(f"{self.label}: the stream's last event has no "
                                    f"{self.command.timing_field} (server.timing_field)") from None
        if len(times) < 2:
            raise EngineFailure(f"{self.label}: the stream carried {len(times)} text event(s); "
                                "at least 2 are needed to time decoding")
        count = usage if isinstance(usage, int) and not isinstance(usage, bool) else None
        if count is not None and not 0 <= count <= max_tokens:
            raise EngineFailure(f"{self.label}: usage.completion_tokens {count} is not a count "
                                f"from 0 to the {max_tokens} asked for")
        return Streamed("".join(text), times, started, count, server_rate)

    def _events(self, response: requests.Response) -> Iterator[dict]:
        """The JSON events of a server-sent-event stream, each as soon as its line is complete."""
        buffer, seen = b"", 0
        for chunk in self._answer(response, "stream"):
            seen += len(chunk)
            if seen > self.process.max_output_bytes:
                raise EngineFailure(f"{self.label}: the stream exceeded max_output_bytes")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    raise EngineFailure(f"{self.label}: a stream event is not JSON: "
                                        f"{data[:80]!r}") from None
                if isinstance(event, dict):
                    yield event

    def greedy(self, prompt: str, max_tokens: int) -> list:
        """A greedy non-streamed completion: its tokens (``identity_tokens``) or its words."""
        body = {**self.command.request, **self.command.identity_request,
                "prompt": self.command.prompt(prompt), "max_tokens": max_tokens,
                "temperature": 0.0, "stream": False}
        route = self.command.identity_route
        with self._post(body, stream=True, route=route) as response:
            raw = b"".join(self._answer(response, "completion"))
        try:
            doc = json.loads(raw)
            # An identity route of the engine's own answers with its own document; the
            # OpenAI-style route with choices.
            choice = doc if route else doc["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise EngineFailure(f"{self.label}: the completion is not an OpenAI-style JSON object "
                                "with choices") from None
        where = "the response" if route else "choices[0]"
        if self.command.identity_tokens:
            try:
                tokens = field_path(choice, self.command.identity_tokens)
            except (KeyError, TypeError) as e:
                raise EngineFailure(f"{self.label}: {where} has no {self.command.identity_tokens}"
                                    f" (missing {e.args[0]!r}; server.identity_tokens)") from None
            if not isinstance(tokens, list) or not all(isinstance(t, (int, str)) for t in tokens):
                raise EngineFailure(f"{self.label}: {self.command.identity_tokens} is not a list of "
                                    "tokens (server.identity_tokens)")
            return tokens
        text = choice.get("text") if isinstance(choice, dict) else None
        if not isinstance(text, str):
            raise EngineFailure(f"{self.label}: choices[0] has no text")
        return text.split()


# CPU placement of the arms' servers (server.cpus_per_arm, server.shared_cpus).

def arm_cpus(per_arm: int | None, available: list[int], source: str,
             arms: tuple[str, ...] = ("graph", "fused")) -> dict[str, frozenset[int]]:
    """Disjoint cores for each arm's server (``server.cpus_per_arm``) and the rest for the
    client: {} when the engine file does not ask. Each server's threads then stay on its own
    cores, and neither arm's host work runs on the other's."""
    if per_arm is None:
        return {}
    if len(available) < 2 * per_arm + 1:
        raise UserError(f"engine {source}: server.cpus_per_arm {per_arm} needs {2 * per_arm + 1} "
                        f"cores (two servers and the client) but this process may use "
                        f"{len(available)}; accepted here: at most {(len(available) - 1) // 2}")
    return {arm: frozenset(available[i * per_arm:(i + 1) * per_arm]) for i, arm in enumerate(arms)} | {
        "client": frozenset(available[2 * per_arm:])}


def shared_cpus(per_round: int | None, available: list[int], source: str) -> list[frozenset[int]]:
    """The core sets both arms' servers share, one round after another (``server.shared_cpus``):
    consecutive groups of ``per_round`` cores of those fusedqk may use, cycling; [] when the
    engine file does not ask."""
    if per_round is None:
        return []
    if len(available) < per_round + 1:
        raise UserError(f"engine {source}: server.shared_cpus {per_round} needs {per_round + 1} "
                        f"cores (the servers' and the client's) but this process may use "
                        f"{len(available)}; accepted here: at most {len(available) - 1}")
    groups = -(-len(available) // per_round)
    return [frozenset(available[(g * per_round + k) % len(available)] for k in range(per_round))
            for g in range(groups)]


def share_cores(servers: dict, rotation: list[frozenset[int]], rnd: int) -> frozenset[int]:
    """Round ``rnd``'s cores for both arms' servers, every thread of both moved onto them, and
    the client onto the rest. Both arms then run on the same cores within a round: a core's
    moment (its clock, what else the host runs beside it) is shared by the pair of requests the
    round compares, and rotating spreads the rounds over all the cores."""
    cores = rotation[rnd % len(rotation)]
    for s in servers.values():
        pin_group(s.process.proc.pid, cores)
    os.sched_setaffinity(0, set().union(*rotation) - cores)
    return cores


# What a read of a broken or silent connection raises (requests, urllib3, the socket).
_BROKEN = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def _chunks(response: requests.Response, within_s: float) -> Iterator[bytes]:
    """A streamed response's bytes as they arrive (``read1`` returns what has come, so nothing
    waits for a buffer to fill); TimeoutError once ``within_s`` has passed with more to come."""
    end = time.monotonic() + within_s
    while chunk := response.raw.read1(65536):
        yield chunk
        if time.monotonic() > end:
            raise TimeoutError


@contextmanager
def running(command: ServerCommand, argv_for, env: dict[str, str], label: str,
            expect: regex.Pattern | None, expect_key: str, warm_up_prompt: str,
            max_output_bytes: int = MAX_OUTPUT_BYTES,
            cpus: frozenset[int] | None = None) -> Iterator[ArmServer]:
    """One arm's server, healthy, loaded and checked, for the length of the block.
    ``argv_for(host, port)`` is its command line. A server may answer its health route before
    its model is loaded (mlx-lm's does), so one short completion goes first; the ``expect``
    line is looked for after it."""
    port = free_port()
    with background(argv_for(HOST, port), env, label, max_output_bytes, cpus) as process:
        server = ArmServer(process, port, command, label)
        server.wait_healthy()
        server.greedy(warm_up_prompt, 2)
        server.expect(expect, expect_key)
        yield server
        server.process.check()  # a server that died during the block failed it
