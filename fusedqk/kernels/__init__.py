"""Custom GPU kernels, one fused kernel per file."""
