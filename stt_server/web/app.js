// The page: a microphone or a file in, live text out. The pieces worth copying are in
// stt-client.js (the protocol), audio.js (capture and decoding) and transcript.js (exports);
// this file is the glue between them and the page.
//
// URL parameters: ?token=… (kept in sessionStorage, then removed from the address bar),
// ?autostart=1 (listen on load), ?json=1 (send JSON audio messages instead of binary).

import { SAMPLE_RATE, decodeFile, openMicrophone, streamSamples } from "./audio.js";
import { SttSession, backoff, socketUrl } from "./stt-client.js";
import { Transcript, clock } from "./transcript.js";

const TOKEN_KEY = "stt-server.token";
const JSON_KEY = "stt-server.json";
const MAX_PENDING = 100; // chunks (10 s) kept while (re)connecting, then the oldest go
const FINISH_WAIT = 15000; // ms for the last final after "end" before the socket is closed

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  listen: $("listen"),
  level: $("level"),
  file: $("file"),
  drop: $("drop"),
  speed: $("speed"),
  notice: $("notice"),
  empty: $("empty"),
  finals: $("finals"),
  partial: $("partial"),
  copy: $("copy"),
  clear: $("clear"),
  downloads: document.querySelectorAll("[data-download]"),
  settings: $("settings"),
  tokenForm: $("token-form"),
  token: $("token"),
  json: $("json"),
  info: $("info"),
};

const transcript = new Transcript();
let sentSamples = 0; // audio sent since the page loaded: the clock finals are placed on
let clearedAt = 0; // seconds of it when the transcript was last cleared
let current = null; // the Run in progress, if any

// --- one input streamed to the server, across reconnects ---------------------------------

class Run {
  constructor(kind) {
    this.kind = kind; // "mic" or "file"
    this.source = null; // { stop() }
    this.session = null;
    this.open = false; // the current session's "session" message has arrived
    this.offset = 0; // seconds sent before the current session began
    this.pending = [];
    this.attempt = 0; // reconnects in a row
    this.retryTimer = null;
    this.ending = false; // stopped by the user or the file is over: finish, then close
    this.waiters = [];
    this.label = "";
  }

  // Resolves when a session is open (or the run is over).
  whenOpen() {
    if (this.open || current !== this) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  wake() {
    this.waiters.splice(0).forEach((resolve) => resolve());
  }
}

function begin(kind) {
  current = new Run(kind);
  hideNotice();
  render();
  return current;
}

function connect(run) {
  const session = new SttSession(socketUrl(), { token: ui.token.value.trim(), json: ui.json.checked });
  run.session = session;
  run.open = false;
  setState("connecting", run.attempt ? "Reconnecting…" : "Connecting…");
  session.addEventListener("open", ({ detail }) => {
    if (run.session !== session) return;
    run.open = true;
    run.attempt = 0;
    run.offset = sentSamples / SAMPLE_RATE;
    hideNotice();
    setState("live", run.label);
    ui.info.textContent = `session ${detail.session_id} · ${detail.model} · ` +
      (session.json ? "JSON audio" : "binary audio");
    for (const pcm of run.pending.splice(0)) sendNow(run, pcm);
    if (run.ending) finish(run);
    run.wake();
  });
  session.addEventListener("partial", ({ detail }) => showPartial(detail.text));
  session.addEventListener("final", ({ detail }) => {
    addFinal(run.offset + detail.start, run.offset + detail.end, detail.text);
  });
  session.addEventListener("error", ({ detail }) => {
    if (session.lastError !== detail) showNotice(detail.message, "warn");
  });
  session.addEventListener("closed", ({ detail }) => closed(run, session, detail));
}

function send(run, pcm) {
  if (run.open) {
    sendNow(run, pcm);
    return;
  }
  run.pending.push(pcm);
  if (run.pending.length > MAX_PENDING) run.pending.shift();
}

function sendNow(run, pcm) {
  run.session.sendPcm(pcm);
  sentSamples += pcm.length; // counted in samples: summing 0.1 s steps drifts below 11.0
}

function closed(run, session, { code, advice }) {
  if (run.session !== session) return;
  run.open = false;
  showPartial("");
  if (current !== run) return;
  if (run.ending) {
    if (code !== 1000) showNotice(advice.message, "warn");
    end(run, code === 1000 ? "Done" : "Stopped");
    return;
  }
  if (advice.retry !== null) {
    const wait = backoff(run.attempt++, advice.retry);
    const due = performance.now() + wait * 1000;
    setState("waiting", "Waiting to reconnect");
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - performance.now()) / 1000));
      showNotice(`${advice.message} Trying again in ${left} s…`, "warn");
      run.retryTimer = left > 0 ? setTimeout(tick, Math.min(1000, due - performance.now())) : null;
      if (left === 0) connect(run);
    };
    tick();
    return;
  }
  showNotice(advice.message, advice.fatal ? "error" : "info");
  if (code === 4401) askForToken();
  end(run, advice.fatal ? "Stopped" : "Done");
}

