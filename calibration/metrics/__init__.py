"""Metric backends of the JAQ objective. Each metric is a class whose instances are called as
``metric(images, prompts) -> Tensor[B]`` (float32, CPU) with ComfyUI IMAGE batches [B, H, W, 3] in 0..1.
Heavy libraries (open_clip, transformers, pyiqa, spacy) are imported only when a metric is built."""

from .weights import ENV_VAR, SPECS, WeightFileError, resolve

METRICS = {
    "clipscore": ("clipscore", "CLIPScore"),
    "clipiqa": ("clipiqa", "CLIPIQA"),
    "hpsv2": ("hpsv2", "HPSv2"),
    "aqmap": ("aqmap", "AQMAP"),
}


def get_metric_class(name: str):
    import importlib

    from ...qsched._compat import require

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)}")
    require("open_clip", "open_clip_torch>=2.24", "JAQ scoring (CLIPScore, CLIP-IQA, HPSv2.1, AQ-MAP)")
    module, cls = METRICS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


__all__ = ["METRICS", "get_metric_class", "resolve", "WeightFileError", "SPECS", "ENV_VAR"]
