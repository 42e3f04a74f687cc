"""The audit page: experts label sampled examples on 127.0.0.1, each click saved at once.

The pilot review page's conventions (``qualification/review.py``): stdlib server on loopback
only with a Host check, labels only as JSON posts, frames served by hash (never by path),
untrusted text (questions, traces) put in the page through ``textContent`` only.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from experts.audit import LABEL_NAMES, LABELS, load_audit, open_labels
from labelling.http import MAX_BODY, LoopbackHandler, LoopbackServer, check_host
from labelling.store import check_annotator
from vkr_core.schemas import InputError, VkrError

_SHA256 = re.compile(r"^/frames/([0-9a-f]{64})\.jpg$")


class AuditApp:
    def __init__(self, audit_dir: str | Path, default_annotator: str | None = None):
        self.root = Path(audit_dir)
        manifest, items = load_audit(self.root)
        self.store = open_labels(self.root)
        self.known = {item.item_id for item in items}
        self.frames = {f.sha256: Path(f.path) for item in items for f in item.frames}
        self.audit_json = json.dumps(
            {
                "audit": {"source": manifest.source, "sampled": manifest.sampled},
                "labels": [[label, LABEL_NAMES[label]] for label in LABELS],
                "default_annotator": default_annotator,
                "items": [
                    {
                        "item_id": item.item_id,
                        "generation_model": item.generation_model,
                        "trace_model": item.trace_model,
                        **item.example.model_dump(
                            mode="json",
                            include={
                                "question",
                                "options",
                                "solution",
                                "think",
                                "skill",
                                "discipline",
                                "subject",
                                "video_id",
                            },
                        ),
                        "frames": [
                            {"url": f"/frames/{f.sha256}.jpg", "clock": f.clock}
                            for f in item.frames
                        ],
                    }
                    for item in items
                ],
            }
        ).encode()

    def close(self) -> None:
        self.store.close()

    def labels_of(self, annotator: str) -> dict[str, Any]:
        annotator = check_annotator(annotator)
        mine = {}
        for label in self.store.current(annotator):
            changes = len(self.store.history(label.item_id, annotator)) - 1
            mine[label.item_id] = {"label": label.label, "note": label.note, "changes": changes}
        return {"annotator": annotator, "labels": mine}

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        item_id = body.get("item_id")
        if item_id not in self.known:
            raise InputError(f"this audit has no example {item_id!r}")
        annotator = check_annotator(str(body.get("annotator") or ""))
        change = self.store.set(
            item_id, annotator, str(body.get("label")), note=body.get("note") or ""
        )
        changes = len(self.store.history(item_id, annotator)) - 1
        return {
            "status": change.status,
            "item_id": item_id,
            "label": change.label.label,
            "note": change.label.note,
            "changes": changes,
        }


class _Handler(LoopbackHandler):
    server: _AuditHTTPServer

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif url.path == "/api/audit":
            self._send(HTTPStatus.OK, app.audit_json, "application/json")
        elif url.path == "/api/labels":
            try:
                annotator = parse_qs(url.query).get("annotator", [""])[0]
                self._json(HTTPStatus.OK, app.labels_of(annotator))
            except InputError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
        elif match := _SHA256.match(url.path):
            self.serve_frame(app.frames.get(match.group(1)), "no such frame in this audit")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/labels":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        body = self.read_json(MAX_BODY, "a label")
        if body is None:
            return
        try:
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _AuditHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: AuditApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class AuditServer(LoopbackServer):
    """``with AuditServer(audit_dir) as server: server.url`` serves the page in a thread."""

    thread_name = "vkr-audit"

    def __init__(
        self,
        audit_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        annotator: str | None = None,
    ):
        host = check_host(host, "the audit page", "the corpus and its labels")
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = AuditApp(audit_dir, annotator)
        self.listen(_AuditHTTPServer, host, port)


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vkr corpus audit</title>
<style>
  :root { --line: #d0d5dd; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #101828; background: #f9fafb; }
  header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  .muted { color: #667085; }
  main { display: grid; grid-template-columns: 9rem 1fr 20rem; gap: 1rem; padding: 1rem; }
  nav { display: flex; flex-wrap: wrap; gap: .25rem; align-content: flex-start; }
  nav button { width: 2.6rem; padding: .2rem 0; border: 1px solid var(--line); background: #fff;
               border-radius: 4px; cursor: pointer; font-size: 12px; }
  nav button.current { outline: 2px solid #1570ef; }
  nav button.ok { background: #dcfae6; } nav button.flag { background: #fee4e2; }
  section, aside { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; }
  aside { position: sticky; top: 4rem; align-self: start; }
  h2 { font-size: 15px; margin: 1rem 0 .4rem; }
  .frames { display: flex; flex-wrap: wrap; gap: .5rem; }
  figure { margin: 0; text-align: center; }
  figure img { height: 96px; border: 1px solid var(--line); border-radius: 4px; cursor: zoom-in; }
  figure.big img { height: auto; max-width: 100%; width: 720px; cursor: zoom-out; }
  figcaption { font: 12px ui-monospace, monospace; color: #344054; }
  .text { white-space: pre-wrap; word-break: break-word; font: 13px/1.4 ui-monospace, monospace;
          background: #f2f4f7; padding: .5rem; border-radius: 4px; margin: .25rem 0; }
  .buttons { display: grid; gap: .4rem; }
  .buttons button { padding: .5rem; border-radius: 6px; border: 1px solid var(--line); background: #fff;
                    cursor: pointer; text-align: left; font-size: 14px; }
  .buttons button.selected { background: #1570ef; color: #fff; }
  kbd { font: 11px ui-monospace, monospace; border: 1px solid #98a2b3; border-radius: 3px; padding: 0 .25rem; }
  textarea { width: 100%; min-height: 4.5rem; margin-top: .6rem; font: inherit; }
  #status { min-height: 1.4rem; margin-top: .5rem; }
  #status.error { color: #b42318; }
</style>
</head>
<body>
<header>
  <strong id="audit-info">loading…</strong>
  <label>Annotator <input id="annotator" autocomplete="off" placeholder="your name"></label>
  <span id="progress" class="muted"></span>
</header>
<main>
  <nav id="item-list" aria-label="examples"></nav>
  <section id="item" aria-live="polite">
    <div><button id="prev" title="previous (k)">◀ <kbd>k</kbd></button>
      <strong id="item-title"></strong>
      <button id="next" title="next (j)"><kbd>j</kbd> ▶</button></div>
    <div id="meta" class="muted"></div>
    <h2>Frames</h2>
    <div class="frames" id="frames"></div>
    <h2>Question</h2>
    <div class="text" id="question"></div>
    <ol id="options"></ol>
    <h2>Answer</h2>
    <div class="text" id="answer"></div>
    <h2>Reasoning trace</h2>
    <div class="text" id="trace"></div>
  </section>
  <aside>
    <div class="buttons" id="labels"></div>
    <textarea id="note" placeholder="note (n to focus, Esc to leave; saved when you leave the box)"></textarea>
    <div id="status" role="status"></div>
    <p class="muted"><kbd>1</kbd>–<kbd>4</kbd> label · <kbd>j</kbd> next · <kbd>k</kbd> previous · <kbd>n</kbd> note</p>
  </aside>
</main>
<script>
"use strict";
const state = {items: [], idx: 0, annotator: "", labels: {}, names: {}, keys: {}};
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
function item() { return state.items[state.idx]; }
function strip(text, tag) { return text.replace(new RegExp(`^\\s*<${tag}>|</${tag}>\\s*$`, "g"), "").trim(); }

function renderItem() {
  const it = item();
  if (!it) return;
  $("item-title").textContent = `Example ${state.idx + 1} of ${state.items.length} · ${it.item_id}`;
  $("meta").textContent = `${it.skill} · ${it.discipline} / ${it.subject} · video ${it.video_id} · ` +
    `generated by ${it.generation_model} · trace by ${it.trace_model}`;
  $("frames").replaceChildren(...it.frames.map((f) => {
    const fig = el("figure", {}, el("img", {src: f.url, alt: `frame at ${f.clock}`, loading: "lazy"}), el("figcaption", {}, f.clock));
    fig.addEventListener("click", () => fig.classList.toggle("big"));
    return fig;
  }));
  $("question").textContent = it.question;
  $("options").replaceChildren(...(it.options || []).map((o) => el("li", {}, o)));
  $("answer").textContent = strip(it.solution, "answer");
  $("trace").textContent = strip(it.think, "think");
  renderControls();
}

function renderControls() {
  const mine = state.labels[item().item_id];
  for (const b of document.querySelectorAll("#labels button")) b.classList.toggle("selected", !!mine && mine.label === b.dataset.label);
  $("note").value = mine ? mine.note : "";
  if (mine) status(`saved: ${state.names[mine.label]}` + (mine.changes ? ` (changed ${mine.changes}×, history kept)` : ""));
  else status(state.annotator ? "not labelled yet" : "enter your name to start", !state.annotator);
}

function renderList() {
  const done = state.items.filter((it) => state.labels[it.item_id]).length;
  $("progress").textContent = `${done} / ${state.items.length} labelled`;
  $("item-list").replaceChildren(...state.items.map((it, i) => {
    const mine = state.labels[it.item_id];
    const cls = (mine ? (mine.label === "ok" ? "ok" : "flag") : "") + (i === state.idx ? " current" : "");
    return el("button", {class: cls, title: it.item_id, "data-item": it.item_id, onclick: () => go(i)}, i + 1);
  }));
}
function render() { renderList(); renderItem(); }
function go(i) { if (i >= 0 && i < state.items.length) { state.idx = i; render(); } }

// One save at a time, in order: a note saved on blur must not land after a later click.
let saving = Promise.resolve();
function save(label, note) { const it = item(); saving = saving.then(() => saveNow(it, label, note)); return saving; }
async function saveNow(it, label, note) {
  if (!state.annotator) { status("enter your name first", true); $("annotator").focus(); return; }
  try {
    const saved = await api("/api/labels", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({item_id: it.item_id, annotator: state.annotator, label, note})});
    state.labels[saved.item_id] = saved;
    if (item().item_id === saved.item_id) renderControls();
    renderList();
  } catch (e) { status("not saved: " + e.message, true); }
}

async function setAnnotator(name) {
  state.annotator = name.trim();
  $("annotator").value = state.annotator;
  if (!state.annotator) { state.labels = {}; render(); return; }
  localStorage.setItem("vkr-annotator", state.annotator);
  const url = new URL(location.href); url.searchParams.set("annotator", state.annotator);
  history.replaceState(null, "", url);
  try {
    const data = await api("/api/labels?annotator=" + encodeURIComponent(state.annotator));
    state.labels = data.labels;
    const first = state.items.findIndex((it) => !state.labels[it.item_id]);
    state.idx = first === -1 ? 0 : first;  // resume at the first example still to label
    render();
  } catch (e) { status(e.message, true); }
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
  else if (state.keys[event.key]) save(state.keys[event.key], $("note").value);
  else if (event.key === "n") { event.preventDefault(); $("note").focus(); }
  else return;
  event.preventDefault();
});

async function init() {
  const data = await api("/api/audit");
  state.items = data.items;
  $("audit-info").replaceChildren(`audit of ${data.audit.source} `, el("span", {class: "muted"}, `${data.audit.sampled} sampled`));
  $("labels").replaceChildren(...data.labels.map(([label, name], i) => {
    state.names[label] = name; state.keys[String(i + 1)] = label;
    return el("button", {id: `label-${label}`, "data-label": label, onclick: () => save(label, $("note").value)},
      el("kbd", {}, i + 1), " ", name);
  }));
  $("prev").addEventListener("click", () => go(state.idx - 1));
  $("next").addEventListener("click", () => go(state.idx + 1));
  $("annotator").addEventListener("change", (e) => setAnnotator(e.target.value));
  $("note").addEventListener("change", () => {
    const mine = state.labels[item().item_id];
    if (mine) save(mine.label, $("note").value);
  });
  const name = new URL(location.href).searchParams.get("annotator") || data.default_annotator ||
    localStorage.getItem("vkr-annotator") || "";
  render();
  if (name) await setAnnotator(name); else $("annotator").focus();
  document.body.dataset.ready = "1";
}
init().catch((e) => status("could not load the audit: " + e.message, true));
</script>
</body>
</html>
"""
