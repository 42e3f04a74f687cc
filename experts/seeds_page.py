"""The seed page: one HTML document with plain JavaScript, no build step.

Video titles and every seed's text are untrusted: the script only ever puts them in the
page through ``textContent``, never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vkr seed examples</title>
<style>
  :root { --line: #d0d5dd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #101828; background: #f9fafb; }
  header { display: flex; gap: 1rem; align-items: center; padding: .6rem 1rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  main { display: grid; grid-template-columns: 1fr 26rem; gap: 1rem; padding: 1rem; }
  section, aside { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
  .frames { display: flex; flex-wrap: wrap; gap: .5rem; }
  figure { margin: 0; text-align: center; cursor: pointer; }
  figure img { height: 96px; border: 1px solid var(--line); border-radius: 4px; }
  figcaption { font: 12px ui-monospace, monospace; }
  label { display: block; margin-top: .5rem; font-weight: 600; }
  textarea, input, select { width: 100%; font: inherit; }
  textarea { min-height: 4rem; }
  #status { min-height: 1.4rem; }
  #status.error { color: #b42318; font-weight: 600; }
  #problems { padding: .4rem 1rem; background: #fef3f2; border-bottom: 1px solid var(--line); }
  #problems ul { margin: .2rem 0; }
  li { margin-bottom: .6rem; }
  li .q { white-space: pre-wrap; word-break: break-word; }
  .pending { color: #b54708; } .approved { color: #1a7f37; }
  table { border-collapse: collapse; font-size: 12px; width: 100%; } td, th { border: 1px solid var(--line); padding: .2rem .4rem; }
  .muted { color: #667085; }
  .frames .error, .error { color: #b42318; font-weight: 600; }
  details.history { font-size: 12px; } details.history ol { margin: .2rem 0; padding-left: 1.2rem; }
</style>
</head>
<body>
<header>
  <strong>vkr seeds</strong>
  <span>annotator <input id="annotator" style="width:10rem" autocomplete="off"></span>
  <span>video <select id="video" style="width:20rem"></select></span>
  <span id="video-info" class="muted"></span>
  <span id="sampling" class="muted"></span>
</header>
<div id="problems" class="error" hidden></div>
<main>
<section>
  <h2>Frames <span class="muted">(click a frame to cite its time in the reasoning)</span></h2>
  <div id="frames" class="frames"></div>
  <h2 id="form-title">New seed</h2>
  <form id="form" onsubmit="return false">
    <label for="skill">Skill</label><select id="skill"></select>
    <label for="question">Question</label><textarea id="question"></textarea>
    <label for="options">Options <span class="muted">(one per line, "A. ..."; empty for an open question)</span></label>
    <textarea id="options"></textarea>
    <label for="answer">Answer <span class="muted">(the letter, or a short text)</span></label>
    <input id="answer" autocomplete="off">
    <label for="reasoning">Step-by-step reasoning, citing timestamps</label>
    <textarea id="reasoning" style="min-height:8rem"></textarea>
    <p><button id="save" type="button">Save (Ctrl+Enter)</button>
       <button id="new" type="button">New seed</button></p>
  </form>
  <div id="status" role="status"></div>
</section>
<aside>
  <h2>Seeds</h2>
  <ul id="seeds"></ul>
  <h2>Counts <span class="muted" id="target"></span></h2>
  <table id="counts"><thead><tr><th>discipline</th><th>skill</th><th>written</th>
    <th>approved</th><th>revised</th><th>missing</th></tr></thead><tbody></tbody></table>
</aside>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
let config = null, seeds = [], editing = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function annotator() { return $("annotator").value.trim(); }

async function api(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function showVideo() {
  const id = $("video").value;
  localStorage.setItem("vkr-seeds-video", id);
  const video = config.videos.find(v => v.video_id === id);
  $("video-info").textContent = video ? `${video.discipline} · ${video.title}` : "";
  $("frames").replaceChildren(el("span", "sampling frames…", "muted"));
  let data;
  try {
    data = await api("/api/frames?video=" + encodeURIComponent(id));
  } catch (err) {
    // This video only: the others can still be chosen and written on.
    if ($("video").value === id) $("frames").replaceChildren(el("p", err.message, "error"));
    status(err.message, true);
    return;
  }
  if ($("video").value !== id) return;  // another video was chosen meanwhile
  if ($("status").className === "error") status("");  // the last video's error is not this one's
  $("frames").replaceChildren(...data.frames.map(frame => {
    const figure = el("figure");
    const img = el("img"); img.src = frame.url; img.alt = "frame at " + frame.clock;
    figure.append(img, el("figcaption", frame.clock));
    figure.onclick = () => cite(frame.clock);
    return figure;
  }));
}

function cite(clock) {
  const box = $("reasoning"), at = box.selectionStart ?? box.value.length;
  box.value = box.value.slice(0, at) + clock + box.value.slice(at);
  box.focus();
  keepDraft();
}

// The form as typed, per annotator: a reload or a closed tab resumes mid-sentence.
const FIELDS = ["skill", "question", "options", "answer", "reasoning"];
function draftKey() { return "vkr-seeds-draft:" + annotator(); }
function keepDraft() {
  if (!annotator()) return;
  const draft = {editing, video: $("video").value};
  for (const id of FIELDS) draft[id] = $(id).value;
  localStorage.setItem(draftKey(), JSON.stringify(draft));
}
function restoreDraft() {
  const draft = JSON.parse(localStorage.getItem(draftKey()) || "null");
  if (!draft) return;
  editing = draft.editing;
  if (config.videos.some(v => v.video_id === draft.video)) $("video").value = draft.video;
  for (const id of FIELDS) if (typeof draft[id] === "string") $(id).value = draft[id];
  $("form-title").textContent = editing ? "Seed " + editing.slice(0, 8) : "New seed";
}

function clearForm() {
  editing = null;
  $("form-title").textContent = "New seed";
  for (const id of ["question", "options", "answer", "reasoning"]) $(id).value = "";
  keepDraft();
}

function sameSampling(a, b) { return a.fps === b.fps && a.max_frames === b.max_frames; }

function load(doc) {
  const seed = doc.body;
  editing = doc.doc_id;
  if (!sameSampling(seed.sampling, config.sampling))
    status(`this seed was written on frames at ${seed.sampling.fps} fps (at most ${seed.sampling.max_frames}); ` +
           `this page shows ${config.sampling.text}: a save records the frames shown here`);
  $("form-title").textContent = (doc.author === annotator() ? "Edit seed " : "Revise seed ") + doc.doc_id.slice(0, 8);
  $("video").value = seed.video_id;
  $("skill").value = seed.skill;
  $("question").value = seed.question;
  $("options").value = (seed.options || []).join("\n");
  $("answer").value = seed.answer;
  $("reasoning").value = seed.reasoning;
  keepDraft();
  showVideo();
}

async function save() {
  if (!annotator()) { status("enter your annotator name first", true); $("annotator").focus(); return; }
  const lines = $("options").value.split("\n").map(s => s.trim()).filter(Boolean);
  const body = {annotator: annotator(), seed_id: editing, video_id: $("video").value,
    skill: $("skill").value, question: $("question").value,
    options: lines.length ? lines : null, answer: $("answer").value, reasoning: $("reasoning").value};
  try {
    const seed = await api("/api/seeds", body);
    editing = seed.doc_id;
    keepDraft();
    // The list first: when "saved" shows, the list already holds the saved seed.
    await refresh();
    status(`saved: seed ${seed.doc_id.slice(0, 8)} (${seed.history.length} version${seed.history.length > 1 ? "s" : ""}, ${seed.status})`);
  } catch (err) { status(err.message, true); }
}

async function approve(seed) {
  if (!annotator()) { status("enter your annotator name first", true); return; }
  try {
    await api("/api/seeds", {annotator: annotator(), seed_id: seed.doc_id, approve: true});
    await refresh();
    status(`saved: seed ${seed.doc_id.slice(0, 8)} approved`);
  } catch (err) { status(err.message, true); }
}

async function refresh() {
  const data = await api("/api/seeds");
  seeds = data.seeds;
  const me = annotator();
  // Pending seeds of others first: they are what a second annotator is here for.
  const order = s => (s.status === "pending" && s.author !== me ? 0 : s.status === "pending" ? 1 : 2);
  const sorted = [...seeds].sort((a, b) => order(a) - order(b));
  $("seeds").replaceChildren(...sorted.map(seed => {
    const li = el("li");
    const body = seed.body;
    li.dataset.seed = seed.doc_id;
    li.append(el("div", body.question, "q"));
    const versions = seed.history.map(h => `${h.action} by ${h.annotator}`).join(", ");
    li.append(el("div", `${seed.status} · ${body.skill} · ${body.video_id} · ${versions}`, seed.status));
    if (!sameSampling(body.sampling, config.sampling))
      li.append(el("div", `frames at ${body.sampling.fps} fps, at most ${body.sampling.max_frames}`, "muted sampling"));
    // Every version, oldest first: what the author wrote stays readable after a revision.
    const history = el("details"); history.className = "history";
    history.append(el("summary", `history (${seed.history.length} version${seed.history.length > 1 ? "s" : ""})`));
    const list = el("ol");
    for (const h of seed.history) {
      const item = el("li", `${h.created_at.slice(0, 19).replace("T", " ")} · ${h.action} by ${h.annotator}` +
                            (h.source === "web" ? "" : ` (${h.source})`));
      const text = [h.body.question, ...(h.body.options || []), "Answer: " + h.body.answer, h.body.reasoning];
      item.append(el("div", text.join("\n"), "q"));
      list.append(item);
    }
    history.append(list);
    li.append(history);
    const edit = el("button", seed.author === me ? "edit" : "revise");
    edit.type = "button"; edit.className = "edit"; edit.onclick = () => load(seed);
    li.append(edit);
    if (seed.status === "pending" && me && seed.author !== me) {
      const ok = el("button", "approve"); ok.type = "button"; ok.className = "approve";
      ok.onclick = () => approve(seed);
      li.append(" ", ok);
    }
    return li;
  }));
  $("counts").tBodies[0].replaceChildren(...data.counts.map(row => {
    const tr = el("tr");
    for (const key of ["discipline", "skill", "written", "approved", "revised", "missing"])
      tr.append(el("td", String(row[key])));
    return tr;
  }));
}

async function start() {
  config = await api("/api/config");
  $("target").textContent = `(target ${config.target} approved per discipline and skill)`;
  $("sampling").textContent = "frames: " + config.sampling.text;
  if (config.problems.length) {
    const list = el("ul");
    for (const problem of config.problems) list.append(el("li", problem));
    $("problems").replaceChildren(el("span", `the manifest's lines left out (${config.problems.length}):`), list);
    $("problems").hidden = false;
  }
  for (const skill of config.skills) $("skill").append(el("option", skill));
  for (const video of config.videos) {
    const option = el("option", `${video.video_id} — ${video.title}`); option.value = video.video_id;
    $("video").append(option);
  }
  const query = new URLSearchParams(location.search).get("annotator");
  $("annotator").value = query || localStorage.getItem("vkr-seeds-annotator") || config.default_annotator || "";
  const last = localStorage.getItem("vkr-seeds-video");
  if (last && config.videos.some(v => v.video_id === last)) $("video").value = last;
  $("annotator").onchange = () => {
    localStorage.setItem("vkr-seeds-annotator", annotator());
    restoreDraft();
    refresh();
    showVideo();
  };
  $("form").addEventListener("input", keepDraft);
  $("video").onchange = () => { keepDraft(); showVideo(); };
  $("save").onclick = save;
  $("new").onclick = () => { clearForm(); status(""); };
  document.addEventListener("keydown", e => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
  });
  restoreDraft();
  await refresh();
  await showVideo();
  document.body.dataset.ready = "1";
}
start().catch(err => status(err.message, true));
</script>
</body>
</html>
"""
