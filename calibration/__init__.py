"""Calibration: JAQ scoring, coefficient search, prompts, CLI."""
