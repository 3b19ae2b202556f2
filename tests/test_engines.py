"""Command engines: the engine file is checked, fake engines give the verdicts and failures they
should, and fusedqk's export, patch and mlx-lm launcher work with mlx-lm itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusedqk import external
from fusedqk.engines.command import EngineFailure, fill_template, load_engine
from fusedqk.errors import UserError
from fusedqk.results import BenchSettings

FAKE = textwrap.dedent('''
    """A fake engine for the tests: its behaviour comes from FAKE_MODE and the arm's FAKE_FUSED."""
    import os, random, sys, time
    mode, fused = os.environ.get("FAKE_MODE", "same"), os.environ.get("FAKE_FUSED") == "1"
    kind = sys.argv[1]
    if mode == "crash":
        print("boom: out of memory", file=sys.stderr); sys.exit(3)
    if mode == "hang":
        time.sleep(60)
    if kind == "bench":
        if mode == "unreadable":
            print("Decode: fast"); sys.exit(0)
        print("[Profile Results]")
        print(f"Prefill: 10.0 ms ({500.0 if fused else 400.0} tok/s)")
        print(f"Decode: 100.0 ms ({125.0 * random.uniform(0.99, 1.01) if fused else 100.0} tok/s)")
    else:
        words = [f"t{(int(sys.argv[2].split()[0][1:]) * 7 + i) % 97}" for i in range(int(sys.argv[3]))]
        if mode == "differs" and fused:
            words[5] = "t0"
        if mode == "noisy":
            words[3] = f"t{random.randrange(10**6)}"
        print("banner: fake engine 1.0")
        print(" ".join(words))
        print(f"[Generated {len(words)} tokens in 0.1s = 10 tok/s]")
