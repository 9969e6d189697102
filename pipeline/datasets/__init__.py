"""Readers of the real on-disk dataset layouts and the synthetic generator."""
