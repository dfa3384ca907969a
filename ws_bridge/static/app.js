// Parley demo page: one WebSocket to the bridge, gapless playback with scheduled AudioBuffers,
// captions revealed segment by segment as their audio plays, barge-in with the milliseconds heard.
// The session survives a dropped connection and a reload (its id is kept in sessionStorage), messages
// typed while Parley is unreachable wait and are sent when it is back, and a stopped reply shows what
// the conversation kept. Frame protocol: see the README ("The WebSocket bridge").
"use strict";

const $ = (selector) => document.querySelector(selector);
const RETRY_MS = [500, 1000, 2000, 4000, 8000, 10000];
const VOICES_RETRY_MS = [2000, 4000, 8000, 15000];
const DEFAULT_MS_PER_CHAR = 65; // the service's own guess of a speaking rate (service/core/history.py)

// sessionStorage: kept across a reload of this tab, not shared with other tabs (two tabs on one
// session would take it from each other).
const saved = {
  get(key, fallback) {
    try {
      const value = sessionStorage.getItem(`parley.${key}`);
      return value === null ? fallback : JSON.parse(value);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try { sessionStorage.setItem(`parley.${key}`, JSON.stringify(value)); } catch { /* full or disabled */ }
  },
  remove(key) {
    try { sessionStorage.removeItem(`parley.${key}`); } catch { /* disabled */ }
  },
};

// An access token given in the URL's fragment (#token=…; a fragment never reaches a server or its
// logs) is kept for this tab and taken out of the address bar.
const fragmentToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (fragmentToken) {
  saved.set("token", fragmentToken);
  history.replaceState(null, "", location.pathname + location.search);
}

const state = {
  token: saved.get("token", ""),
  ws: null,
  open: false,          // session_started arrived on state.ws: turns can be sent
  sessionId: saved.get("session", ""),
  sessionVoice: "",     // the voice the session speaks with (from session_started)
  wanted: false,        // keep a connection: reconnect when it drops
  attempt: 0,           // reconnection attempts since the last good connection
  retryTimer: null,
  lost: null,           // why the connection dropped, until it is back
  ctx: null,            // the AudioContext (made on the first send: browsers need a gesture)
  rate: 24000,          // the session's audio rate
  nextTime: 0,          // where the next audio chunk starts on the context's clock
  turn: null,           // the turn sent last (the one being spoken)
  turns: new Map(),     // turns sent on this connection, by id
  queue: [],            // turns waiting for a connection, in order
  log: [],              // everything shown, in order (turns and notes), as kept in sessionStorage
  turnCount: 0,
  voices: null,
  voicesAttempt: 0,
  voicesTimer: null,
  follow: true,         // the log is scrolled to its end: keep it there
  statusTimer: null,
  voiceInput: null,     // the service takes voice input: null (not known yet), true, false (it refused)
  mic: null,            // the microphone while it is on: {stream, source, node}
  heard: null,          // the turn of what the user is saying, until its transcript opens it
};
const MIC_RATE = 16000; // the voice is sent as 16 kHz mono PCM16, the rate the service's engines use

// -- words --------------------------------------------------------------------------------------

function seconds(ms) {
  const s = ms / 1000;
  if (s < 0.1) return `${s.toFixed(2)} s`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function timingDetail(turn) {
  const parts = [];
  if (turn.waitMs != null) parts.push(`first sound ${Math.round(turn.waitMs)} ms after it was sent`);
  const t = turn.timings || {};
  const service = [];
  if (Number(t.firstLlmTokenMs) > 0) service.push(`first word written ${t.firstLlmTokenMs} ms`);
  if (Number(t.firstAudioMs) > 0) service.push(`first audio ${t.firstAudioMs} ms`);
  if (Number(t.totalMs) > 0) service.push(`total ${t.totalMs} ms`);
  if (service.length) parts.push(`on the service: ${service.join(", ")}`);
  if (Number(t.audioMs) > 0) parts.push(`${seconds(Number(t.audioMs))} of speech`);
  return parts.join(" · ");
}

// -- status ---------------------------------------------------------------------------------------

function showStatus(text, { kind = "error", detail = "", action = null, topic = "" } = {}) {
  const status = $("#status");
  clearTimeout(state.statusTimer);
  status.hidden = !text;
  status.className = kind;
  $("#status-text").textContent = text;
  const details = $("#status-details");
  details.hidden = !detail;
  if (status.dataset.topic !== topic) details.open = false; // the same trouble again: leave it as the reader set it
  $("#status-detail").textContent = detail;
  const button = $("#status-action");
  button.hidden = !action;
  if (action) {
    button.textContent = action.label;
    button.onclick = action.run;
  }
  status.dataset.topic = topic;
  if (kind === "info" && text) state.statusTimer = setTimeout(() => showStatus(""), 8000);
}

function clearStatus(topic) {
  if ($("#status").dataset.topic === topic) showStatus("");
}

// -- voices ---------------------------------------------------------------------------------------

async function loadVoices() {
  clearTimeout(state.voicesTimer);
  const select = $("#voice");
  try {
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const response = await fetch("/voices", { cache: "no-store", headers });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error?.message || response.statusText);
    state.voices = body.voices;
    state.voicesAttempt = 0;
    const want = state.sessionVoice || saved.get("voice", "") || body.defaultVoice;
    select.replaceChildren(...body.voices.map((voice) => new Option(`${voice.id} (${voice.language})`, voice.id)));
    select.value = body.voices.some((voice) => voice.id === want) ? want : body.defaultVoice;
    select.disabled = false;
    clearStatus("voices");
  } catch (error) {
    state.voices = null;
    select.replaceChildren(new Option("unavailable", ""));
    select.disabled = true;
    if ($("#status").hidden || $("#status").dataset.topic === "voices") {
      showStatus("The voice service is not reachable right now. Parley keeps trying; you can type meanwhile.", {
        detail: error.message, topic: "voices",
      });
    }
    const delay = VOICES_RETRY_MS[Math.min(state.voicesAttempt, VOICES_RETRY_MS.length - 1)];
    state.voicesAttempt += 1;
    state.voicesTimer = setTimeout(loadVoices, delay);
  }
}

// -- the connection -------------------------------------------------------------------------------

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  state.wanted = true;
  if (state.ws) return;
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  // A token (with API keys on) rides as a subprotocol beside "parley": browsers cannot set headers,
  // and a URL's query string ends up in access logs.
  const ws = state.token ? new WebSocket(url, ["parley", `bearer.${state.token}`]) : new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const info = { resuming: state.sessionId, error: null, started: false, closing: "" };
  ws.parley = info;
  state.ws = ws;
  state.open = false;
  ws.onopen = () => {
    info.opened = true;
    const start = { audio: { encoding: "AUDIO_ENCODING_PCM16", sampleRateHz: wantedRate() } };
    // Always with voice input (text works with it too), unless this service said it takes none.
    info.voice = state.voiceInput !== false;
    if (info.voice) start.inputAudio = { encoding: "AUDIO_ENCODING_PCM16", sampleRateHz: MIC_RATE };
    if (info.resuming) start.sessionId = info.resuming;
    if ($("#voice").value) start.voice = $("#voice").value;
    ws.send(JSON.stringify({ start }));
  };
  ws.onmessage = (event) => {
    if (state.ws !== ws) return;
    if (typeof event.data !== "string") {
      onAudio(event.data);
      return;
    }
    const message = JSON.parse(event.data);
    if (message.error) info.error = message.error;
    else if (message.sessionStarted) sessionStarted(message.sessionStarted, info);
    else onMessage(message);
  };
  ws.onclose = (event) => {
    if (state.ws === ws) closed(event, info);
  };
}

