"""Quantization formats and backends (see issue: W8A8 / W4A8 / W4A4-6)."""
