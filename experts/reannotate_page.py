"""The re-annotation page: one HTML document with plain JavaScript, no build step.

Titles, questions and model names come from eval files and probe output: untrusted text
that the script only ever puts in the page through ``textContent``, never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vkr re-annotation</title>
<style>
  :root { --line: #d0d5dd; --bad: #b42318; --done: #dcfae6; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #101828; background: #f9fafb; }
  header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  .muted { color: #667085; }
  main { display: grid; grid-template-columns: 9rem 1fr 24rem; gap: 1rem; padding: 1rem; }
  nav { display: flex; flex-wrap: wrap; gap: .25rem; align-content: flex-start; }
  nav button { width: 2.6rem; padding: .2rem 0; border: 1px solid var(--line); background: #fff;
               border-radius: 4px; cursor: pointer; font-size: 12px; }
  nav button.current { outline: 2px solid #1570ef; }
  nav button.done { background: var(--done); }
  section, aside { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
  aside { position: sticky; top: 4rem; align-self: start; display: grid; gap: .5rem; }
  h2 { font-size: 15px; margin: 1rem 0 .4rem; }
  .filtered { border-left: 4px solid var(--bad); padding: .4rem .6rem; background: #fef3f2; }
  .text { white-space: pre-wrap; word-break: break-word; }
  .frames { display: flex; flex-wrap: wrap; gap: .5rem; }
  figure { margin: 0; text-align: center; cursor: pointer; border: 2px solid transparent; border-radius: 4px; }
  figure.grounding { border-color: #1570ef; background: #eff8ff; }
  figure img { height: 96px; display: block; }
  figcaption { font: 12px ui-monospace, monospace; }
  textarea, input, select { width: 100%; font: inherit; padding: .25rem .4rem; }
  textarea { min-height: 4rem; }
  #status { min-height: 1.4rem; }
  #status.error { color: var(--bad); }
  kbd { font: 11px ui-monospace, monospace; border: 1px solid #98a2b3; border-radius: 3px; padding: 0 .25rem; }
  input#annotator { width: 10rem; }
</style>
</head>
<body>
<header>
  <strong>vkr re-annotation</strong>
  <label>Annotator <input id="annotator" autocomplete="off" placeholder="your name"></label>
  <span id="progress" class="muted"></span>
</header>
<main>
  <nav id="item-list" aria-label="filtered questions"></nav>
  <section>
    <div>
      <button id="prev" title="previous (k)">◀ <kbd>k</kbd></button>
      <strong id="item-title"></strong>
      <button id="next" title="next (j)"><kbd>j</kbd> ▶</button>
    </div>
    <h2>Original question (filtered)</h2>
    <div class="filtered">
      <div id="why" class="muted"></div>
      <div id="orig-question" class="text"></div>
      <ol id="orig-options" type="A"></ol>
      <div id="orig-answer" class="muted"></div>
    </div>
    <h2>Frames <span class="muted">(click the frames that ground your answer)</span></h2>
    <div class="frames" id="frames"></div>
  </section>
  <aside>
    <label>New question <textarea id="question"></textarea></label>
    <label>Type <select id="problem-type">
      <option value="multiple-choice">multiple-choice</option>
      <option value="open-ended">open-ended</option></select></label>
    <label>Options, one per line (multiple-choice) <textarea id="options"></textarea></label>
    <label>Answer (option letter, or the open answer) <input id="answer" autocomplete="off"></label>
    <div>Grounding: <span id="grounding" class="muted"></span></div>
    <button id="save"><kbd>Ctrl</kbd>+<kbd>Enter</kbd> save</button>
    <div id="status" role="status"></div>
    <div id="others" class="muted"></div>
    <details><summary>Keyboard</summary>
      <p><kbd>j</kbd> next · <kbd>k</kbd> previous · <kbd>q</kbd> question ·
      <kbd>Ctrl</kbd>+<kbd>Enter</kbd> save · <kbd>Esc</kbd> leave a box ·
      <kbd>Tab</kbd> to a frame, <kbd>Space</kbd> picks it</p></details>
  </aside>
</main>
<script>
"use strict";
const state = {items: [], idx: 0, annotator: "", mine: {}, others: {}, grounding: new Set()};
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function status(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }
function clock(t) { const s = Math.floor(t); return String(Math.floor(s / 60)).padStart(2, "0") + ":" + String(s % 60).padStart(2, "0"); }
function item() { return state.items[state.idx]; }
function sid(it) { return String(it.source.id); }

function renderList() {
  const done = state.items.filter((it) => state.mine[sid(it)]).length;
  $("progress").textContent = `${done} / ${state.items.length} re-annotated`;
  $("item-list").replaceChildren(...state.items.map((it, i) => el("button", {
    class: (state.mine[sid(it)] ? "done" : "") + (i === state.idx ? " current" : ""),
    title: sid(it), "data-item": sid(it), onclick: () => go(i)}, i + 1)));
}

function renderGrounding() {
  for (const fig of document.querySelectorAll("#frames figure")) {
    const on = state.grounding.has(Number(fig.dataset.t));
    fig.classList.toggle("grounding", on);
    fig.setAttribute("aria-checked", String(on));
  }
  const stamps = [...state.grounding].sort((a, b) => a - b);
  $("grounding").textContent = stamps.length ? stamps.map(clock).join(", ") : "none yet";
}

function renderItem() {
  const it = item();
  if (!it) { $("item-title").textContent = "no filtered questions"; return; }
  const src = it.source;
  $("item-title").textContent = `${state.idx + 1} of ${state.items.length} · ${sid(it)} · ${src.video_path}`;
  const solving = src.solving_frames || {};
  $("why").textContent = "Filtered: answered from a single frame by " +
    ((src.solved_by || []).map((m) => `${m} (frames at ${(solving[m] || []).map(clock).join(", ")})`).join("; ") || "a probe model");
  $("orig-question").textContent = src.question;
  $("orig-options").replaceChildren(...(src.options || []).map((o) => el("li", {}, o)));
  $("orig-answer").textContent = "answer: " + src.solution;
  // Frames are checkboxes for the keyboard too: Tab to one, Space or Enter picks it.
  $("frames").replaceChildren(...it.frames.map((f) => el("figure", {"data-t": f.t, tabindex: "0", role: "checkbox",
    "aria-checked": "false", onclick: () => toggle(f.t),
    onkeydown: (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); toggle(f.t); } }},
    el("img", {src: f.url, alt: `frame at ${clock(f.t)}`, loading: "lazy"}), el("figcaption", {}, clock(f.t)))));
  const mine = state.mine[sid(it)];
  $("question").value = mine ? mine.question : "";
  $("problem-type").value = mine ? mine.problem_type : (src.options ? "multiple-choice" : "open-ended");
  $("options").value = mine && mine.options ? mine.options.join("\n") : "";
  $("answer").value = mine ? mine.answer : "";
  state.grounding = new Set(mine ? mine.grounding : []);
  renderGrounding();
  if (mine) status("saved" + (mine.changes ? ` (revised ${mine.changes}×, history kept)` : ""));
  else status(state.annotator ? "not written yet" : "enter your name to start", !state.annotator);
  const others = state.others[sid(it)] || [];
  $("others").textContent = others.length ? `also written by: ${others.join(", ")}` : "";
}

function render() { renderList(); renderItem(); }
function go(i) { if (i >= 0 && i < state.items.length) { state.idx = i; render(); } }
function toggle(t) { if (state.grounding.has(t)) state.grounding.delete(t); else state.grounding.add(t); renderGrounding(); }

async function save() {
  if (!state.annotator) { status("enter your name first", true); $("annotator").focus(); return; }
  const it = item();
  try {
    const saved = await api("/api/items", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({source_id: sid(it), annotator: state.annotator, question: $("question").value,
        problem_type: $("problem-type").value, options: $("options").value.split("\n"),
        answer: $("answer").value, grounding: [...state.grounding]})});
    state.mine[saved.source_id] = saved;
    renderList();
    if (sid(item()) === saved.source_id) status("saved" + (saved.changes ? ` (revised ${saved.changes}×, history kept)` : ""));
  } catch (e) { status("not saved: " + e.message, true); }
}

async function setAnnotator(name) {
  state.annotator = name.trim();
  $("annotator").value = state.annotator;
  if (!state.annotator) { state.mine = {}; render(); return; }
  localStorage.setItem("vkr-annotator", state.annotator);
  const url = new URL(location.href); url.searchParams.set("annotator", state.annotator);
  history.replaceState(null, "", url);
  try {
    const data = await api("/api/items?annotator=" + encodeURIComponent(state.annotator));
    state.mine = data.items; state.others = data.others;
    const first = state.items.findIndex((it) => !state.mine[sid(it)]);
    state.idx = first === -1 ? 0 : first;  // resume at the first question not yet re-annotated
    render();
  } catch (e) { status(e.message, true); }
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); save(); return; }
  const target = event.target;
  if (["TEXTAREA", "INPUT", "SELECT"].includes(target.tagName)) {
    if (event.key === "Escape" || (event.key === "Enter" && target.id === "annotator")) target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || !state.items.length) return;
  if (event.key === "j") go(state.idx + 1);
  else if (event.key === "k") go(state.idx - 1);
  else if (event.key === "q") $("question").focus();
  else return;
  event.preventDefault();
});

async function init() {
  const data = await api("/api/filtered");
  state.items = data.items;
  $("prev").addEventListener("click", () => go(state.idx - 1));
  $("next").addEventListener("click", () => go(state.idx + 1));
  $("save").addEventListener("click", save);
  $("annotator").addEventListener("change", (e) => setAnnotator(e.target.value));
  const name = new URL(location.href).searchParams.get("annotator") || data.default_annotator ||
    localStorage.getItem("vkr-annotator") || "";
  render();
  if (name) await setAnnotator(name); else $("annotator").focus();
  document.body.dataset.ready = "1";
}
init().catch((e) => status("could not load the probe output: " + e.message, true));
</script>
</body>
</html>
"""
