"""fusedqk: is a fused QKV + Q/K RMSNorm + RoPE decode path worth turning on, per MLX backend?"""

__version__ = "0.1.0"