// The user's Stop: no more audio; the last final, then the close.
function stop() {
  const run = current;
  if (!run || run.ending) return;
  run.source?.stop();
  ui.level.value = 0;
  wrapUp(run);
}

// Ask the server for the last final and close; if not connected, finish on connecting, or
// just stop while waiting to retry.
function wrapUp(run) {
  run.ending = true;
  if (run.open) {
    finish(run);
  } else if (run.retryTimer !== null || !run.session) {
    end(run, "Stopped");
  } else {
    setState("finishing", "Finishing…"); // the open handler finishes
  }
  render();
}

function finish(run) {
  setState("finishing", "Finishing…");
  run.session.end();
  const session = run.session;
  setTimeout(() => session.close(), FINISH_WAIT);
}

function end(run, label) {
  clearTimeout(run.retryTimer);
  run.retryTimer = null;
  run.ending = true;
  run.source?.stop();
  if (run.session?.isOpen) run.session.close();
  if (current === run) current = null;
  run.wake();
  ui.level.value = 0;
  setState("idle", label);
  render();
}

// --- the two inputs -----------------------------------------------------------------------

async function startMicrophone() {
  if (current) return;
  const run = begin("mic");
  run.label = "Listening";
  connect(run);
  let microphone;
  try {
    microphone = await openMicrophone((pcm, level) => {
      ui.level.value = level;
      if (!run.ending) send(run, pcm);
    });
  } catch (error) {
    showNotice(microphoneProblem(error), "error");
    end(run, "Stopped");
    return;
  }
  if (run.ending) {
    microphone.stop(); // stopped, or refused, while the browser was asking
    return;
  }
  run.source = microphone;
  if (microphone.context.state !== "running") {
    // Autoplay rules: without a click on this page first, audio stays suspended.
    showNotice("Click or press a key anywhere on the page to start the microphone.", "warn");
    const resume = () => microphone.context.resume().then(hideNotice);
    document.addEventListener("pointerdown", resume, { once: true });
    document.addEventListener("keydown", resume, { once: true });
  }
}

function microphoneProblem(error) {
  switch (error?.name) {
    case "NotAllowedError":
      return "Microphone access was refused. Allow it in the browser's address bar, then try again.";
    case "NotFoundError":
      return "No microphone was found.";
    case "NotReadableError":
      return "The microphone is in use by another program, or failed.";
    default:
      return window.isSecureContext
        ? `The microphone could not be opened (${error?.message ?? error}).`
        : "Browsers allow the microphone only on https:// pages (or localhost).";
  }
}

async function startFile(file) {
  if (!file) return;
  if (current) {
    const previous = current;
    stop();
    await new Promise((resolve) => {
      const check = () => (current === previous ? setTimeout(check, 100) : resolve());
      check();
    });
  }
  const run = begin("file");
  setState("connecting", `Decoding ${file.name}…`);
  let samples;
  try {
    samples = await decodeFile(file);
  } catch {
    showNotice(`This browser cannot decode ${file.name}.`, "error");
    end(run, "Stopped");
    return;
  }
  if (run.ending) return;
  const abort = new AbortController();
  run.source = { stop: () => abort.abort() };
  run.label = `Transcribing ${file.name}`;
  connect(run);
  await streamSamples(
    samples,
    Number(ui.speed.value),
    (pcm, level, progress) => {
      ui.level.value = level;
      send(run, pcm);
      setState("live", `Transcribing ${file.name}: ${Math.round(progress * 100)} %`);
    },
    { signal: abort.signal, ready: () => run.whenOpen() },
  );
  ui.level.value = 0;
  if (!run.ending && current === run) wrapUp(run);
}