function wantedRate() {
  return state.ctx ? Math.min(48000, Math.max(8000, state.ctx.sampleRate)) : state.rate;
}

function sessionStarted(started, info) {
  info.started = true;
  state.open = true;
  if (info.voice) state.voiceInput = true;
  updateMic();
  state.attempt = 0;
  state.rate = started.audio.sampleRateHz;
  state.sessionId = started.sessionId;
  saved.set("session", started.sessionId);
  state.sessionVoice = started.voice;
  if (state.voices && state.voices.some((voice) => voice.id === started.voice)) $("#voice").value = started.voice;
  const resumed = Boolean(info.resuming) && started.sessionId === info.resuming;
  const wasLost = Boolean(state.lost);
  if (wasLost) {
    showStatus(resumed ? "Reconnected. The conversation goes on where it was." : "Reconnected.", { kind: "info" });
    state.lost = null;
  } else if (["connection", "voices"].includes($("#status").dataset.topic)) {
    showStatus("");
  }
  if (!state.voices || wasLost) loadVoices(); // the service is back: so are its voices (maybe others)
  flushQueue();
}

function closed(event, info) {
  state.ws = null;
  state.open = false;
  const error = info.error || {};
  const code = error.code || "";
  const detail = code ? `${code}: ${error.message}` : `the connection closed (WebSocket code ${event.code}${event.reason ? `: ${event.reason}` : ""})`;
  // Turns sent on this connection that it never answered go back to the queue; one in progress is cut
  // off (the service keeps its reply as far as its audio was sent).
  const unanswered = [];
  for (const turn of state.turns.values()) {
    if (turn.outcome) continue;
    if (turn.status === "sent") unanswered.push(turn);
    else finish(turn, "cutoff", heardText(turn, turn.audioMs), { why: "the connection was lost" });
  }
  state.turns.clear();
  dropHeard();
  updateMic();
  for (const turn of unanswered.reverse()) {
    turn.status = "queued";
    if (state.turn === turn) state.turn = null;
    state.queue.unshift(turn);
  }

  if (code === "INVALID_ARGUMENT" && info.voice && /no voice input/.test(error.message || "")) {
    // A service without speech recognition: the same session, text only, and no microphone.
    state.voiceInput = false;
    micOff();
    updateMic();
    connect();
    return;
  }
  if (info.closing === "voice") {
    connect(); // resume at once with the new voice
    return;
  }
  if (code === "NOT_FOUND" && info.resuming) {
    const reconnecting = Boolean(state.lost);
    state.sessionId = "";
    state.lost = null;
    saved.remove("session");
    // (Before the messages still waiting: they go to the new conversation.)
    addNote("New conversation: the assistant does not remember what was said above.", true, state.queue[0]);
    showStatus("Your earlier conversation could not be continued: the voice service no longer has it "
      + "(it expired, or was lost when the service restarted). A new conversation has started.", {
      kind: "warn", detail, topic: "session",
    });
    state.attempt = 0;
    if (reconnecting) loadVoices(); // the service is back: so are its voices (maybe others)
    if (state.queue.length || reconnecting) connect();
    else state.wanted = false;
    return;
  }
  if (code === "DEADLINE_EXCEEDED") {
    // Closed as idle: the next message resumes the session.
    state.wanted = false;
    if (state.queue.length) connect();
    return;
  }
  if (code === "ABORTED") {
    state.wanted = false;
    micOff(); // (its voice would take the session back at once)
    markUnsent();
    showStatus("This conversation was continued in another tab or window. Send a message to continue it here.", {
      kind: "warn", detail, topic: "session",
    });
    return;
  }
  if (code === "UNAUTHENTICATED" || code === "PERMISSION_DENIED") {
    state.wanted = false;
    micOff();
    markUnsent("Not sent: this page has no valid access token.");
    showStatus(state.token
      ? "The voice service did not accept this page's access token (it may have expired). Reload the page from the site that gave it."
      : "The voice service needs an access token: open this page with #token=… from the site that gives them.", {
      detail, topic: "connection",
    });
    return;
  }
  if (code === "INVALID_ARGUMENT") {
    state.wanted = false;
    micOff();
    markUnsent();
    showStatus("The voice service refused the request.", { detail, topic: "connection" });
    return;
  }
  if (!state.wanted) return;
  // The bridge or the service is down, restarting, busy or broken: try again, and resume the session.
  let what;
  if (!code && !info.opened && event.code === 1006) what = "Cannot reach Parley (the page's server is down, or the network is).";
  else if (!code) what = "The connection to Parley was lost.";
  else if (code === "UNAVAILABLE" && /shutting down/.test(error.message)) what = "The voice service is restarting.";
  else if (code === "UNAVAILABLE") what = "The voice service is not responding.";
  else if (code === "RESOURCE_EXHAUSTED" && error.retryAfterS) what = "You have reached this page's usage limit for now.";
  else if (code === "RESOURCE_EXHAUSTED") what = "The voice service is busy.";
  else what = "The voice service ran into a problem.";
  if (state.sessionId && (info.started || state.lost)) what += " Your conversation will go on when it is back.";
  state.lost = { what, detail };
  markUnsent();
  const delay = code === "RESOURCE_EXHAUSTED" && error.retryAfterS
    ? error.retryAfterS * 1000 // (the service says when there is room again)
    : RETRY_MS[Math.min(state.attempt, RETRY_MS.length - 1)];
  state.attempt += 1;
  state.retryTimer = setTimeout(connect, delay);
  showStatus(`${what} ${delay < 2000 ? "Reconnecting…" : `Trying again in ${seconds(delay).replace(".0", "")}…`}`, {
    detail, topic: "connection", action: { label: "Try now", run: retryNow },
  });
}

