"""Triton GPU kernels of pyhappy (imported only when triton is installed)."""
