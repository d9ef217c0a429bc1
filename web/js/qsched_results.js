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
const MAX_LINES = 8;  // longer text scrolls inside the box (the full error is also in ComfyUI's dialog)
const LINE_PX = 15;

function isOurs(node) {
  const t = node?.comfyClass ?? node?.type;
  return typeof t === "string" && t.startsWith("QSched");
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
  el.style.whiteSpace = "pre-wrap";
  el.style.overflowWrap = "anywhere";
  el.style.overflow = "auto";
  // Rows the text takes at the node's width (11px monospace is about 6.7px a character), at most MAX_LINES.
  const rows = () => {
    const cols = Math.max(20, Math.floor((node.size[0] - 30) / 6.7));
    return el.value.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / cols)), 0);
  };
  const height = () => 10 + LINE_PX * Math.min(MAX_LINES, Math.max(2, rows()));
  w = node.addDOMWidget(WIDGET, "qsched_result", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
    getMinHeight: height,
    getMaxHeight: height,
    serialize: false,
    hideOnZoom: false,
  });
  w.serialize = false;            // not in the workflow's widgets_values
  w.options.serialize = false;    // not in the prompt
  w.qschedEl = el;
  return w;
}

function show(node, text, isError) {
  if (!node || !isOurs(node)) return;
  const w = boxFor(node);
  w.value = text;
  w.qschedEl.value = text;
  w.qschedEl.dataset.qschedState = isError ? "error" : "result";
  w.qschedEl.style.color = isError ? "#ff7070" : "";
  // Grow or shrink to the text; keep the width the user gave the node.
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas(true, true);
}

function clear(node) {
  const w = node.widgets?.find((x) => x.name === WIDGET);
  if (w && w.qschedEl.dataset.qschedState === "error") show(node, "", false);
}

function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

function showNodeErrors(nodeErrors) {
  for (const [id, info] of Object.entries(nodeErrors ?? {})) {
    const node = nodeById(id);
    if (!node || !isOurs(node)) continue;
    const seen = new Set();
    for (const e of info.errors ?? []) {
      const text = (e.details || e.message || "").replace(/^[A-Za-z_]+ - (?=Q-Sched )/, "");
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

app.registerExtension({
  name: "qsched.results",
  async setup() {
    await loadTemplateInfo();
    decorateTemplateCards(document);
    new MutationObserver(() => decorateTemplateCards(document)).observe(document.body,
      { childList: true, subtree: true });

    const queuePrompt = api.queuePrompt.bind(api);
    api.queuePrompt = async function (...args) {
      for (const node of app.graph?._nodes ?? []) if (isOurs(node)) clear(node);
      try {
        const res = await queuePrompt(...args);
        showNodeErrors(res?.node_errors);
        return res;
      } catch (err) {
        showNodeErrors(err?.response?.node_errors);
        throw err;
      }
    };
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
    };
  },
});