function retryNow() {
  state.attempt = 0;
  if (!state.ws) connect();
}

function send(message) {
  state.ws.send(JSON.stringify(message));
}

// -- turns ----------------------------------------------------------------------------------------

function newTurn(text, mode, id = null) {
  state.turnCount += 1;
  return {
    id: id || `web-${Date.now().toString(36)}-${state.turnCount}`,
    mode,               // "reply": answered by the LLM; "read": read aloud as it is
    userText: text,
    status: "queued",   // queued (waiting for a connection), sent, answered (the service sent something)
    notSent: false,     // a connection attempt failed while it waited: say so
    text: "",           // the caption text so far (text_delta)
    segments: [],       // {index, text, offset, startMs, durationMs, complete, span}
    searchFrom: 0,
    chunks: [],         // {start, duration, source} on the context clock
    audioMs: 0,
    stopped: false,
    stoppedAt: 0,
    outcome: null,      // completed, interrupted, failed, cutoff
    kept: "",           // the text the conversation kept, once the outcome is known
    error: "",
    why: "",
    timings: null,
    sentAt: 0,
    waitMs: null,       // from sending to the first sound
    dom: null,
  };
}

function queueTurn(turn) {
  state.queue.push(turn);
  state.log.push(turn);
  render(turn);
  saveLog();
  if (state.open) flushQueue();
  else if (!state.ws) {
    state.attempt = 0;
    connect();
  }
}

function flushQueue() {
  while (state.open && state.queue.length) {
    const turn = state.queue.shift();
    if (speaking(state.turn)) interrupt();
    turn.status = "sent";
    turn.notSent = false;
    turn.sentAt = performance.now();
    state.turns.set(turn.id, turn);
    state.turn = turn;
    if (turn.mode === "read") send({ speakText: { text: turn.userText, flush: true, turnId: turn.id } });
    else send({ userText: { text: turn.userText, turnId: turn.id } });
    render(turn);
  }
  saveLog();
  updateButtons();
}

