"""The re-annotation page: one HTML document with plain JavaScript, no build step.

One new question per filtered question, shared by all annotators: the page shows its status
(not written, pending review, approved) and history, a second annotator approves it or
corrects it, and "needs my review" lists what this annotator may approve.

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
  :root { --line: #d0d5dd; --bad: #b42318; --done: #dcfae6; --pending: #fef0c7; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #101828; background: #f9fafb; }
  header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  .muted { color: #667085; }
  main { display: grid; grid-template-columns: 9rem 1fr 24rem; gap: 1rem; padding: 1rem; }
  #item-list { display: flex; flex-wrap: wrap; gap: .25rem; align-content: flex-start; }
  nav button { width: 2.6rem; padding: .2rem 0; border: 1px solid var(--line); background: #fff;
               border-radius: 4px; cursor: pointer; font-size: 12px; }
  nav button.current { outline: 2px solid #1570ef; }
  nav button.pending { background: var(--pending); }
  nav button.approved { background: var(--done); }
  nav select { width: 100%; margin-bottom: .4rem; }
  #review-status.pending { color: #b54708; } #review-status.approved { color: #1a7f37; }
  #history { margin: 0; padding-left: 1.2rem; font-size: 12px; }
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
  <nav aria-label="filtered questions">
    <label>Show <select id="filter">
      <option value="all">all questions</option>
      <option value="todo">not written yet</option>
      <option value="review">needs my review</option>
      <option value="approved">approved</option></select></label>
    <div id="item-list"></div>
  </nav>
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
    <button id="approve" hidden><kbd>a</kbd> approve as it is</button>
    <div id="status" role="status"></div>
    <div id="review-status"></div>
    <ol id="history" aria-label="history"></ol>
    <details><summary>Keyboard</summary>
      <p><kbd>j</kbd> next · <kbd>k</kbd> previous · <kbd>q</kbd> question ·
      <kbd>Ctrl</kbd>+<kbd>Enter</kbd> save · <kbd>a</kbd> approve · <kbd>Esc</kbd> leave a box ·
      <kbd>Tab</kbd> to a frame, <kbd>Space</kbd> picks it</p>
      <p>One new question per filtered question: the first to save writes it; a second
      annotator approves it as it is, or corrects it (a revision, which still needs an
      approval). Every version is kept.</p></details>
  </aside>
</main>
<script>
"use strict";
const state = {items: [], idx: 0, annotator: "", docs: {}, filter: "all", grounding: new Set()};
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
function doc(it) { return it ? state.docs[sid(it)] : undefined; }
// A second annotator may approve: anyone but the author, while it waits for review.
function canApprove(d) { return !!(d && state.annotator && d.status === "pending" && d.author !== state.annotator); }
function shown(it) {
  const d = doc(it);
  if (state.filter === "todo") return !d;
  if (state.filter === "review") return canApprove(d);
  if (state.filter === "approved") return !!d && d.status === "approved";
  return true;
}
function visible() { return state.items.map((it, i) => i).filter((i) => shown(state.items[i])); }

function renderList() {
  const docs = Object.values(state.docs);
  const approved = docs.filter((d) => d.status === "approved").length;
  $("progress").textContent = `${docs.length} / ${state.items.length} written · ${approved} approved · ` +
    `${docs.length - approved} pending review`;
  $("item-list").replaceChildren(...visible().map((i) => {
    const it = state.items[i], d = doc(it);
    return el("button", {class: (d ? d.status : "") + (i === state.idx ? " current" : ""),
      title: sid(it) + (d ? ` (${d.status})` : ""), "data-item": sid(it), onclick: () => go(i)}, i + 1);
  }));
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

function renderReview() {
  const d = doc(item());
  const review = $("review-status");
  if (!d) { review.textContent = "not written yet"; review.className = ""; }
  else if (d.status === "approved") {
    review.textContent = `approved by ${d.reviewer} · written by ${d.author}` + (d.revised ? " · revised by a second annotator" : "");
    review.className = "approved";
  } else {
    review.textContent = `pending review · written by ${d.author}` + (d.revised ? " · revised" : "");
    review.className = "pending";
  }
  $("history").replaceChildren(...(d ? d.history : []).map((h) =>
    el("li", {}, `${h.action} by ${h.annotator} · ${h.at.replace("T", " ").slice(0, 19)}` + (h.via !== "web" ? ` (${h.via})` : ""),
      el("details", {}, el("summary", {}, "text"), el("div", {class: "text"}, `${h.question}\nanswer: ${h.answer}`)))));
  $("approve").hidden = !canApprove(d);
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
  // Frames are checkboxes for the keyboard too: Tab to one, Space or Enter picks it (Ctrl+Enter
  // on a frame saves, as everywhere).
  $("frames").replaceChildren(...it.frames.map((f) => el("figure", {"data-t": f.t, tabindex: "0", role: "checkbox",
    "aria-checked": "false", onclick: () => toggle(f.t),
    onkeydown: (e) => { if ((e.key === " " || e.key === "Enter") && !e.ctrlKey && !e.metaKey) { e.preventDefault(); toggle(f.t); } }},
    el("img", {src: f.url, alt: `frame at ${clock(f.t)}`, loading: "lazy"}), el("figcaption", {}, clock(f.t)))));
  const d = doc(it);
  $("question").value = d ? d.question : "";
  $("problem-type").value = d ? d.problem_type : (src.options ? "multiple-choice" : "open-ended");
  $("options").value = d && d.options ? d.options.join("\n") : "";
  $("answer").value = d ? d.answer : "";
  state.grounding = new Set(d ? d.grounding : []);
  renderGrounding();
  renderReview();
  if (!state.annotator) status("enter your name to start", true);
  else if (canApprove(d)) status("written by " + d.author + ": approve it as it is, or correct it and save (a revision)");
  else status(d ? "" : "not written yet");
}

function render() { renderList(); renderItem(); }
function go(i) { if (i >= 0 && i < state.items.length) { state.idx = i; render(); } }
// j/k walk the questions the filter shows.
function step(delta) {
  const list = visible();
  const at = list.indexOf(state.idx);
  const next = at === -1 ? list.find((i) => (delta > 0 ? i > state.idx : i < state.idx)) : list[at + delta];
  if (next !== undefined) go(next);
}
function toggle(t) { if (state.grounding.has(t)) state.grounding.delete(t); else state.grounding.add(t); renderGrounding(); }

const SAID = {written: "saved: written", edited: "saved: edited, history kept",
  revised: "saved: revised, history kept (it waits for an approval)", approved: "approved",
  unchanged: "unchanged: nothing to save"};

async function post(body) {
  if (!state.annotator) { status("enter your name first", true); $("annotator").focus(); return; }
  const it = item();
  const shown = doc(it);
  try {
    // based_on: the version this page shows; the server refuses if another was saved since.
    const saved = await api("/api/items", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({source_id: sid(it), annotator: state.annotator,
        based_on: shown ? shown.updated_at : "", ...body})});
    const {change, ...d} = saved;
    state.docs[d.source_id] = d;
    renderList();
    if (sid(item()) === d.source_id) { renderReview(); status(SAID[change] || change); }
  } catch (e) {
    if (e.message.includes("was saved since you opened it")) {
      // Show the new version: its history, and its text too for an approval (typed text is kept).
      await load().catch(() => {});
      renderList();
      if (body.approve) renderItem(); else renderReview();
    }
    status("not saved: " + e.message, true);
  }
}

function save() {
  return post({question: $("question").value, problem_type: $("problem-type").value,
    options: $("options").value.split("\n"), answer: $("answer").value, grounding: [...state.grounding]});
}
function approve() { if (canApprove(doc(item()))) return post({approve: true}); }

function firstToDo() {
  // Resume where there is work: the first shown question this annotator can act on.
  const list = visible();
  const todo = list.find((i) => { const d = doc(state.items[i]); return !d || canApprove(d); });
  return todo !== undefined ? todo : (list.length ? list[0] : 0);
}

async function load() {
  const data = await api("/api/items");
  state.docs = data.items;
}

async function setAnnotator(name) {
  state.annotator = name.trim();
  $("annotator").value = state.annotator;
  if (!state.annotator) { render(); return; }
  localStorage.setItem("vkr-annotator", state.annotator);
  const url = new URL(location.href); url.searchParams.set("annotator", state.annotator);
  history.replaceState(null, "", url);
  try {
    await load();
    state.idx = firstToDo();
    render();
  } catch (e) { status(e.message, true); }
}

function setFilter(value) {
  state.filter = value;
  $("filter").value = value;
  const url = new URL(location.href); url.searchParams.set("show", value);
  history.replaceState(null, "", url);
  localStorage.setItem("vkr-reannotate-show", value);
  if (!shown(item())) state.idx = firstToDo();
  render();
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); save(); return; }
  const target = event.target;
  if (["TEXTAREA", "INPUT", "SELECT"].includes(target.tagName)) {
    if (event.key === "Escape" || (event.key === "Enter" && target.id === "annotator")) target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || !state.items.length) return;
  if (event.key === "j") step(1);
  else if (event.key === "k") step(-1);
  else if (event.key === "q") $("question").focus();
  else if (event.key === "a") approve();
  else return;
  event.preventDefault();
});

async function init() {
  const data = await api("/api/filtered");
  state.items = data.items;
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("save").addEventListener("click", save);
  $("approve").addEventListener("click", approve);
  $("annotator").addEventListener("change", (e) => setAnnotator(e.target.value));
  $("filter").addEventListener("change", (e) => setFilter(e.target.value));
  const params = new URL(location.href).searchParams;
  const name = params.get("annotator") || data.default_annotator ||
    localStorage.getItem("vkr-annotator") || "";
  const show = params.get("show") || localStorage.getItem("vkr-reannotate-show") || "all";
  state.filter = ["all", "todo", "review", "approved"].includes(show) ? show : "all";
  $("filter").value = state.filter;
  await load();
  render();
  if (name) await setAnnotator(name); else $("annotator").focus();
  document.body.dataset.ready = "1";
}
init().catch((e) => status("could not load the probe output: " + e.message, true));
</script>
</body>
</html>
"""
