// Q-Sched: show each node's text result (and its error) ON the node, in the stock ComfyUI frontend.
//
// ComfyUI sends a node's `{"ui": {"text": [...]}}` in the `executed` event; the stock frontend has no display for
// it. Like many packs, we add a read-only text box to the node when it has run (onExecuted). The box is not saved
// in the workflow (serialize: false) and is not sent with the prompt, so widget order and old workflows are
// unaffected. Errors of our nodes (queue-time node_errors and run-time execution_error) are shown in the same box,
// each distinct message once. Image results are never drawn here: they go through ComfyUI's standard preview
// outputs (Preview Image / Save Image).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const WIDGET = "qsched_result";
const LINE_PX = 15;
const PAD_PX = 8;
const MARGIN = 4;  // the frontend draws a DOM widget at (its layout height - 2 * margin)

function isOurs(node) {
  const t = node?.comfyClass ?? node?.type;
  return typeof t === "string" && t.startsWith("QSched");
}

// Height the box needs for its whole text at its current width: the textarea's own scrollHeight measured at height 0
// (the usual auto-grow trick). Before the box has been laid out (no width yet), an estimate from the node's width.
function neededHeight(node, el) {
  if (el.clientWidth > 20) {
    const keep = el.style.height;
    el.style.height = "0px";
    const h = el.scrollHeight;
    el.style.height = keep;
    return Math.max(2 * LINE_PX, h) + 2;
  }
  const cols = Math.max(20, Math.floor((node.size[0] - 30) / 6.7));
  const rows = el.value.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / cols)), 0);
  return PAD_PX + LINE_PX * Math.max(2, rows);
}

function boxFor(node) {
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (w) return w;
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.className = "comfy-multiline-input qsched-result";
  el.spellcheck = false;
  el.dataset.qschedNode = String(node.id);
  el.style.fontFamily = "monospace";
  el.style.fontSize = "11px";
  el.style.lineHeight = `${LINE_PX}px`;
  el.style.padding = `${PAD_PX / 2}px`;
  el.style.whiteSpace = "pre-wrap";
  el.style.overflowWrap = "anywhere";
  el.style.overflow = "hidden";  // sized to its text: nothing to scroll
  el.style.resize = "none";
  const height = () => (w.qschedHeight ?? neededHeight(node, el)) + 2 * MARGIN;
  w = node.addDOMWidget(WIDGET, "qsched_result", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
    getMinHeight: height,
    getMaxHeight: height,
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
  });
  w.serialize = false;            // not in the workflow's widgets_values
  w.options.serialize = false;    // not in the prompt
  w.qschedEl = el;
  return w;
}

// Grow or shrink the node to the box's text (keeping the width the user gave it), then measure again once the
// frontend has laid the box out at its real width: a few frames until the height no longer changes.
function fit(node, w, frames = 6) {
  const h = neededHeight(node, w.qschedEl);
  if (w.qschedHeight !== h) {
    w.qschedHeight = h;
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), size[1]]);
    node.setDirtyCanvas(true, true);
  }
  if (frames > 0) requestAnimationFrame(() => fit(node, w, frames - 1));
}

function show(node, text, isError) {
  if (!node || !isOurs(node)) return;
  const w = boxFor(node);
  w.value = text;
  w.qschedEl.value = text;
  w.qschedEl.dataset.qschedState = isError ? "error" : "result";
  w.qschedEl.style.color = isError ? "#ff7070" : "";
  w.qschedHeight = undefined;
  fit(node, w);
}

// Removes the box (a run has started: what it showed belongs to the previous run).
function remove(node) {
  const i = node.widgets?.findIndex((x) => x.name === WIDGET) ?? -1;
  if (i < 0) return;
  node.widgets[i].onRemove?.();
  node.widgets.splice(i, 1);
  const size = node.computeSize();
  node.setSize([node.size[0], size[1]]);
  node.setDirtyCanvas(true, true);
}

function clearError(node) {
  const w = node.widgets?.find((x) => x.name === WIDGET);
  if (w && w.qschedEl.dataset.qschedState === "error") remove(node);
}

function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

// ComfyUI's own refusal of a value that is not in a list input's choices reads "precision: 'w2a2' not in ['w8a8',
// ...]" (a Python list); the artist gets the input, the value and the choices in words.
const MAX_CHOICES = 12;

function errorText(e) {
  const x = e.extra_info ?? {};
  if (e.type === "value_not_in_list" && x.input_name) {
    const choices = Array.isArray(x.input_config?.[0]) ? x.input_config[0].map(String) : null;
    let list = "";
    if (choices?.length) {
      list = " (" + choices.slice(0, MAX_CHOICES).join(", ") +
        (choices.length > MAX_CHOICES ? `, and ${choices.length - MAX_CHOICES} more` : "") + ")";
    }
    return `input '${x.input_name}': '${x.received_value}' is not one of its choices${list}; pick one from the list`;
  }
  return (e.details || e.message || "").replace(/^[A-Za-z_]+ - (?=Q-Sched )/, "");
}