function markUnsent(why) {
  for (const turn of state.queue) {
    turn.notSent = true;
    render(turn);
    if (why && turn.dom?.unsentText) turn.dom.unsentText.textContent = why;
  }
  saveLog();
}

function removeQueued(turn) {
  state.queue = state.queue.filter((queued) => queued !== turn);
  state.log = state.log.filter((item) => item !== turn);
  turn.dom.box.remove();
  saveLog();
}

function onMessage(message) {
  if (message.speechStarted) return speechStarted();
  if (message.speechStopped) return speechStopped();
  if (message.transcript) return onTranscript(message.transcript);
  const body = message.textDelta || message.segment || message.turnEnded;
  const turn = body && state.turns.get(body.turnId);
  if (!turn) return;
  if (turn.status === "sent") turn.status = "answered";
  if (message.textDelta) {
    turn.text += message.textDelta.text;
  } else if (message.segment) {
    const segment = message.segment;
    for (const earlier of turn.segments) earlier.complete = true;
    let offset = turn.text.indexOf(segment.text, turn.searchFrom);
    if (offset < 0) offset = Math.min(turn.searchFrom, turn.text.length);
    turn.searchFrom = offset + segment.text.length;
    turn.segments.push({
      index: segment.index, text: segment.text, offset, startMs: Number(segment.startMs),
      durationMs: 0, complete: false, span: null,
    });
  } else {
    turnEnded(turn, message.turnEnded);
    return;
  }
  if (!turn.outcome) render(turn);
}

function turnEnded(turn, ended) {
  state.turns.delete(turn.id);
  turn.timings = ended.timings || {};
  const reason = ended.reason || "";
  if (reason.endsWith("INTERRUPTED") && turn.stoppedByVoice) {
    // Cut by the user's voice: the service ended it before our interrupt with what we played came;
    // the history keeps what was played, as shown.
    finish(turn, "interrupted", heardText(turn, turn.stoppedAt));
  } else if (reason.endsWith("INTERRUPTED")) {
    finish(turn, "interrupted", ended.spokenText || "");
  } else if (turn.stopped) {
    // It had ended on the service before our interrupt arrived: the service cut its history at the
    // milliseconds we played, as we do here.
    for (const segment of turn.segments) segment.complete = true;
    const kept = heardText(turn, turn.stoppedAt);
    finish(turn, kept === turn.text.trim() ? "completed" : "interrupted", kept);
  } else if (reason.endsWith("FAILED")) {
    finish(turn, "failed", ended.spokenText || "", { error: ended.error || "unknown error" });
  } else {
    for (const segment of turn.segments) segment.complete = true;
    finish(turn, "completed", ended.spokenText || turn.text.trim());
  }
}

function finish(turn, outcome, kept, { error = "", why = "" } = {}) {
  turn.outcome = outcome;
  turn.kept = kept;
  turn.error = error;
  turn.why = why;
  render(turn);
  saveLog();
  updateButtons();
}

// What of the turn's text was heard in its first `heardMs` of audio: the service's own rule
// (heard_text in service/core/history.py), so the page shows what the conversation keeps.
function heardText(turn, heardMs) {
  if (heardMs <= 0) return "";
  const done = turn.segments.filter((segment) => segment.complete && segment.durationMs > 0);
  const chars = done.reduce((sum, segment) => sum + segment.text.length, 0);
  const msPerChar = chars ? done.reduce((sum, segment) => sum + segment.durationMs, 0) / chars : DEFAULT_MS_PER_CHAR;
  let cut = 0;
  for (const segment of turn.segments) {
    if (heardMs < segment.startMs) break;
    const endMs = segment.startMs + segment.durationMs;
    if (segment.complete && heardMs >= endMs) {
      cut = segment.offset + segment.text.length;
      continue;
    }
    if (segment.durationMs <= 0) break;
    const fullMs = segment.complete ? segment.durationMs : Math.max(segment.durationMs, segment.text.length * msPerChar);
    const fraction = (Math.min(heardMs, endMs) - segment.startMs) / fullMs;
    const words = [...segment.text.matchAll(/\S+/g)];
    let whole = Math.floor(words.length * Math.min(fraction, 1) + 1e-9);
    if (!segment.complete) whole = Math.min(whole, words.length - 1);
    if (whole > 0) cut = segment.offset + words[whole - 1].index + words[whole - 1][0].length;
    break;
  }
  return turn.text.slice(0, cut).trim();
}

// -- drawing --------------------------------------------------------------------------------------

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

function build(turn) {
  $(".hint")?.remove();
  const box = element("section", `turn turn-${turn.mode}`);
  const dom = { box };
  if (turn.mode === "read") {
    dom.user = element("div", "bubble read");
    dom.user.append(element("div", "label", "Read aloud (your text, not an answer)"));
    dom.words = element("div", "words");
    dom.user.append(dom.words);
  } else {
    dom.user = element("div", "bubble user", turn.userText);
  }
  dom.unsent = element("div", "unsent-note");
  dom.unsent.hidden = true;
  dom.unsentText = element("span", "", "Not sent yet: Parley is unreachable. It will be sent when the connection is back.");
  dom.unsent.append(dom.unsentText);
  const sendNow = element("button", "link", "Send now");
  sendNow.type = "button";
  sendNow.onclick = retryNow;
  const remove = element("button", "link", "Remove");
  remove.type = "button";
  remove.onclick = () => removeQueued(turn);
  const actions = element("span", "actions");
  actions.append(sendNow, remove);
  dom.unsent.append(actions);
  box.append(dom.user, dom.unsent);
  $("#log").append(box);
  turn.dom = dom;
}

