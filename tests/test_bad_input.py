"""Bad input, across the commands: every case exits non-zero with one line naming the input and
what is accepted, never a traceback, never a hang, and leaves nothing new under results/.

The cases run in-process (``cli.main``) so that the battery stays fast; an uncaught exception
is a traceback and fails the case. A count that would run without limit is refused before any
work, so none of them can hang.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import committed_archives

from fusedqk import archive, cli

CPU_ARCHIVE = committed_archives("cpu-*/*")[-1]
TINY_CONTEXT = 4096  # qwen3-tiny's max_position_embeddings


def unsealed_copy(dest: Path) -> Path:
    """The CPU archive, copied and unsealed: a run directory to damage."""
    shutil.copytree(CPU_ARCHIVE, dest)
    (dest / archive.MANIFEST).unlink()
    return dest


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def first_model(run: Path) -> Path:
    return next(p for p in sorted(run.iterdir()) if (p / "bench").is_dir())


# --- fixtures the cases name with {placeholders} ------------------------------------------------

def _run(tmp: Path) -> Path:
    return unsealed_copy(tmp / "run")


def _run_bench_cut(tmp: Path) -> Path:
    run = _run(tmp)
    truncate(first_model(run) / "bench" / "bench.json")
    return run


def _run_no_tokens(tmp: Path) -> Path:
    run = _run(tmp)
    (first_model(run) / "bench" / "tokens.csv").unlink()
    return run


def _run_trials_cut(tmp: Path) -> Path:
    run = _run(tmp)
    path = first_model(run) / "bench" / "trials.csv"
    path.write_text(path.read_text().rstrip("\n")[:-5])
    return run


def _run_bad_ci(tmp: Path) -> Path:
    run = _run(tmp)
    path = first_model(run) / "bench" / "bench.json"
    doc = json.loads(path.read_text())
    doc["speedups"][0]["hi"] = doc["speedups"][0]["point"] - 0.1
    path.write_text(json.dumps(doc))
    return run


def _run_decisions_cut(tmp: Path) -> Path:
    run = _run(tmp)
    truncate(run / "decisions.json")
    return run


def _sealed_tampered(tmp: Path) -> Path:
    run = tmp / "sealed"
    shutil.copytree(CPU_ARCHIVE, run)
    (run / "summaries.csv").write_text("model\nforged\n")
    return run


def _sealed_dotfile(tmp: Path) -> Path:
    run = tmp / "sealed"
    shutil.copytree(CPU_ARCHIVE, run)
    (run / ".evil").write_text("x")
    return run


def _sealed(tmp: Path) -> Path:
    run = tmp / "sealed"
    shutil.copytree(CPU_ARCHIVE, run)
    return run


def _ckpt_config_cut(tmp: Path) -> Path:
    d = tmp / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen3", "hidden_')
    return d


def _ckpt_llama(tmp: Path) -> Path:
    d = tmp / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def _ckpt_weights_cut(tmp: Path) -> Path:
    d = tmp / "ckpt"
    assert cli.main(["export", "qwen3-tiny", "--out", str(d)]) == 0
    for f in d.glob("model*.safetensors"):
        truncate(f, 0.3)
    return d


def _a_file(tmp: Path) -> Path:
    f = tmp / "a-file"
    f.write_text("not a directory")
    return f


def _a_dir(tmp: Path) -> Path:
    d = tmp / "a-dir"
    d.mkdir()
    return d


def _not_utf8(tmp: Path) -> Path:
    f = tmp / "latin1.json"
    f.write_bytes(b'{"schema": "\xff\xfe"}')
    return f


def _mlx_lm_engine(tmp: Path) -> Path:
    return Path(__file__).resolve().parent.parent / "config" / "engines" / "mlx-lm.yaml"


def _engine_bad_yaml(tmp: Path) -> Path:
    f = tmp / "engine.yaml"
    f.write_text("name: [unclosed\n")
    return f


def _defaults_cut(tmp: Path) -> Path:
    f = tmp / "defaults.json"
    f.write_text('{"schema": "fusedqk-defaults/1", "backends": {')
    return f


def _mlx_lm_engine(tmp: Path) -> Path:
    return Path(__file__).resolve().parents[1] / "config" / "engines" / "mlx-lm.yaml"


FIXTURES = {name.lstrip("_"): fn for name, fn in globals().items()
            if name.startswith("_") and callable(fn) and not name.startswith("__")}

# (argv with {fixture} placeholders, environment, words the one line must hold)
CASES = [
    # counts: a documented range, checked before any work
    (["generate", "-p", "100000000000"], None, ["--prompt-tokens", "out of range"]),
    (["generate", "-p", "2000000000"], None, ["--prompt-tokens", "out of range"]),
    (["generate", "-n", "100000000000"], None, ["--max-tokens", "out of range"]),
    (["generate", "-p", "5000"], None, ["--prompt-tokens 5000", f"context of {TINY_CONTEXT}"]),
    (["generate", "-p", "4000", "-n", "200"], None, ["exceed", "max_position_embeddings"]),
    (["identity", "-k", "100000000000"], None, ["--prompts", "out of range"]),
    (["identity", "-n", "100000000000"], None, ["--tokens", "out of range"]),
    (["identity", "-p", "4000", "-n", "256"], None, ["context of 4096"]),
    (["bench", "-r", "1000000000000"], None, ["--rounds", "out of range"]),
    (["bench", "-g", "0"], None, ["--generation-tokens", "out of range"]),
    (["bench", "-c", "0"], None, ["--chunk-tokens"]),
    (["bench", "-w", "0"], None, ["--warmup"]),
    (["bench", "-r", "5", "--target-half-width", "0.01", "--max-rounds", "3"], None,
     ["--max-rounds 3 is below --rounds 5"]),
    (["blockbench", "--reps", "10000000000"], None, ["--reps", "out of range"]),
    (["blockbench", "-b", "0"], None, ["--batch"]),
    (["generate", "-w", "-1"], None, ["--warmup"]),
    (["generate", "--seed", "-1"], None, ["--seed", "out of range"]),
    (["generate", "--seed", "1e20"], None, ["--seed", "not a whole number"]),
    (["export", "qwen3-tiny", "--out", "x", "--seed", "99999999999"], None, ["--seed"]),
    # numbers that are not numbers
    (["generate", "--temp", "nan"], None, ["--temp", "finite"]),
    (["generate", "--temp", "inf"], None, ["--temp", "finite"]),
    (["generate", "--temp", "-1"], None, ["--temp"]),
    (["decide", "{run}", "--min-gain", "nan"], None, ["--min-gain", "finite"]),
    (["decide", "{run}", "--min-gain", "1e9"], None, ["--min-gain", "out of range"]),
    (["decide", "{run}", "--identity-policy", "fuzzy"], None, ["--identity-policy"]),
    (["bench", "--target-half-width", "2"], None, ["--target-half-width", "between 0 and 1"]),
    (["bench", "--max-rounds", "9"], None, ["--max-rounds", "--target-half-width"]),
    (["bench", "--max-measure-s", "60"], None, ["--max-measure-s", "--target-half-width"]),
    (["bench", "--target-half-width", "0.01", "--max-measure-s", "0"], None,
     ["--max-measure-s", "out of range"]),
    # names and choices
    (["generate", "-m", "qwen3-9000"], None, ["--model", "qwen3-0.6b"]),
    (["generate", "-m", "Qwen/Qwen3-8B"], None, ["hub id"]),
    (["generate", "-m", "./no/such/dir"], None, ["neither a registry name"]),
    (["bench", "-m", "qwen3-9000"], None, ["--model", "neither a registry name"]),
    (["export", "qwen3-9000", "--out", "x"], None, ["qwen3-9000"]),
    (["generate", "--bits", "5"], None, ["--bits", "choose from"]),
    (["generate", "--group-size", "48"], None, ["--group-size", "choose from"]),
    (["generate", "--dtype", "float64"], None, ["--dtype", "choose from"]),
    (["generate", "--backend", "cuda"], None, ["backend 'cuda' is not available", "cpu"]),
    (["generate", "--backend", "tpu"], None, ["accepted: auto, cpu, cuda, metal"]),
    (["generate", "--path", "fused", "--impl", "kernel"], None, ["no cpu version"]),
    (["bench", "--paths", "graph"], None, ["--paths"]),
    (["bench", "--paths", "graph,turbo"], None, ["--paths", "turbo"]),
    (["identity", "--impls", "turbo"], None, ["--impls", "turbo"]),
    (["identity", "--impls", ""], None, ["--impls ''", "name the fused implementations"]),
    (["identity", "--impls", "graph"], None, ["--impls 'graph'", "graph itself always runs"]),
    (["blockbench", "--paths", "warp"], None, ["--paths"]),
    (["blockbench", "--paths", "graph,launch"], None, ["launch cannot run on cpu", "graph, composite"]),
    (["blockbench", "--paths", "kernel"], None, ["kernel cannot run on cpu"]),
    (["frobnicate"], None, ["invalid choice"]),
    # environment values
    (["env"], {"FUSEDQK_FUSED_QK_NORM": "perhaps"}, ["FUSEDQK_FUSED_QK_NORM", "1/true/on/yes"]),
    (["env"], {"FUSEDQK_FUSED_IMPL": "fast"}, ["FUSEDQK_FUSED_IMPL"]),
    (["env"], {"FUSEDQK_DEFAULTS": "/no/such.json"}, ["FUSEDQK_DEFAULTS", "no such file"]),
    (["env"], {"FUSEDQK_DEFAULTS": "{defaults_cut}"}, ["FUSEDQK_DEFAULTS"]),
    (["env"], {"FUSEDQK_DEFAULTS": ""}, ["FUSEDQK_DEFAULTS", "is empty"]),
    (["env"], {"FUSEDQK_KERNEL_CALL": "bogus"}, ["FUSEDQK_KERNEL_CALL", "auto, primitive, cuda_kernel"]),
    (["env"], {"FUSEDQK_KERNEL_CALL": ""}, ["FUSEDQK_KERNEL_CALL"]),
    (["env"], {"FUSEDQK_FUSED_QK_NORM": "x" * 100_000}, ["FUSEDQK_FUSED_QK_NORM", "(100000 characters)"]),
    (["bench", "-m", "qwen3-tiny", "--engine", "{mlx_lm_engine}"], {"FUSEDQK_CHECKPOINTS": "   "},
     ["FUSEDQK_CHECKPOINTS", "absolute folder"]),
    (["bench", "-m", "qwen3-tiny", "--engine", "{mlx_lm_engine}"], {"FUSEDQK_CHECKPOINTS": "rel/dir"},
     ["FUSEDQK_CHECKPOINTS", "absolute folder"]),
    # The built-in engine's own cache folder: refused, not quietly replaced by weights in memory.
    (["generate", "-m", "qwen3-tiny", "-n", "2"], {"FUSEDQK_CHECKPOINTS": "   "},
     ["FUSEDQK_CHECKPOINTS", "absolute folder"]),
    (["generate", "-m", "qwen3-tiny", "-n", "2"], {"FUSEDQK_CHECKPOINTS": "{a_file}"},
     ["FUSEDQK_CHECKPOINTS", "is an existing file"]),
    (["record-config", "--config", "[1]", "--out", "x"], None, ["--config", "one JSON object"]),
    (["record-config", "--config", "{", "--out", "x"], None, ["--config: not JSON"]),
    (["compare", "{sealed}", "{sealed}"], None, ["given more than once"]),
    # files: missing, damaged, or of the wrong kind
    (["generate", "-m", "{ckpt_config_cut}"], None, ["config.json is not valid JSON"]),
    (["generate", "-m", "{ckpt_llama}"], None, ["model_type 'llama' is not supported"]),
    (["generate", "-m", "{ckpt_weights_cut}"], None, ["weights do not load", "damaged"]),
    (["bench", "--engine", "/no/such/engine.yaml"], None, ["--engine"]),
    (["bench", "--engine", "{engine_bad_yaml}"], None, ["engine.yaml"]),
    (["decide", "{run_bench_cut}"], None, ["bench.json: not valid JSON"]),
    (["aggregate", "{run_bench_cut}"], None, ["bench.json: not valid JSON"]),
    (["report", "--from", "{run_bench_cut}"], None, ["bench.json: not valid JSON"]),
    (["report", "--from", "{run_no_tokens}"], None, ["tokens.csv: missing"]),
    (["report", "--from", "{run_bad_ci}"], None, ["bench.json", "lo <= point <= hi"]),
    (["report", "--from", "{run_decisions_cut}"], None, ["decisions.json: not valid JSON"]),
    (["aggregate", "{run_trials_cut}"], None, ["trials.csv", "cut short"]),
    (["decide", "/no/such/run"], None, ["no such run directory"]),
    (["report", "--from", "/no/such/run"], None, ["no such run directory"]),
    (["verify", "/no/such/run"], None, ["no MANIFEST.sha256"]),
    (["verify", "--write", "/no/such/run"], None, ["no such run directory"]),
    # outputs that cannot be written: refused before anything is measured
    (["bench", "--out-dir", "{a_file}"], None, ["--out-dir", "existing file"]),
    (["blockbench", "--out-dir", "{a_file}"], None, ["--out-dir", "existing file"]),
    (["identity", "--out-dir", "{a_file}"], None, ["--out-dir", "existing file"]),
    (["export", "qwen3-tiny", "--out", "{a_file}"], None, ["--out", "existing file"]),
    (["report", "--from", "{run}", "--out", "{a_file}"], None, ["--out", "existing file"]),
    (["decide", "{run}", "--out", "{run}"], None, ["--out", "is a folder"]),
    (["bench", "--out-dir", "{a_file}/sub"], None, ["--out-dir", "is a file, not a folder"]),
    (["identity", "--out-dir", "{a_file}/sub/deeper"], None, ["--out-dir", "is a file, not a folder"]),
    (["bench", "--status", "{a_dir}"], None, ["--status", "is a folder; name a file"]),
    (["bench", "--status", "{a_file}/status.json"], None, ["--status", "is a file, not a folder"]),
    (["bench", "--out-dir", ""], None, ["--out-dir ''", "is empty"]),
    (["bench", "--status", ""], None, ["--status ''", "is empty"]),
    (["identity", "--status", " "], None, ["--status ' '", "is empty"]),
    (["bench", "--out-dir", "b" * 300], None, ["--out-dir", "too long"]),
    (["export", "qwen3-tiny", "--out", "{a_file}/x"], None, ["--out", "is a file, not a folder"]),
    (["decide", "{run}", "--out", "{a_file}/d.json"], None, ["--out", "is a file, not a folder"]),
    (["report", "--from", "{run}", "--out", ""], None, ["--out ''", "is empty"]),
    (["bench", "--engine", "{mlx_lm_engine}", "--checkpoint-dir", "{a_file}"], None,
     ["--checkpoint-dir", "existing file"]),
    (["bench", "--engine", "{mlx_lm_engine}", "-r", "2"], {"FUSEDQK_CHECKPOINTS": "{a_file}"},
     ["FUSEDQK_CHECKPOINTS", "is an existing file"]),
    (["env"], {"FUSEDQK_DEFAULTS": "{not_utf8}"}, ["FUSEDQK_DEFAULTS", "not UTF-8"]),
    (["env"], {"FUSEDQK_DEFAULTS": "d" * 100_000}, ["FUSEDQK_DEFAULTS", "(100000 characters)",
                                                    "cannot be read"]),
    # sealed archives stay sealed
    (["report", "--from", "{sealed_tampered}"], None, ["does not match", "changed: summaries.csv"]),
    (["report", "--from", "{sealed_tampered}", "--rewrite"], None, ["does not match"]),
    (["report", "--from", "{sealed}"], None, ["sealed run", "--out DIR", "--rewrite"]),
    (["verify", "{sealed_dotfile}"], None, ["manifest check failed", "not in manifest: .evil"]),
]


def _expand(argv: list[str], env: dict | None, tmp: Path) -> tuple[list[str], dict]:
    made: dict[str, str] = {}

    def fill(text: str) -> str:
        for name, fn in FIXTURES.items():
            key = "{" + name + "}"
            if key in text:
                if name not in made:
                    made[name] = str(fn(tmp))
                text = text.replace(key, made[name])
        return text

    return [fill(a) for a in argv], {k: fill(v) for k, v in (env or {}).items()}


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("argv, env, needles", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line(argv, env, needles, tmp_path, monkeypatch, capsys):
    repo = Path.cwd()
    before = _tree(repo / "results")
    argv, env = _expand(argv, env, tmp_path)
    monkeypatch.setenv("FUSEDQK_CHECKPOINTS", str(tmp_path / "checkpoints"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # relative outputs ("x") land here, never in the repository
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code != 0, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fusedqk: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _tree(repo / "results") == before
    assert not (tmp_path / "x").exists()  # nothing half-written where an output was named


def test_the_battery_is_large():
    assert len(CASES) >= 90


def test_a_sealed_run_re_renders_elsewhere_and_in_place_only_when_asked(tmp_path, capsys):
    run = _sealed(tmp_path)
    assert cli.main(["report", "--from", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").read_bytes() == (run / "report.md").read_bytes()
    assert cli.main(["report", "--from", str(run), "--rewrite"]) == 0
    assert archive.verify(run) == []


def test_a_renamed_copy_re_renders_the_same_bytes(tmp_path):
    renamed = tmp_path / "some-other-name"
    shutil.copytree(CPU_ARCHIVE, renamed)
    assert cli.main(["report", "--from", str(renamed), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").read_bytes() == (CPU_ARCHIVE / "report.md").read_bytes()


def test_verify_covers_dotfiles(tmp_path):
    run = _sealed_dotfile(tmp_path)
    assert archive.verify(run) == ["not in manifest: .evil"]


def test_an_exception_becomes_its_first_line_or_its_type():
    from fusedqk.errors import first_line

    assert first_line(ValueError("  bad header\n  at byte 12\n")) == "bad header"
    assert first_line(OSError()) == "OSError"
    assert first_line(RuntimeError("   ")) == "RuntimeError"


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("head_dim", 0),
                                        ("vocab_size", 0), ("hidden_size", "1024"),
                                        ("num_key_value_heads", True)])
def test_a_checkpoint_config_with_impossible_sizes_is_one_line(tmp_path, capsys, key, value):
    """A checkpoint whose config.json gives a size of 0, a string or a boolean: one line naming
    the key, before anything is built."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 2,
              "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "tie_word_embeddings": True, key: value}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert cli.main(["generate", "-m", str(ckpt), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "positive whole number" in err[0]