function showNodeErrors(nodeErrors) {
  for (const [id, info] of Object.entries(nodeErrors ?? {})) {
    const node = nodeById(id);
    if (!node || !isOurs(node)) continue;
    const seen = new Set();
    for (const e of info.errors ?? []) {
      const text = errorText(e);
      if (text) seen.add(text);
    }
    if (seen.size) show(node, "⚠ " + [...seen].join("\n⚠ "), true);
  }
}

// ---- template browser: titles and descriptions of the pack's templates -----------------------------------------
// The frontend lists a pack's workflows/*.json by file name only (title = file name, description = file name with
// '-'/'_' as spaces; thumbnail = the same-name .jpg). web/templates.json holds the real title and description; they
// are written into the template cards (found by the frontend's own data-testid) whenever the dialog renders them.
let templateInfo = null;
const here = new URL(".", import.meta.url);

async function loadTemplateInfo() {
  try {
    const res = await fetch(new URL("../templates.json", here));
    templateInfo = res.ok ? await res.json() : {};
  } catch (err) {
    console.warn("qsched: no template metadata", err);
    templateInfo = {};
  }
}

function decorateTemplateCards(root) {
  if (!templateInfo) return;
  for (const [name, info] of Object.entries(templateInfo)) {
    for (const card of root.querySelectorAll(`[data-testid="template-workflow-${name}"]`)) {
      const labelled = card.querySelectorAll("[title]");
      const [titleEl, descEl] = [labelled[0], labelled[1]];
      if (titleEl && titleEl.textContent !== info.title) {
        titleEl.textContent = info.title;
        titleEl.title = info.title;
      }
      if (descEl && descEl.textContent !== info.description) {
        descEl.textContent = info.description;
        descEl.title = info.description;
      }
      const img = card.querySelector("img");
      if (img && img.alt !== info.title) img.alt = info.title;
    }
  }
}

// ---- preset lists: a preset written by Calibrate / Save Preset appears in every Load Preset list at once -------
const PRESET_WRITERS = new Set(["QSchedCalibrate", "QSchedSavePreset"]);

async function refreshPresetLists() {
  try {
    const res = await api.fetchApi("/object_info/QSchedLoadPreset");
    const spec = (await res.json())?.QSchedLoadPreset?.input?.required?.preset;
    const values = Array.isArray(spec?.[0]) ? spec[0] : spec?.[1]?.options;
    if (!Array.isArray(values)) return;
    // new nodes get the new list too: the frontend builds a node's widgets from its definition's `inputs` (the
    // frontend's own form, 1.x) and older frontends from `input.required` (the server's form); both are updated
    const def = window.LiteGraph?.registered_node_types?.QSchedLoadPreset?.nodeData;
    if (def?.input?.required?.preset) def.input.required.preset[0] = values;
    if (def?.inputs?.preset && Array.isArray(def.inputs.preset.options)) def.inputs.preset.options = values;
    for (const node of app.graph?._nodes ?? []) {
      if (node.type !== "QSchedLoadPreset") continue;
      const w = node.widgets?.find((x) => x.name === "preset");
      if (w) w.options.values = values;
    }
  } catch (err) {
    console.warn("qsched: could not refresh the preset lists", err);
  }
}

app.registerExtension({
  name: "qsched.results",
  async setup() {
    await loadTemplateInfo();
    decorateTemplateCards(document);
    new MutationObserver(() => decorateTemplateCards(document)).observe(document.body,
      { childList: true, subtree: true });

    const queuePrompt = api.queuePrompt.bind(api);
    api.queuePrompt = async function (...args) {
      for (const node of app.graph?._nodes ?? []) if (isOurs(node)) clearError(node);
      try {
        const res = await queuePrompt(...args);
        showNodeErrors(res?.node_errors);
        return res;
      } catch (err) {
        showNodeErrors(err?.response?.node_errors);
        throw err;
      }
    };
    // A node that starts running loses the previous run's text at once (a long calibration would otherwise show
    // the last run's summary above its new progress).
    api.addEventListener("executing", ({ detail }) => {
      const node = detail == null ? null : nodeById(detail);
      if (node && isOurs(node)) remove(node);
    });
    api.addEventListener("execution_error", ({ detail }) => {
      const node = nodeById(detail?.node_id);
      if (node && isOurs(node)) show(node, "⚠ " + (detail.exception_message ?? "").trim(), true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("QSched")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) show(this, Array.isArray(text) ? text.join("\n") : String(text), false);
      if (PRESET_WRITERS.has(nodeData.name)) refreshPresetLists();
    };
  },
});
