"""The nodes as ComfyUI V3 nodes (``comfy_api.latest``: ``io.ComfyNode``, ``define_schema``, ``execute``,
``comfy_entrypoint``), which ComfyUI 0.3.64 and later load.

Each node keeps its inputs in one place, its ``INPUT_TYPES`` / ``RETURN_TYPES`` declaration (a plain class the unit
tests inspect without ComfyUI); ``v3_node`` turns that declaration into an ``io.Schema`` (same node id, display
name, input names, order, types, defaults, ranges and tooltips; same outputs), so workflow JSON saved with the
earlier registration loads unchanged. ``execute`` calls the node's method with the same arguments (hidden inputs
from ``cls.hidden``), ``validate_inputs`` / ``fingerprint_inputs`` are the node's ``VALIDATE_INPUTS`` /
``IS_CHANGED`` with their explicit signatures (ComfyUI skips its own min/max checks only for inputs named there).

Combos keep the classic list type (``io.Combo.Input`` typed by its options): ComfyUI 0.3.64 refuses a value not in
the list at queue time only for list-typed inputs.
"""

from __future__ import annotations

WIDGET_OPTIONS = {  # option keys of the old declaration -> keyword of the V3 input class
    "INT": {"default": "default", "min": "min", "max": "max", "step": "step",
            "control_after_generate": "control_after_generate"},
    "FLOAT": {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round"},
    "STRING": {"default": "default", "multiline": "multiline", "placeholder": "placeholder",
               "dynamicPrompts": "dynamic_prompts"},
    "BOOLEAN": {"default": "default", "label_on": "label_on", "label_off": "label_off"},
    "COMBO": {"default": "default"},
}
COMMON = {"tooltip": "tooltip", "forceInput": "force_input", "lazy": "lazy"}


def _input(io, name: str, spec: tuple, optional: bool, node: str):
    kind = spec[0]
    opts = dict(spec[1]) if len(spec) > 1 else {}
    key = "COMBO" if isinstance(kind, (list, tuple)) else kind
    known = {**COMMON, **WIDGET_OPTIONS.get(key, {})}
    unknown = set(opts) - set(known)
    if unknown:
        raise ValueError(f"{node}.{name}: option(s) {sorted(unknown)} have no V3 equivalent in nodes/v3.py; add "
                         "them to WIDGET_OPTIONS")
    kw = {known[k]: v for k, v in opts.items()}
    if key == "COMBO":
        kw.pop("force_input", None)
        return _list_combo(io)(name, options=list(kind), optional=optional, **kw)
    cls = {"INT": io.Int, "FLOAT": io.Float, "STRING": io.String, "BOOLEAN": io.Boolean}.get(key)
    if cls is not None:
        return cls.Input(name, optional=optional, **kw)
    extra = {"forceInput": kw.pop("force_input")} if "force_input" in kw else None
    return io.Custom(kind).Input(name, optional=optional, extra_dict=extra, **kw)


def _list_combo(io):
    """``io.Combo.Input`` whose type is its option list, as a classic combo's: ComfyUI 0.3.64 checks "Value not in
    list" at queue time only for list-typed inputs (execution.py ``validate_inputs``), not for ``"COMBO"``."""
    class ListCombo(io.Combo.Input):
        def get_io_type(self):
            return list(self.options)

    return ListCombo


def v3_node(node_id: str, v1):
    """The ``io.ComfyNode`` class of one node declared the classic way (``v1``)."""
    from comfy_api.latest import io

    declared = v1.INPUT_TYPES()
    known = {h.value for h in io.Hidden}
    hidden = {k: v for k, v in declared.get("hidden", {}).items() if v in known}
    # the pack's own hidden inputs (nodes/graph.py: a value its on_prompt handler writes into the prompt)
    own_hidden = {k: v for k, v in declared.get("hidden", {}).items() if v not in known}
    names = list(getattr(v1, "RETURN_NAMES", ()) or ())
    tips = list(getattr(v1, "OUTPUT_TOOLTIPS", ()) or ())
    outputs = [io.Custom(t).Output(display_name=names[i] if i < len(names) else None,
                                   tooltip=tips[i] if i < len(tips) else None)
               for i, t in enumerate(v1.RETURN_TYPES)]

    def define_schema(cls):
        inputs = [_input(io, n, s, section == "optional", node_id)
                  for section in ("required", "optional") for n, s in v1.INPUT_TYPES().get(section, {}).items()]
        return io.Schema(node_id=node_id, display_name=v1.DISPLAY_NAME, category=v1.CATEGORY,
                         description=getattr(v1, "DESCRIPTION", ""), inputs=inputs, outputs=outputs,
                         hidden=[io.Hidden(v) for v in hidden.values()] or None,
                         is_output_node=bool(getattr(v1, "OUTPUT_NODE", False)))

    def execute(cls, **kwargs):
        for arg, value in hidden.items():
            kwargs[arg] = getattr(cls.hidden, io.Hidden(value).name, None)
        out = getattr(v1(), v1.FUNCTION)(**kwargs)
        if isinstance(out, dict):  # {"ui": ..., "result": ...}; 0.3.64's NodeOutput.from_dict cannot build one
            return io.NodeOutput(*out.get("result", ()), ui=out.get("ui"))
        return io.NodeOutput(*out)

    body = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "V1": v1,
            "__doc__": v1.__doc__, "__module__": v1.__module__}
    if own_hidden:
        body["INPUT_TYPES"] = classmethod(_with_own_hidden(io, own_hidden))
    for old, new in (("VALIDATE_INPUTS", "validate_inputs"), ("IS_CHANGED", "fingerprint_inputs")):
        if hasattr(v1, old):
            body[new] = classmethod(_same_signature(getattr(v1, old)))
    return type(v1.__name__, (io.ComfyNode,), body)


def _with_own_hidden(io, own_hidden: dict):
    """``INPUT_TYPES`` that also lists the pack's own hidden inputs. V3 hidden inputs are ComfyUI's fixed set
    (``io.Hidden``); ComfyUI 0.3.64 hands a node every input of the prompt that its ``INPUT_TYPES`` lists, also when
    asked without hidden ones (``get_input_data`` and validation), so listing them keeps the values that
    nodes/graph.py writes into the prompt flowing to ``execute`` / ``validate_inputs``, as in the classic API.
    The one override of a core method here: checked on the real server by the graph-check tests."""
    base = io.ComfyNode.INPUT_TYPES.__func__

    def input_types(cls, include_hidden=True, return_schema=False):
        out = base(cls, include_hidden, return_schema)
        inputs = out[0] if return_schema else out
        inputs.setdefault("hidden", {}).update({k: (v,) for k, v in own_hidden.items()})
        return out

    return input_types


def _same_signature(method):
    """``cls.<method>(**inputs)`` of the old class, with its explicit signature (ComfyUI reads it with
    ``inspect.getfullargspec``: inputs named there skip its own min/max/combo checks, ``**kwargs`` would skip all)."""
    import inspect

    sig = inspect.signature(method.__func__)
    accepted = set(list(sig.parameters)[1:])

    def call(cls, **inputs):
        return method(**{k: v for k, v in inputs.items() if k in accepted})

    call.__signature__ = sig
    call.__name__ = method.__name__
    return call


def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing every node of ``nodes.NODE_CLASS_MAPPINGS``."""
    from comfy_api.latest import ComfyExtension

    from . import NODE_CLASS_MAPPINGS

    nodes = [v3_node(node_id, cls) for node_id, cls in NODE_CLASS_MAPPINGS.items()]

    class QSchedExtension(ComfyExtension):
        async def get_node_list(self):
            return nodes

    return QSchedExtension()
