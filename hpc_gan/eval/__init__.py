"""Sampling (truncation, sheets) and evaluation helpers."""