function render(turn) {
  const follow = state.follow;
  if (!turn.dom) build(turn);
  const dom = turn.dom;
  const waiting = turn.status === "queued";
  if (turn.voice) {
    dom.user.textContent = turn.userText || (turn.status === "hearing" ? "Hearing you…" : "…");
    dom.user.classList.toggle("placeholder", turn.status === "hearing");
  }
  dom.user.classList.toggle("unsent", waiting && turn.notSent);
  dom.user.classList.toggle("sending", waiting && !turn.notSent);
  dom.unsent.hidden = !(waiting && turn.notSent);
  if (turn.mode === "read") {
    dom.user.classList.toggle("interrupted", turn.outcome === "interrupted" || turn.outcome === "cutoff");
    if (waiting) dom.words.textContent = turn.userText;
    else if (turn.outcome && !(turn.outcome === "completed" && turn.segments.length)) {
      drawFinal(dom.words, turn, turn.outcome === "failed" && !turn.kept ? turn.userText : turn.kept);
    } else drawLive(dom.words, turn);
  } else if (waiting || turn.status === "hearing" || (turn.outcome === "failed" && !turn.kept)) {
    // Not sent (again), or failed with nothing said: no reply bubble (a failure gets a notice).
    dom.reply?.remove();
    dom.reply = null;
  } else {
    if (!dom.reply) {
      dom.reply = element("div", "bubble assistant");
      dom.unsent.after(dom.reply);
    }
    dom.reply.classList.toggle("interrupted", turn.outcome === "interrupted" || turn.outcome === "cutoff");
    dom.reply.setAttribute("aria-busy", String(!turn.outcome));
    if (turn.outcome && !(turn.outcome === "completed" && turn.segments.length)) drawFinal(dom.reply, turn, turn.kept);
    else drawLive(dom.reply, turn);
  }
  drawMeta(turn);
  if (follow) scrollToEnd();
}

function drawFinal(node, turn, text) {
  node.replaceChildren();
  node.classList.toggle("empty", !text);
  const read = turn.mode === "read";
  const nothing = {
    interrupted: read ? "(stopped before any of it was read)" : "(stopped before it said anything)",
    cutoff: read ? "(cut off before any of it was read)" : "(cut off before it said anything)",
  };
  node.textContent = text || nothing[turn.outcome] || "(nothing was said)";
  turn.segments.forEach((segment) => { segment.span = null; });
}

// The reply as it is written: text not yet spoken is faint, each segment turns solid when its audio
// starts. Before the first word, a "thinking" line.
function drawLive(node, turn) {
  node.classList.remove("empty");
  const text = turn.text || (turn.mode === "read" ? turn.userText : "");
  if (!text) {
    if (!node.querySelector(".thinking")) {
      const thinking = element("span", "thinking", "Thinking");
      thinking.append(element("span", "dots", "…"));
      node.replaceChildren(thinking);
    }
    return;
  }
  const parts = [];
  let position = 0;
  for (const segment of turn.segments) {
    if (position && segment.offset > position) parts.push(document.createTextNode(text.slice(position, segment.offset)));
    if (!segment.span) segment.span = element("span", "segment pending", segment.text);
    parts.push(segment.span);
    position = segment.offset + segment.text.length;
  }
  const rest = position ? text.slice(position) : text.trimStart();
  if (rest.trim()) parts.push(element("span", "unspoken", rest));
  if (!turn.outcome) parts.push(element("span", "caret", ""));
  node.replaceChildren(...parts);
  highlight(turn, playedMs(turn));
}

function drawMeta(turn) {
  const dom = turn.dom;
  dom.meta?.remove();
  dom.meta = null;
  if (!turn.outcome) return;
  if (turn.outcome === "failed") {
    dom.meta = element("div", "notice failed");
    const said = turn.kept ? "The reply broke off" : turn.mode === "read" ? "This could not be read aloud" : "Sorry, no answer this time";
    dom.meta.append(element("span", "", `${said}: something went wrong on the voice service. `));
    const again = element("button", "link", "Try again");
    again.type = "button";
    again.onclick = () => queueTurn(newTurn(turn.userText, turn.mode));
    dom.meta.append(again);
    dom.meta.append(details(turn.error));
  } else {
    dom.meta = element("details", "meta");
    let summary;
    const spoke = turn.waitMs != null ? turn.waitMs : Number(turn.timings?.firstAudioMs) || null;
    const read = turn.mode === "read";
    if (turn.outcome === "cutoff") summary = `Cut off: ${turn.why}`;
    else if (turn.outcome === "interrupted") {
      summary = turn.kept ? `Interrupted: ${read ? "only this much was read" : "the rest was not said"}`
        : `Interrupted before it ${read ? "was read" : "spoke"}`;
    } else summary = spoke ? `${read ? "Read aloud" : "Spoke"} after ${seconds(spoke)}` : read ? "Read aloud" : "Answered";
    if (turn.restoredSummary) summary = turn.restoredSummary;
    const detail = turn.restoredDetail ?? timingDetail(turn);
    const head = element("summary", turn.outcome === "completed" ? "" : "cut", summary);
    dom.meta.append(head);
    if (detail) {
      dom.meta.append(element("div", "detail", detail));
      dom.meta.title = detail;
    } else {
      dom.meta.classList.add("plain");
    }
    turn.summary = summary;
    turn.detail = detail;
  }
  dom.box.append(dom.meta);
}

