"""The model registry's architectures (fusedqk/data/models.json), read without MLX: the planner
checks model names with it on hosts that have no MLX, and models.py builds from it."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def configs() -> dict[str, dict]:
    """Registry name -> the model's public architecture config."""
    text = resources.files("fusedqk").joinpath("data/models.json").read_text()
    return json.loads(text)["models"]


def approx_parameters(config: dict) -> int:
    """The parameter count from an architecture config (weights only; norms are negligible)."""
    h, heads, kv, d = (config["hidden_size"], config["num_attention_heads"],
                       config["num_key_value_heads"], config["head_dim"])
    attention = 2 * h * heads * d + 2 * h * kv * d
    if config.get("num_experts"):
        mlp = config["num_experts"] * 3 * h * config["moe_intermediate_size"] + h * config["num_experts"]
    else:
        mlp = 3 * h * config["intermediate_size"]
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return config["num_hidden_layers"] * (attention + mlp) + embeddings


def size_order(model: str) -> tuple[int, str]:
    """A sort key that puts registry models smallest first (others after, by name)."""
    config = configs().get(model)
    return (approx_parameters(config) if config else 1 << 62, model)