// --- the transcript on screen -------------------------------------------------------------

function showPartial(text) {
  ui.partial.textContent = text;
  renderEmpty();
}

function addFinal(start, end, text) {
  const line = transcript.add(Math.max(0, start - clearedAt), Math.max(0, end - clearedAt), text);
  ui.partial.textContent = "";
  if (line.text) {
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.dateTime = `PT${line.start.toFixed(2)}S`;
    time.textContent = clock(line.start);
    const words = document.createElement("span");
    words.textContent = line.text;
    item.append(time, " ", words);
    const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    ui.finals.append(item);
    if (atBottom) ui.partial.scrollIntoView({ block: "nearest" });
  }
  render();
}

async function copyTranscript() {
  const text = transcript.toText();
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (a plain http:// page): select the text for Ctrl+C instead.
    window.getSelection().selectAllChildren(ui.finals);
    showNotice("Selected: press Ctrl+C (⌘C) to copy.", "info");
    return;
  }
  showNotice("Transcript copied.", "info");
}

function download(kind) {
  const body = { txt: transcript.toText(), srt: transcript.toSrt(), vtt: transcript.toVtt() }[kind];
  const type = { txt: "text/plain", srt: "application/x-subrip", vtt: "text/vtt" }[kind];
  const stamp = new Date().toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body], { type: `${type};charset=utf-8` }));
  link.download = `transcript-${stamp}.${kind}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function clearTranscript() {
  transcript.clear();
  ui.finals.replaceChildren();
  clearedAt = sentSamples / SAMPLE_RATE;
  render();
}

// --- page state ---------------------------------------------------------------------------

function setState(state, text) {
  ui.state.dataset.state = state;
  ui.state.textContent = text;
}

function showNotice(text, kind) {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

function askForToken() {
  ui.settings.open = true;
  ui.token.focus();
}

function renderEmpty() {
  ui.empty.hidden = transcript.lines.length > 0 || ui.partial.textContent !== "";
}

function render() {
  const busy = current !== null;
  const finishing = busy && current.ending;
  ui.listen.textContent = finishing ? "Finishing…" : busy ? "Stop" : "Start listening";
  ui.listen.disabled = finishing;
  ui.listen.setAttribute("aria-pressed", String(busy));
  const empty = transcript.lines.length === 0;
  for (const button of [ui.copy, ui.clear, ...ui.downloads]) button.disabled = empty;
  renderEmpty();
}

// --- wiring -------------------------------------------------------------------------------

function readSettings() {
  const params = new URLSearchParams(window.location.search);
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token"); // out of the address bar, the history and any screenshot
    const query = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (query ? `?${query}` : ""));
  }
  if (params.has("json")) sessionStorage.setItem(JSON_KEY, params.get("json") === "1" ? "1" : "0");
  ui.token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
  ui.json.checked = sessionStorage.getItem(JSON_KEY) === "1";
  return params;
}

const params = readSettings();

ui.listen.addEventListener("click", () => (current ? stop() : startMicrophone()));
ui.file.addEventListener("change", () => {
  startFile(ui.file.files[0]);
  ui.file.value = ""; // the same file can be picked again
});
ui.copy.addEventListener("click", copyTranscript);
ui.clear.addEventListener("click", clearTranscript);
for (const button of ui.downloads) {
  button.addEventListener("click", () => download(button.dataset.download));
}
ui.token.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, ui.token.value.trim()));
ui.json.addEventListener("change", () => sessionStorage.setItem(JSON_KEY, ui.json.checked ? "1" : "0"));
ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, ui.token.value.trim());
  if (!current) startMicrophone();
});

document.addEventListener("dragover", (event) => {
  event.preventDefault();
  ui.drop.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) ui.drop.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.drop.classList.remove("dragging");
  startFile(event.dataTransfer.files[0]);
});

render();
if (params.get("autostart") === "1") startMicrophone();