function details(text) {
  const node = element("details", "detail-box");
  node.append(element("summary", "", "Details"), element("span", "", text));
  return node;
}

// A note goes at the end of the log, or just before the turn `before` (one still waiting to be sent,
// which belongs after it).
function addNote(text, save = true, before = null) {
  $(".hint")?.remove();
  const note = { note: text };
  const divider = element("p", "divider", text);
  const at = before ? state.log.indexOf(before) : -1;
  if (at >= 0 && before.dom) before.dom.box.before(divider);
  else $("#log").append(divider);
  if (save) {
    if (at >= 0) state.log.splice(at, 0, note);
    else state.log.push(note);
    saveLog();
  }
  scrollToEnd();
}

function scrollToEnd() {
  const log = $("#log");
  log.scrollTop = log.scrollHeight;
}

// -- keeping the page across a reload -------------------------------------------------------------

function saveLog() {
  saved.set("log", state.log.filter((item) => item.status !== "hearing").slice(-200).map((item) => {
    if (item.note) return item;
    const turn = item;
    let { outcome, kept } = turn;
    let summary = turn.summary || "";
    if (!outcome && turn.status !== "queued") {
      // In progress when the page went away: the service keeps the reply as far as its audio was sent.
      outcome = "cutoff";
      kept = heardText(turn, turn.audioMs);
      summary = "Cut off: the page was reloaded";
    }
    return {
      id: turn.id, mode: turn.mode, userText: turn.userText, queued: turn.status === "queued",
      outcome, kept, error: turn.error, summary, detail: turn.detail || "",
    };
  }));
}

function restoreLog() {
  for (const item of saved.get("log", [])) {
    if (item.note) {
      addNote(item.note, false);
      state.log.push(item);
      continue;
    }
    const turn = newTurn(item.userText, item.mode, item.id);
    state.log.push(turn);
    if (item.queued) {
      turn.notSent = true;
      state.queue.push(turn);
    } else {
      turn.status = "answered";
      turn.outcome = item.outcome || "completed";
      turn.kept = item.kept || "";
      turn.error = item.error || "";
      turn.restoredSummary = item.summary;
      turn.restoredDetail = item.detail;
    }
    render(turn);
  }
  if (state.queue.length) connect();
}

// -- audio ----------------------------------------------------------------------------------------

function ensureAudio() {
  if (!state.ctx) {
    let ctx = new AudioContext();
    const rate = Math.min(48000, Math.max(8000, ctx.sampleRate));
    if (rate !== ctx.sampleRate) {
      ctx.close();
      ctx = new AudioContext({ sampleRate: rate });
    }
    state.ctx = ctx;
  }
  if (state.ctx.state === "suspended") state.ctx.resume();
}

function onAudio(buffer) {
  const view = new DataView(buffer);
  const headerLength = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headerLength)));
  const turn = state.turns.get(header.turnId);
  if (!turn) return;
  if (turn.status === "sent") turn.status = "answered";
  // The turn's audio timeline, as the service measures it, even for audio not played (a stopped turn):
  // a segment's end is where its last audio ends.
  const pcm = new Int16Array(buffer.slice(4 + headerLength));
  const durationMs = (pcm.length / state.rate) * 1000;
  turn.audioMs += durationMs;
  const segment = turn.segments.find((s) => s.index === header.segmentIndex);
  if (segment) segment.durationMs = turn.audioMs - segment.startMs;
  if (turn !== state.turn || turn.stopped) return;
  ensureAudio();
  const ctx = state.ctx;
  const audio = ctx.createBuffer(1, pcm.length, state.rate);
  const samples = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = audio;
  source.connect(ctx.destination);
  const start = Math.max(state.nextTime, ctx.currentTime + 0.03);
  source.start(start);
  state.nextTime = start + audio.duration;
  if (turn.waitMs == null) turn.waitMs = performance.now() + (start - ctx.currentTime) * 1000 - turn.sentAt;
  turn.chunks.push({ start, duration: audio.duration, source });
  updateButtons();
}

function playedMs(turn) {
  if (!turn || !state.ctx) return 0;
  const now = state.ctx.currentTime;
  let played = 0;
  for (const chunk of turn.chunks) played += Math.min(Math.max(now - chunk.start, 0), chunk.duration);
  return played * 1000;
}

