"""Front ends above the library: the ``qsched`` command line (``cli``, ``quantize``) and the demos (``demo``: the
shape world; ``random_demo``: every sampler on tiny random pipelines). Nothing in the library (``calibration``,
``qsched``) or the ComfyUI adapters (``nodes``) imports this package."""
