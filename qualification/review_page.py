"""The review page: one HTML document with plain JavaScript, no build step.

Model outputs and prompts are untrusted text: the script only ever puts them in the page
through ``textContent``, never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vkr pilot review</title>
<style>
  :root { --ok: #1a7f37; --hard: #b42318; --soft: #b54708; --auto: #6941c6; --line: #d0d5dd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #101828; background: #f9fafb; }
  header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1rem;
           background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  header .pilot { font-weight: 600; }
  header .muted, .muted { color: #667085; font-weight: normal; }
  main { display: grid; grid-template-columns: 9rem 1fr 20rem; gap: 1rem; padding: 1rem; }
  nav { display: flex; flex-wrap: wrap; gap: .25rem; align-content: flex-start; }
  nav button { width: 2.6rem; padding: .2rem 0; border: 1px solid var(--line); background: #fff;
               border-radius: 4px; cursor: pointer; font-size: 12px; }
  nav button.current { outline: 2px solid #1570ef; }
  nav button.ok { background: #dcfae6; } nav button.hard { background: #fee4e2; }
  nav button.soft { background: #fef0c7; } nav button.auto { background: #ebe9fe; }
  section, aside { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
  aside { position: sticky; top: 4rem; align-self: start; }
  h2 { font-size: 15px; margin: 1rem 0 .4rem; }
  h2:first-child { margin-top: 0; }
  .item-head { display: flex; gap: 1rem; align-items: center; }
  .frames { display: flex; flex-wrap: wrap; gap: .5rem; }
  .frames[hidden] { display: none; }
  figure { margin: 0; text-align: center; }
  figure img { height: 96px; border: 1px solid var(--line); border-radius: 4px; cursor: zoom-in; }
  figure.big img { height: auto; max-width: 100%; width: 720px; cursor: zoom-out; }
  figcaption { font: 12px ui-monospace, monospace; color: #344054; }
  pre, .text { white-space: pre-wrap; word-break: break-word; font: 13px/1.4 ui-monospace, monospace;
               background: #f2f4f7; padding: .5rem; border-radius: 4px; margin: .25rem 0; }
  dl.fields { display: grid; grid-template-columns: max-content 1fr; gap: .3rem .8rem; margin: 0; }
  dl.fields dt { font-weight: 600; color: #344054; }
  dl.fields dd { margin: 0; white-space: pre-wrap; word-break: break-word; }
  table { border-collapse: collapse; width: 100%; }
  td, th { border: 1px solid var(--line); padding: .2rem .4rem; text-align: left; vertical-align: top; }
  .buttons { display: grid; gap: .4rem; }
  .buttons button, .cats button { padding: .5rem; border-radius: 6px; border: 1px solid var(--line);
                                   background: #fff; cursor: pointer; text-align: left; font-size: 14px; }
  .buttons button.selected[data-label=ok] { background: var(--ok); color: #fff; }
  .buttons button.selected[data-label=hard] { background: var(--hard); color: #fff; }
  .buttons button.selected[data-label=soft] { background: var(--soft); color: #fff; }
  .cats { display: grid; grid-template-columns: 1fr 1fr; gap: .3rem; margin-top: .6rem; }
  .cats button { padding: .3rem .4rem; font-size: 13px; }
  .cats button.selected { background: #1570ef; color: #fff; }
  .cats button.pending { outline: 2px dashed #1570ef; }
  kbd { font: 11px ui-monospace, monospace; border: 1px solid #98a2b3; border-radius: 3px; padding: 0 .25rem; }
  textarea { width: 100%; min-height: 4.5rem; margin-top: .6rem; font: inherit; }
  #status { min-height: 1.4rem; margin-top: .5rem; }
  #status.error { color: var(--hard); }
  .banner { background: #ebe9fe; border: 1px solid var(--auto); border-radius: 6px; padding: .5rem; margin-bottom: .6rem; }
  .role { font: 12px ui-monospace, monospace; color: #667085; text-transform: uppercase; }
  input#annotator { padding: .25rem .4rem; width: 10rem; }
  .ask { color: var(--hard); }
</style>
</head>
<body>
<header>
  <div class="pilot" id="pilot-info">loading…</div>
  <label>Annotator <input id="annotator" autocomplete="off" placeholder="your name"></label>
  <span id="progress" class="muted"></span>
</header>
<main>
  <nav id="item-list" aria-label="items"></nav>
  <section id="item" aria-live="polite">
    <div class="item-head">
      <button id="prev" title="previous item (k)">◀ <kbd>k</kbd></button>
      <strong id="item-title"></strong>
      <button id="next" title="next item (j)"><kbd>j</kbd> ▶</button>
    </div>
    <h2 id="frames-head">Frames the model saw</h2>
    <div class="frames" id="frames"></div>
    <h2>What the model was asked</h2>
    <div id="seen"></div>
    <h2>Model output</h2>
    <div id="output"></div>
  </section>
  <aside id="controls">
    <div id="auto-banner"></div>
    <div class="buttons">
      <button id="label-ok" data-label="ok"><kbd>1</kbd> ok</button>
      <button id="label-hard" data-label="hard"><kbd>2</kbd> hard failure (compliance)</button>
      <button id="label-soft" data-label="soft"><kbd>3</kbd> soft failure (content)</button>
    </div>
    <div class="cats" id="categories"></div>
    <textarea id="note" placeholder="note (n to focus, Esc to leave; saved when you leave the box)"></textarea>
    <div id="status" role="status"></div>
    <div id="others" class="muted"></div>
    <details><summary>Keyboard</summary>
      <p><kbd>1</kbd> ok · <kbd>2</kbd> hard failure · <kbd>3</kbd> soft failure<br>
      <kbd>h</kbd> hallucination · <kbd>u</kbd> unsupported step · <kbd>w</kbd> wrong answer ·
      <kbd>f</kbd> format · <kbd>o</kbd> other<br>
      <kbd>j</kbd> next · <kbd>k</kbd> previous · <kbd>n</kbd> note</p>
    </details>
  </aside>
</main>
<script>
"use strict";
const KEYS = {h: "hallucination", u: "unsupported step", w: "wrong answer", f: "format", o: "other"};
const LABEL_KEYS = {"1": "ok", "2": "hard", "3": "soft"};
const NAMES = {ok: "ok", hard: "hard failure", soft: "soft failure"};
const state = {items: [], idx: 0, annotator: "", labels: {}, others: {}, pending: null, categories: []};
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function status(text, isError) {
  const node = $("status");
  node.textContent = text;
  node.className = isError ? "error" : "";
}

function item() { return state.items[state.idx]; }

function firstUnlabelled() {
  const i = state.items.findIndex((it) => !state.labels[it.item_id] && !it.auto_label);
  return i === -1 ? 0 : i;
}

function renderValue(value) {
  if (value === null || value === undefined || value === "") return el("span", {class: "muted"}, "—");
  if (typeof value === "boolean") return document.createTextNode(value ? "yes" : "no");
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const cols = [...new Set(value.flatMap((v) => Object.keys(v)))];
      return el("table", {}, el("tr", {}, el("th", {}, "#"), ...cols.map((c) => el("th", {}, c))),
        ...value.map((row, i) => el("tr", {}, el("td", {}, i + 1),
          ...cols.map((c) => el("td", {}, renderValue(row[c]))))));
    }
    return el("ol", {}, ...value.map((v) => el("li", {}, renderValue(v))));
  }
  if (typeof value === "object") return renderFields(value);
  return document.createTextNode(String(value));
}

function renderFields(obj) {
  const dl = el("dl", {class: "fields"});
  for (const [k, v] of Object.entries(obj)) dl.append(el("dt", {}, k.replace(/_/g, " ")), el("dd", {}, renderValue(v)));
  return dl;
}

function renderItem() {
  const it = item();
  if (!it) return;
  // A text step's item (a lecture, a candidate) has no video: its own id names it.
  const source = it.video_id ? `video ${it.video_id}` : `item ${it.source_item_id}`;
  $("item-title").textContent = `Item ${state.idx + 1} of ${state.items.length} · ${it.item_id} · ${source}` +
    (it.skill ? ` · ${it.skill}` : "") + ` · ${it.discipline}` + (it.subject ? ` / ${it.subject}` : "");
  $("frames-head").hidden = $("frames").hidden = !it.frames.length;
  $("frames").replaceChildren(...it.frames.map((f) => {
    const fig = el("figure", {class: "frame"}, el("img", {src: f.url, alt: `frame at ${f.clock || "?"}`, loading: "lazy"}),
      el("figcaption", {}, f.clock || "??:??"));
    fig.addEventListener("click", () => fig.classList.toggle("big"));
    return fig;
  }));
  const seen = [];
  if (it.context.length) seen.push(el("div", {class: "text context"}, it.context.join("\n")));
  if (it.question) seen.push(el("div", {class: "text question"}, it.question));
  if (it.seeds.length) seen.push(el("details", {class: "seeds"}, el("summary", {}, `Seed examples shown (${it.seeds.length})`),
    ...it.seeds.map((s) => el("div", {class: "text"}, s))));
  const full = el("details", {class: "prompt"}, el("summary", {}, "Full prompt"));
  for (const m of it.messages) {
    full.append(el("div", {class: "role"}, m.role));
    for (const p of m.parts) full.append(p.frame ? el("div", {class: "muted"}, `[frame ${p.clock || ""}]`) : el("div", {class: "text"}, p.text));
  }
  seen.push(full);
  $("seen").replaceChildren(...seen);
  const out = [];
  if (it.parsed) out.push(renderFields(it.parsed));
  else {
    out.push(el("p", {class: "ask"}, `${it.outcome}: ${it.error || "no reply"}`));
    out.push(el("pre", {class: "raw"}, it.output || ""));
  }
  if (it.parsed) out.push(el("details", {}, el("summary", {}, "Raw reply"), el("pre", {}, it.output || "")));
  $("output").replaceChildren(...out);
  renderControls();
}

function renderControls() {
  const it = item();
  const mine = state.labels[it.item_id];
  $("auto-banner").replaceChildren(...(it.auto_label ? [el("div", {class: "banner"},
    el("strong", {}, "Pre-labelled: hard failure (format)"), el("br"), it.auto_label.note,
    el("br"), el("span", {class: "muted"}, "Found by vkr: it counts as a hard failure, you need not label it."))] : []));
  for (const b of document.querySelectorAll(".buttons button")) b.classList.toggle("selected", !!mine && mine.label === b.dataset.label);
  const category = mine && mine.label !== "ok" ? mine.category : null;
  for (const b of document.querySelectorAll(".cats button")) {
    b.classList.toggle("selected", b.dataset.category === category);
    b.classList.toggle("pending", b.dataset.category === state.pending);
  }
  $("note").value = mine ? mine.note : "";
  const others = state.others[it.item_id] || 0;
  $("others").textContent = others ? `${others} other annotator(s) labelled this item` : "";
  if (mine) status(`saved: ${NAMES[mine.label]}${mine.category ? " / " + mine.category : ""}` +
    (mine.changes ? ` (changed ${mine.changes}×, history kept)` : ""));
  else status(state.annotator ? "not labelled yet" : "enter your name to start", !state.annotator);
}

function renderList() {
  const done = state.items.filter((it) => state.labels[it.item_id] || it.auto_label).length;
  $("progress").textContent = `${done} / ${state.items.length} labelled`;
  $("item-list").replaceChildren(...state.items.map((it, i) => {
    const mine = state.labels[it.item_id];
    const cls = (mine ? mine.label : it.auto_label ? "auto" : "") + (i === state.idx ? " current" : "");
    return el("button", {class: cls, title: it.item_id, "data-item": it.item_id, onclick: () => go(i)}, i + 1);
  }));
}

function render() { renderList(); renderItem(); }

function go(i) {
  if (i < 0 || i >= state.items.length) return;
  state.idx = i; state.pending = null; render();
}

// One save at a time, in order: a note saved on blur must not land after the label click
// that caused the blur, or the older label would become the current one.
let saving = Promise.resolve();
function save(label, category, note) {
  const it = item();
  saving = saving.then(() => saveNow(it, label, category, note));
  return saving;
}

async function saveNow(it, label, category, note) {
  if (!state.annotator) { status("enter your name first", true); $("annotator").focus(); return; }
  try {
    const saved = await api("/api/labels", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({item_id: it.item_id, annotator: state.annotator, label, category, note})});
    state.labels[saved.item_id] = saved;
    state.pending = null;
    if (item().item_id === saved.item_id) renderControls();
    renderList();
    if (label !== "ok" && !category) status(`saved: ${NAMES[label]}, now choose a category (h/u/w/f/o)`);
  } catch (e) { status("not saved: " + e.message, true); }
}

function setLabel(label) {
  const mine = state.labels[item().item_id];
  let category = null;
  if (label !== "ok") category = state.pending || (mine && mine.label !== "ok" ? mine.category : null);
  return save(label, category, $("note").value);
}

function setCategory(category) {
  const mine = state.labels[item().item_id];
  if (!mine || mine.label === "ok") {
    state.pending = category; renderControls();
    status(`category ${category}: now press 2 (hard) or 3 (soft) to save`);
    return;
  }
  return save(mine.label, category, $("note").value);
}

async function loadLabels() {
  const data = await api("/api/labels?annotator=" + encodeURIComponent(state.annotator));
  state.labels = data.labels; state.others = data.others;
  state.idx = firstUnlabelled(); state.pending = null;
  render();
}

async function setAnnotator(name) {
  state.annotator = name.trim();
  $("annotator").value = state.annotator;
  if (!state.annotator) { state.labels = {}; render(); return; }
  localStorage.setItem("vkr-annotator", state.annotator);
  const url = new URL(location.href); url.searchParams.set("annotator", state.annotator);
  history.replaceState(null, "", url);
  try { await loadLabels(); } catch (e) { status(e.message, true); }
}

document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target.tagName === "TEXTAREA" || target.tagName === "INPUT") {
    if (event.key === "Escape" || (event.key === "Enter" && target.tagName === "INPUT")) target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || !state.items.length) return;
  if (event.key === "j") go(state.idx + 1);
  else if (event.key === "k") go(state.idx - 1);
  else if (LABEL_KEYS[event.key]) setLabel(LABEL_KEYS[event.key]);
  else if (KEYS[event.key]) setCategory(KEYS[event.key]);
  else if (event.key === "n") { event.preventDefault(); $("note").focus(); }
  else return;
  event.preventDefault();
});

async function init() {
  const data = await api("/api/pilot");
  state.items = data.items; state.categories = data.categories;
  const p = data.pilot;
  $("pilot-info").replaceChildren(`${p.step} · ${p.model} `,
    el("span", {class: "muted"}, `pilot ${p.pilot_id} · prompt ${p.prompt_version} · n=${p.n}`));
  const letters = Object.fromEntries(Object.entries(KEYS).map(([k, v]) => [v, k]));
  $("categories").replaceChildren(...data.categories.map((c) => el("button", {"data-category": c,
    onclick: () => setCategory(c)}, el("kbd", {}, letters[c] || ""), " ", c)));
  for (const b of document.querySelectorAll(".buttons button")) b.addEventListener("click", () => setLabel(b.dataset.label));
  $("prev").addEventListener("click", () => go(state.idx - 1));
  $("next").addEventListener("click", () => go(state.idx + 1));
  $("annotator").addEventListener("change", (e) => setAnnotator(e.target.value));
  $("note").addEventListener("change", () => {
    const mine = state.labels[item().item_id];
    if (mine) save(mine.label, mine.label === "ok" ? null : mine.category, $("note").value);
  });
  const name = new URL(location.href).searchParams.get("annotator") || data.default_annotator ||
    localStorage.getItem("vkr-annotator") || "";
  render();
  if (name) await setAnnotator(name); else $("annotator").focus();
  document.body.dataset.ready = "1";
}
init().catch((e) => status("could not load the pilot: " + e.message, true));
</script>
</body>
</html>
"""