// The turn is being answered or its audio still plays.
function speaking(turn) {
  if (!turn || turn.stopped || turn.status === "queued" || turn.outcome === "failed") return false;
  return !turn.outcome || playedMs(turn) < turn.audioMs - 1;
}

function interrupt() {
  const turn = state.turn;
  if (!speaking(turn)) return;
  // What was played, rounded up: the service keeps a segment only if the played time reaches its end.
  const played = Math.ceil(playedMs(turn));
  turn.stopped = true;
  turn.stoppedAt = played;
  for (const chunk of turn.chunks) {
    try { chunk.source.stop(); } catch { /* not started yet */ }
  }
  state.nextTime = 0;
  if (!state.open) {
    // The stream it belonged to has ended, and the service kept its reply as far as it was sent: only
    // the sound stops.
    updateButtons();
    return;
  }
  // Naming the turn: one a transcript opened meanwhile (the user spoke as this reply played) goes on.
  send({ interrupt: { playedMs: played, turnId: turn.id } });
  if (turn.outcome === "completed") {
    // The service had sent all of it; it cuts the history at what we played, and so does the page.
    const kept = heardText(turn, played);
    if (kept !== turn.kept) finish(turn, "interrupted", kept);
  } else if (!turn.outcome) {
    // Show at once what was heard; the service's turn_ended confirms it.
    finish(turn, "interrupted", heardText(turn, played));
  }
  updateButtons();
}

// Reveal each segment when its audio starts; highlight the one playing.
function highlight(turn, played) {
  let active = null;
  for (const segment of turn.segments) {
    if (!segment.span) continue;
    const reached = segment.startMs <= played && (segment.startMs < turn.audioMs || Boolean(turn.outcome));
    segment.span.classList.toggle("pending", !reached);
    if (reached) active = segment;
  }
  const playing = speaking(turn);
  for (const segment of turn.segments) {
    segment.span?.classList.toggle("active", segment === active && playing);
  }
}

function tick() {
  const turn = state.turn;
  if (turn && !turn.stopped) highlight(turn, playedMs(turn));
  updateButtons();
  requestAnimationFrame(tick);
}

function updateButtons() {
  $("#stop").disabled = !speaking(state.turn);
}

// -- the microphone -------------------------------------------------------------------------------

async function micOn() {
  if (state.mic || state.voiceInput === false) return;
  if (!navigator.mediaDevices?.getUserMedia || typeof AudioWorkletNode === "undefined") {
    showStatus("This browser cannot record here (a microphone needs a secure page: https, or localhost). You can type.", {
      topic: "mic",
    });
    return;
  }
  ensureAudio();
  const mic = { stream: null, source: null, node: null };
  state.mic = mic; // (on while it starts: a second click turns it off)
  updateMic();
  try {
    mic.stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    if (state.mic !== mic) throw new Error("turned off");
    await state.ctx.audioWorklet.addModule("/mic-worklet.js");
    if (state.mic !== mic) throw new Error("turned off");
    mic.source = state.ctx.createMediaStreamSource(mic.stream);
    mic.node = new AudioWorkletNode(state.ctx, "parley-mic", {
      numberOfOutputs: 1, processorOptions: { targetRate: MIC_RATE, chunkMs: 20 },
    });
    mic.node.port.onmessage = (event) => sendVoice(event.data);
    mic.source.connect(mic.node);
    mic.node.connect(state.ctx.destination); // (it writes silence: connected so that it is processed)
    for (const track of mic.stream.getAudioTracks()) {
      track.onended = () => {
        if (state.mic === mic) {
          micOff();
          showStatus("The microphone stopped (it was unplugged or taken by another app).", { topic: "mic" });
        }
      };
    }
    clearStatus("mic");
    if (!state.ws) {
      state.attempt = 0;
      connect();
    }
  } catch (error) {
    const mine = state.mic === mic;
    stopCapture(mic);
    if (!mine) return;
    state.mic = null;
    updateMic();
    const name = error?.name || "";
    let text;
    if (name === "NotAllowedError" || name === "SecurityError") {
      text = "Parley may not use the microphone: access was refused. Allow it in the browser's site settings to talk; you can type meanwhile.";
    } else if (name === "NotFoundError" || name === "OverconstrainedError") {
      text = "No microphone was found. Plug one in to talk; you can type meanwhile.";
    } else if (name === "NotReadableError") {
      text = "The microphone is in use by another app, or could not be opened. You can type meanwhile.";
    } else {
      text = "The microphone could not be started. You can type meanwhile.";
    }
    showStatus(text, { detail: `${name || "Error"}: ${error?.message || error}`, topic: "mic" });
  }
}

function stopCapture(mic) {
  try { mic.node?.port.postMessage("stop"); } catch { /* gone */ }
  try { mic.source?.disconnect(); } catch { /* not connected */ }
  try { mic.node?.disconnect(); } catch { /* not connected */ }
  for (const track of mic.stream?.getTracks() || []) track.stop();
}

function micOff() {
  const mic = state.mic;
  state.mic = null;
  if (mic) stopCapture(mic);
  dropHeard();
  updateMic();
}