''')


def engine_file(tmp_path: Path, arms=None, **overrides) -> Path:
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE)
    doc = {
        "name": "fake",
        "arms": arms or {"graph": {"env": {"FAKE_FUSED": "0"}}, "fused": {"env": {"FAKE_FUSED": "1"}}},
        "bench": {"command": ["{python}", str(script), "bench", "{model_path}", "{prompt_tokens}",
                              "{generation_tokens}"],
                  "regex": {"decode_tok_s": r"^Decode: .*\((?P<value>[0-9.]+) tok/s\)",
                            "prefill_tok_s": r"^Prefill: .*\((?P<value>[0-9.]+) tok/s\)"},
                  "timeout_s": 5},
        "identity": {"command": ["{python}", str(script), "identity", "{prompt}", "{max_tokens}"],
                     "compare": "text",
                     "generated": r"(?s)^banner: fake engine 1\.0\n(?P<value>.*?)\n\[Generated \d+",
                     "timeout_s": 5},
        "models": {"qwen3-tiny": str(tmp_path)},
        **overrides,
    }
    path = tmp_path / "fake.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def run_identity(tmp_path, mode, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", mode)
    spec = load_engine(engine_file(tmp_path))
    return external.identity(spec, "qwen3-tiny", tmp_path, "cpu", 97, 4, 12, 2, 0)


def test_identical_arms_are_refused(tmp_path):
    same = {"graph": {"env": {"X": "1"}}, "fused": {"env": {"X": "1"}}}
    with pytest.raises(UserError, match="same environment"):
        load_engine(engine_file(tmp_path, arms=same))


@pytest.mark.parametrize("overrides, needle", [
    ({"bench": {"command": ["x", "{model_path}; rm -rf /"], "regex": {"decode_tok_s": "(?P<value>1)"}}},
     None),  # a placeholder inside an argument is fine: it never reaches a shell
    ({"bench": {"command": ["x", "{modelpath}"], "regex": {"decode_tok_s": "(?P<value>1)"}}},
     "placeholder {modelpath} is not one of this command's"),
    ({"bench": {"command": ["x"], "regex": {"decode_tok_s": "([0-9]+)"}}}, "(?P<value>"),
    ({"bench": {"command": ["x"]}}, "decode_tok_s"),
    ({"bench": {"command": "x --fast", "regex": {"decode_tok_s": "(?P<value>1)"}}},
     "the command as a list of arguments"),
    ({"colour": "blue"}, "unknown key 'colour'"),
])
def test_engine_files_are_checked(tmp_path, overrides, needle):
    if needle is None:
        load_engine(engine_file(tmp_path, **overrides))
        return
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("?", r"\?")
                       .replace("{", r"\{").replace("}", r"\}")):
        load_engine(engine_file(tmp_path, **overrides))


def test_placeholders_never_pass_through_a_shell():
    filled = fill_template(["run", "--m={model_path}"], {"model_path": "a; rm -rf /"})
    assert filled == ["run", "--m=a; rm -rf /"]


def test_fake_engine_bench_measures_the_arms_speedup(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "same")
    spec = load_engine(engine_file(tmp_path))
    run = external.bench(spec, "qwen3-tiny", tmp_path, "cpu", 97, BenchSettings(16, 8, rounds=4, warmup=1))
    (sp,) = run.speedups
    assert sp["path"] == "fused" and sp["rounds"] == 4
    assert sp["lo"] > 1.2 and sp["hi"] < 1.3
    assert run.meta["instrument"].startswith("whole-process")
    assert {r["prefill_tok_s"] for r in run.trials} == {400.0, 500.0}


def test_an_engine_bench_splits_its_rounds_by_the_hosts_speed_too(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "same")
    spec = load_engine(engine_file(tmp_path))
    run = external.bench(spec, "qwen3-tiny", tmp_path, "cpu", 97, BenchSettings(16, 8, rounds=8, warmup=1))
    (sp,) = run.speedups
    fast, slow = sp["host_states"]["first"], sp["host_states"]["second"]
    assert 1.2 < fast[0] < 1.3 and 1.2 < slow[0] < 1.3  # the fake's arms differ by 25 % always
    assert sp["halves"] is not None


def test_equal_engine_is_equal(tmp_path, monkeypatch):
    assert run_identity(tmp_path, "same", monkeypatch)["verdict"] == "EQUAL"


def test_engine_whose_arms_differ_differs(tmp_path, monkeypatch):
    result = run_identity(tmp_path, "differs", monkeypatch)
    assert result["verdict"] == "DIFFERS"
    assert result["free_running"]["greedy_first_divergence"][0] is not None


def test_nondeterministic_engine_is_inconclusive(tmp_path, monkeypatch):
    result = run_identity(tmp_path, "noisy", monkeypatch)
    assert result["verdict"] == "INCONCLUSIVE"
    assert result["controls"]["graph"]["identical"] is False


@pytest.mark.parametrize("mode, needle", [
    ("crash", "exited with status 3: boom: out of memory"),
    ("hang", "did not finish in 5 s"),
    ("unreadable", "engine fake, bench: the output has no decode_tok_s"),
])
def test_engine_failures_are_one_line(tmp_path, monkeypatch, mode, needle):
    monkeypatch.setenv("FAKE_MODE", mode)
    spec = load_engine(engine_file(tmp_path))
    with pytest.raises(EngineFailure, match=needle) as info:
        external.bench(spec, "qwen3-tiny", tmp_path, "cpu", 97, BenchSettings(16, 8, rounds=2, warmup=1))
    assert "\n" not in str(info.value)


def test_a_missing_binary_is_one_line_in_the_status_file(tmp_path):
    path = engine_file(tmp_path, bench={"command": ["no-such-engine-binary", "{model_path}"],
                                        "regex": {"decode_tok_s": "(?P<value>1)"}})
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 97}))
    status = tmp_path / "status.json"
    proc = subprocess.run([sys.executable, "-m", "fusedqk", "bench", "--engine", str(path),
                           "-m", "qwen3-tiny", "--backend", "cpu", "-r", "2",
                           "--out-dir", str(tmp_path / "out"), "--status", str(status)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    doc = json.loads(status.read_text())
    assert doc["ok"] is False and "'no-such-engine-binary' not found" in doc["error"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_export_loads_in_mlx_lm_and_patch_keeps_its_tokens(tmp_path, model, monkeypatch, capfd):
    import mlx.core as mx
    from mlx_lm import generate, load
    from packaging.version import Version

    import fusedqk
    from fusedqk.atomic import caller_mode
    from fusedqk.export import export, word
    from fusedqk.models import Quantization

    mx.set_default_device(mx.cpu)
    report = export(model, tmp_path / "ckpt", Quantization(), 0, shard_bytes=4 << 20)
    assert report.shards > 1
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    # transformers 4.57.3+ skip their Mistral-regex warning for a local qwen3 tokenizer only when
    # config.json names a version up to 4.57.2 (as Qwen's own configs do: 4.51.0).
    assert Version(config["transformers_version"]) <= Version("4.57.2")
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == caller_mode(directory=True)
    loaded, tokenizer = load(str(tmp_path / "ckpt"))
    assert "incorrect regex" not in capfd.readouterr().err
    prompt = " ".join(word(i) for i in (5, 17, 99, 300, 1234))
    plain = generate(loaded, tokenizer, prompt, max_tokens=24, verbose=False)
    assert len(set(plain.split())) > 5  # varied output, not one repeated token
    monkeypatch.setenv("FUSEDQK_FUSED_QK_NORM", "1")
    patched = fusedqk.patch(loaded)
    assert patched.impl == "composite" and patched.patched == list(range(len(loaded.layers)))
    assert fusedqk.patch(loaded).reason == "already patched"  # idempotent
    assert generate(loaded, tokenizer, prompt, max_tokens=24, verbose=False) == plain


def _tiny_model(seed: int = 0):
    from fusedqk.engines.builtin import ModelRef
    from fusedqk.models import load_model

    return load_model(ModelRef("qwen3-tiny", "cpu").model, ModelRef().quantization("cpu"),
                      seed=seed).model


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def test_a_patched_model_decodes_with_weights_replaced_after_patching(monkeypatch):
    """Weights loaded into a patched model after patching (here: another seed's, through
    Module.update and load_weights' path) are the ones its fused call reads: its greedy tokens
    are the unpatched model's with the same weights, from the first token."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import fusedqk

    mx.set_default_device(mx.cpu)
    monkeypatch.setenv("FUSEDQK_FUSED_QK_NORM", "1")
    patched, other = _tiny_model(0), _tiny_model(1)
    assert fusedqk.patch(patched).impl == "composite"
    prompt = [5, 17, 99, 300, 12]
    before = _greedy(patched, prompt, 12)
    patched.update(other.parameters())
    assert _greedy(patched, prompt, 12) == _greedy(other, prompt, 12) != before
    # One projection's weight set directly, the way a fine-tuning loop would.
    attn = patched.layers[0].self_attn
    attn.q_proj.weight = mx.zeros_like(attn.q_proj.weight)
    other.layers[0].self_attn.q_proj.weight = mx.zeros_like(attn.q_proj.weight)
    assert _greedy(patched, prompt, 12) == _greedy(other, prompt, 12)
    assert dict(tree_flatten(patched.parameters())).keys() == \
        dict(tree_flatten(other.parameters())).keys()


def test_a_patched_models_saved_weights_load_into_an_unpatched_one(tmp_path, monkeypatch):
    import mlx.core as mx

    import fusedqk

    mx.set_default_device(mx.cpu)
    monkeypatch.setenv("FUSEDQK_FUSED_QK_NORM", "1")
    patched = _tiny_model(2)
    assert fusedqk.patch(patched).is_fused
    patched.save_weights(str(tmp_path / "w.safetensors"))
    saved = mx.load(str(tmp_path / "w.safetensors"))
    assert not any("graph_attn" in key or "qkv_" in key for key in saved)
    plain = _tiny_model(3)
    plain.load_weights(str(tmp_path / "w.safetensors"), strict=True)
    prompt = [3, 1, 4, 1, 5]
    assert _greedy(plain, prompt, 8) == _greedy(patched, prompt, 8)


def test_patch_leaves_an_unsupported_model_alone(monkeypatch):
    import mlx.nn as nn

    import fusedqk

    monkeypatch.setenv("FUSEDQK_FUSED_QK_NORM", "1")
    model = nn.Linear(2, 2)
    report = fusedqk.patch(model)
    assert not report.is_fused and "not supported" in report.reason


def test_patch_off_by_the_toggle_changes_nothing(monkeypatch):
    import fusedqk
    from fusedqk.engines.builtin import ModelRef
    from fusedqk.models import load_model

    monkeypatch.setenv("FUSEDQK_FUSED_QK_NORM", "0")
    model = load_model(ModelRef("qwen3-tiny", "cpu").model, ModelRef().quantization("cpu")).model
    before = [type(layer.self_attn) for layer in model.layers]
    report = fusedqk.patch(model)
    assert not report.is_fused and report.reason.startswith("FUSEDQK_FUSED_QK_NORM=0")
    assert [type(layer.self_attn) for layer in model.layers] == before


def test_the_shipped_engine_files_load():
    root = Path(__file__).resolve().parents[1] / "config" / "engines"
    names = {load_engine(p).name for p in root.glob("*.yaml")}
    assert names == {"mlx-lm", "fusedqk-generate", "mlxcel", "mlx-lm-server", "mlxcel-server",
                     "llama-bench", "llama-server"}



def test_an_arm_that_leaves_the_toggle_unset_never_takes_the_callers_value(tmp_path, monkeypatch):
    """A graph arm that leaves the toggle variable unset (the engine's default: off) runs without
    it even where the caller exported the fused value: the arms really differ, and the fake's
    25 % shows."""
    monkeypatch.setenv("FAKE_MODE", "same")
    monkeypatch.setenv("FAKE_FUSED", "1")  # the caller's own setting, exported
    path = engine_file(tmp_path, arms={"graph": {"env": {}}, "fused": {"env": {"FAKE_FUSED": "1"}}},
                       toggle={"variable": "FAKE_FUSED", "on_values": ["1"], "unset": "off"})
    spec = load_engine(path)
    assert "FAKE_FUSED" not in spec.arm_env("graph") and spec.arm_env("fused")["FAKE_FUSED"] == "1"
    run = external.bench(spec, "qwen3-tiny", tmp_path, "cpu", 97, BenchSettings(16, 8, rounds=2, warmup=1))
    (sp,) = run.speedups
    assert sp["lo"] > 1.2, "both arms ran fused: the caller's value leaked into the graph arm"


@pytest.mark.parametrize("value, needle", [
    ("1e-320", "outside what a decode can report"), ("1e308", "outside what a decode can report"),
    ("1_000", "is not a number"), ("\uff11\uff12\uff13", "is not a number"), (True, "is not a number"),
    ("inf", "is not a number"), ("-5", "is not a number"), ("0", "outside"),
])
def test_an_impossible_decode_rate_is_one_line_never_a_speedup(value, needle):
    with pytest.raises(EngineFailure, match=needle):
        external._positive(value, "decode_tok_s", "engine x, bench, graph arm")


@pytest.mark.parametrize("value, needle", [
    ("100000000000000000000000", "not a count"), ("17", "more than the 16 asked"),
    ("-16", "not a count"), ("\uff11\uff16", "not a count"), (True, "not a count"),
])
def test_an_impossible_token_count_is_one_line(value, needle):
    with pytest.raises(EngineFailure, match=needle):
        external._count(value, "engine x, bench, graph arm", 16)
    assert external._count("16", "arm", 16) == 16


@pytest.mark.parametrize("arg", ["{model", "{model!r}", "{ model }", "model}", "{{model}}"])
def test_a_malformed_placeholder_is_refused_at_load(tmp_path, arg):
    path = engine_file(tmp_path)
    doc = json.loads(path.read_text())
    doc["bench"]["command"].append(arg)
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="brace that is no placeholder"):
        load_engine(path)


def test_an_engines_terminal_escapes_are_shown_not_played(tmp_path, monkeypatch):
    """An engine that fails printing escape sequences: the one line quotes them escaped."""
    from fusedqk.engines import process

    script = tmp_path / "loud.py"
    script.write_text("import sys\nsys.stderr.write('error: \\x1b[2J\\x1b[31mred\\x07\\n')\nsys.exit(3)\n")
    with pytest.raises(EngineFailure) as info:
        process.run_bounded([sys.executable, str(script)], {}, 10, "engine loud")
    message = str(info.value)
    assert "\x1b" not in message and "\x07" not in message and "\\x1b[31mred" in message


def test_a_model_name_that_is_no_plain_folder_name_stops_before_any_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config",
                           f"results_dir={tmp_path}/r", 'backend_settings={cpu: {models: ["a b"]}}'],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert proc.returncode != 0 and "is not accepted; a model name is" in proc.stdout + proc.stderr


def test_an_empty_engine_flag_is_named_as_given():
    with pytest.raises(UserError, match=r"--engine '' is empty"):
        load_engine("")


@pytest.mark.parametrize("break_it", ["no_layers", "attention_replaced"])
def test_patch_leaves_an_odd_model_as_it_was_with_the_reason(break_it):
    import mlx.nn as nn

    import fusedqk
    from fusedqk.models import Quantization, build_synthetic, get_spec

    model = build_synthetic(get_spec("qwen3-tiny"), Quantization(4, 64, "float32"))
    if break_it == "no_layers":
        model.model.layers = []
    else:
        model.layers[1].self_attn = nn.Linear(4, 4)
    before = [type(layer.self_attn) for layer in model.layers]
    report = fusedqk.patch(model, env={"FUSEDQK_FUSED_QK_NORM": "1"})
    assert not report.patched
    assert ("no decoder layers" if break_it == "no_layers" else "left as it was") in report.reason
    assert [type(layer.self_attn) for layer in model.layers] == before


def test_patch_refuses_an_env_that_is_not_a_string_mapping():
    import fusedqk
    from fusedqk.models import Quantization, build_synthetic, get_spec

    model = build_synthetic(get_spec("qwen3-tiny"), Quantization(4, 64, "float32"))
    with pytest.raises(UserError, match="env must map variable names to string values"):
        fusedqk.patch(model, env={"FUSEDQK_FUSED_QK_NORM": 1})


def test_the_builtin_and_a_command_engine_measure_through_the_one_instrument(fake_mlxcel, tmp_path,
                                                                            monkeypatch):
    """One round loop and one summary: the built-in decode and an engine file's whole-process
    rounds both pass through fusedqk.instrument, whose stop rule ends each after its rounds."""
    from fusedqk import bench, instrument
    from fusedqk.engines.builtin import ModelRef, prepare
    from fusedqk.external import bench as engine_bench

    seen = []
    for name in ("paired_rounds", "summarize"):
        real = getattr(instrument, name)
        monkeypatch.setattr(instrument, name,
                            lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))
    settings = BenchSettings(4, 4, rounds=2, warmup=1, chunk_tokens=4)
    builtin = bench.measure_decode(prepare(ModelRef("qwen3-tiny", "cpu")), ["graph", "composite"],
                                   settings)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"vocab_size": 997}))
    engine = engine_bench(load_engine(Path(__file__).resolve().parents[1] / "config" / "engines"
                                      / "mlxcel.yaml"), "qwen3-tiny", checkpoint, "cpu", 997,
                          BenchSettings(8, 8, rounds=2))
    assert seen == ["paired_rounds", "summarize"] * 2
    for run in (builtin, engine):
        assert run.meta["stopped"] == "2 rounds (fixed)" and len(run.meta["round_wall_s"]) == 2
        assert {s["path"] for s in run.summary} == set(run.paths)
        assert all("host_states_by" in s for s in run.speedups)
