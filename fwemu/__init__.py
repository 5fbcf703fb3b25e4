"""Emulated mlx5 VF migration firmware (fwemu)."""