function sendVoice(buffer) {
  if (!state.mic) return;
  if (state.open && state.voiceInput) state.ws.send(buffer);
  else if (!state.ws && !state.retryTimer && state.voiceInput !== false) connect();
  // (while the connection is down the voice is dropped: what is said then is not heard)
}

function updateMic() {
  const button = $("#mic");
  const on = Boolean(state.mic);
  button.disabled = state.voiceInput === false;
  button.setAttribute("aria-pressed", String(on));
  button.classList.toggle("on", on);
  button.title = state.voiceInput === false
    ? "This voice service takes text only: it has no speech recognition."
    : on ? "Stop listening" : "Talk instead of typing";
  const label = $("#mic-state");
  const hearing = on && state.heard && state.heard.status === "hearing" && state.heard.speaking;
  label.textContent = state.voiceInput === false
    ? "Microphone off: this voice service understands text only."
    : on ? (hearing ? "Hearing you…" : state.open ? "Listening…" : "Listening… (connecting)") : "";
  label.hidden = !label.textContent;
  label.classList.toggle("hearing", Boolean(hearing));
}

// The user started speaking: a reply playing stops at once, reporting what was played, as Stop does.
function speechStarted() {
  if (speaking(state.turn)) {
    state.turn.stoppedByVoice = true;
    interrupt();
  }
  let turn = state.heard;
  if (!turn) {
    turn = newTurn("", "reply");
    turn.voice = true;
    turn.status = "hearing";
    state.heard = turn;
    state.follow = true;
    state.log.push(turn);
  }
  clearTimeout(turn.dropTimer);
  turn.speaking = true;
  render(turn);
  updateMic();
}

function speechStopped() {
  const turn = state.heard;
  if (!turn) return;
  turn.speaking = false;
  turn.sentAt = performance.now(); // "Spoke after": from the end of what you said
  // Noise, a cough or silence is never answered (no transcript comes): then the bubble goes.
  turn.dropTimer = setTimeout(() => { if (state.heard === turn) dropHeard(); }, 15000);
  updateMic();
}

function onTranscript(transcript) {
  let turn = state.heard;
  if (!turn) {
    turn = newTurn("", "reply");
    turn.voice = true;
    turn.status = "hearing";
    turn.sentAt = performance.now();
    state.log.push(turn);
  }
  turn.userText = transcript.text.trim();
  if (transcript.isFinal) {
    clearTimeout(turn.dropTimer);
    state.heard = null;
    if (!turn.userText) {
      dropHeard(turn);
      return;
    }
    if (speaking(state.turn)) interrupt();
    turn.id = transcript.turnId;
    turn.status = "sent";
    turn.speaking = false;
    state.turns.set(turn.id, turn);
    state.turn = turn;
    saveLog();
  }
  render(turn);
  updateMic();
  updateButtons();
}

function dropHeard(turn = state.heard) {
  if (!turn) return;
  clearTimeout(turn.dropTimer);
  if (state.heard === turn) state.heard = null;
  state.log = state.log.filter((item) => item !== turn);
  turn.dom?.box.remove();
  updateMic();
}

// -- wiring ---------------------------------------------------------------------------------------

function submit(event) {
  event.preventDefault();
  const input = $("#text");
  const text = input.value.trim();
  if (!text) return;
  const readAloud = $("#read-aloud").checked;
  input.value = "";
  input.focus();
  state.follow = true; // your own message: show it, and what follows
  $("#read-aloud").checked = false; // one message at a time: the next one is a question again
  updateMode();
  clearStatus("session");
  ensureAudio();
  if (speaking(state.turn)) interrupt();
  queueTurn(newTurn(text, readAloud ? "read" : "reply"));
}

function updateMode() {
  const read = $("#read-aloud").checked;
  $("#composer").classList.toggle("reading", read);
  $("#text").placeholder = read ? "Text to read aloud…" : "Ask something…";
  $("#send").textContent = read ? "Read aloud" : "Send";
}

$("#composer").addEventListener("submit", submit);
$("#stop").addEventListener("click", interrupt);
$("#mic").addEventListener("click", () => (state.mic ? micOff() : micOn()));
$("#read-aloud").addEventListener("change", updateMode);
$("#log").addEventListener("scroll", () => {
  const log = $("#log");
  state.follow = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
});
$("#voice").addEventListener("change", () => {
  // The session goes on with the new voice: resume it on a new stream that asks for it.
  saved.set("voice", $("#voice").value);
  state.sessionVoice = "";
  if (state.ws) {
    if (speaking(state.turn)) interrupt();
    state.ws.parley.closing = "voice";
    state.ws.close(1000, "voice changed");
  }
});

// For tests and the curious: the page's audio and session state.
window.parley = {
  state,
  playedMs: () => playedMs(state.turn),
  scheduledMs: () => (state.turn ? state.turn.audioMs : 0),
  contextTime: () => (state.ctx ? state.ctx.currentTime : 0),
  sessionId: () => state.sessionId,
  listening: () => Boolean(state.mic?.node),
};

window.addEventListener("pagehide", saveLog);

restoreLog();
updateMic();
loadVoices();
requestAnimationFrame(tick);
