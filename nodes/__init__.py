"""ComfyUI node classes (classic V1 API). Each module is a thin adapter over qsched/ and calibration/;
ComfyUI itself (``comfy``, ``folder_paths``) is imported inside functions only, so the classes can be
inspected and unit-tested without a ComfyUI install."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
