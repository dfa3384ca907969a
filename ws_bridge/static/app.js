// Parley demo page: one WebSocket to the bridge, gapless playback with scheduled AudioBuffers,
// captions revealed segment by segment as their audio plays, barge-in with the milliseconds heard.
// Frame protocol: see the README ("The WebSocket bridge").
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  ws: null,
  ready: null,        // a promise resolved by session_started
  ctx: null,          // the AudioContext (made on the first send: browsers need a gesture)
  rate: 24000,
  nextTime: 0,        // where the next audio chunk starts on the context's clock
  turn: null,         // the turn being spoken
  turns: new Map(),   // every turn of the session by id (an interrupted one still gets its end)
  turnCount: 0,
};

// -- status and page ---------------------------------------------------------------------------

function showStatus(text, kind = "error") {
  const status = $("#status");
  status.textContent = text;
  status.className = kind;
  status.hidden = !text;
}

function bubble(kind, text = "") {
  $(".hint")?.remove();
  const node = document.createElement("div");
  node.className = `bubble ${kind}`;
  node.textContent = text;
  $("#log").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function loadVoices() {
  const select = $("#voice");
  try {
    const response = await fetch("/voices");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error?.message || response.statusText);
    select.replaceChildren(...body.voices.map((voice) => {
      const option = new Option(`${voice.id} (${voice.language})`, voice.id);
      option.selected = voice.id === body.defaultVoice;
      return option;
    }));
    showStatus("");
  } catch (error) {
    select.replaceChildren(new Option("unavailable", ""));
    showStatus(`The voice service is unreachable (${error.message}). Is it running?`);
  }
}

// -- the connection ----------------------------------------------------------------------------

function connect() {
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.ready = new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({
      start: { voice: $("#voice").value, audio: { encoding: "AUDIO_ENCODING_PCM16", sampleRateHz: state.rate } },
    }));
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return onAudio(event.data);
      const message = JSON.parse(event.data);
      if (message.sessionStarted) {
        state.rate = message.sessionStarted.audio.sampleRateHz;
        resolve();
      }
      onMessage(message);
    };
    ws.onerror = () => reject(new Error("cannot reach the Parley bridge"));
    ws.onclose = (event) => {
      if (state.ws === ws) state.ws = null;
      reject(new Error(event.reason || "the connection closed"));
      if (event.code !== 1000 && event.code !== 1001) {
        showStatus(`Disconnected (${event.code}): ${event.reason || "the bridge went away"}. Send again to reconnect.`);
      }
      for (const turn of state.turns.values()) {
        finishTurn(turn, { reason: "TURN_END_REASON_FAILED", error: event.reason || "disconnected" });
      }
      state.turns.clear();
    };
  });
  return state.ready;
}

async function connected() {
  if (state.ws && state.ws.readyState <= WebSocket.OPEN) return state.ready;
  return connect();
}

function send(message) {
  state.ws.send(JSON.stringify(message));
}

// -- turns --------------------------------------------------------------------------------------

function newTurn(text, readAloud) {
  bubble("user", text);
  const node = bubble("assistant");
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.textContent = "…";
  node.append(typing);
  state.turnCount += 1;
  return {
    id: `web-${Date.now().toString(36)}-${state.turnCount}`,
    node, typing, readAloud,
    segments: [],       // {index, startMs, span}
    chunks: [],         // {start, duration} on the context clock
    audioMs: 0,
    stopped: false,
    ended: null,
    sentAt: performance.now(),
  };
}

function onMessage(message) {
  if (message.error) {
    showStatus(message.error.message);
    return;
  }
  const body = message.textDelta || message.segment || message.turnEnded;
  const turn = body && state.turns.get(body.turnId);
  if (!turn) return;
  if (message.segment && !turn.stopped) {
    const span = document.createElement("span");
    span.className = "segment pending";
    span.textContent = (turn.segments.length ? " " : "") + message.segment.text;
    turn.node.insertBefore(span, turn.typing);
    turn.segments.push({ index: message.segment.index, startMs: Number(message.segment.startMs), span });
  } else if (message.turnEnded) {
    finishTurn(turn, message.turnEnded);
  }
}

function finishTurn(turn, ended) {
  if (!turn || turn.ended) return;
  turn.ended = ended;
  turn.typing.remove();
  const reason = ended.reason || "";
  if (reason.endsWith("INTERRUPTED")) {
    // Keep only what was heard: the service cut the reply at the milliseconds we played.
    turn.node.textContent = ended.spokenText || "";
    turn.node.classList.toggle("empty", !ended.spokenText);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const timings = ended.timings || {};
  if (reason.endsWith("FAILED")) {
    meta.classList.add("failed");
    meta.textContent = `failed: ${ended.error || "unknown error"}`;
  } else {
    const parts = [];
    if (timings.firstAudioMs && Number(timings.firstAudioMs) > 0) parts.push(`first audio ${timings.firstAudioMs} ms`);
    if (timings.totalMs) parts.push(`total ${timings.totalMs} ms`);
    if (reason.endsWith("INTERRUPTED")) parts.push("interrupted");
    meta.textContent = parts.join(" · ");
  }
  turn.node.after(meta);
  meta.scrollIntoView({ block: "end" });
  updateButtons();
}

// -- audio --------------------------------------------------------------------------------------

function ensureAudio() {
  if (!state.ctx) {
    let ctx = new AudioContext();
    const rate = Math.min(48000, Math.max(8000, ctx.sampleRate));
    if (rate !== ctx.sampleRate) {
      ctx.close();
      ctx = new AudioContext({ sampleRate: rate });
    }
    state.ctx = ctx;
    state.rate = rate;
  }
  if (state.ctx.state === "suspended") state.ctx.resume();
}

function onAudio(buffer) {
  const view = new DataView(buffer);
  const headerLength = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headerLength)));
  const turn = state.turn;
  if (!turn || turn.stopped || header.turnId !== turn.id) return;
  const pcm = new Int16Array(buffer.slice(4 + headerLength));
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
  turn.chunks.push({ start, duration: audio.duration, source });
  turn.audioMs += audio.duration * 1000;
  updateButtons();
}

function playedMs(turn) {
  if (!turn || !state.ctx) return 0;
  const now = state.ctx.currentTime;
  let played = 0;
  for (const chunk of turn.chunks) played += Math.min(Math.max(now - chunk.start, 0), chunk.duration);
  return played * 1000;
}

function speaking(turn) {
  return Boolean(turn && !turn.stopped && (!turn.ended || playedMs(turn) < turn.audioMs - 1));
}

function interrupt() {
  const turn = state.turn;
  if (!turn || turn.stopped) return;
  const played = Math.round(playedMs(turn));
  turn.stopped = true;
  for (const chunk of turn.chunks) {
    try { chunk.source.stop(); } catch { /* not started yet */ }
  }
  state.nextTime = 0;
  highlight(turn, played);
  if (state.ws && state.ws.readyState === WebSocket.OPEN) send({ interrupt: { playedMs: played } });
  if (turn.ended) {
    // The service had finished; the reply is cut to what was heard all the same.
    turn.node.querySelectorAll(".segment.pending").forEach((span) => span.remove());
  }
  updateButtons();
}

// Reveal each segment when its audio starts; highlight the one playing.
function highlight(turn, played) {
  let active = null;
  for (const segment of turn.segments) {
    const reached = segment.startMs <= played && (segment.startMs < turn.audioMs || turn.ended);
    segment.span.classList.toggle("pending", !reached);
    if (reached) active = segment;
  }
  for (const segment of turn.segments) {
    segment.span.classList.toggle("active", segment === active && speaking(turn));
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

// -- wiring -------------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  const input = $("#text");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  ensureAudio();
  if (speaking(state.turn)) interrupt();
  try {
    await connected();
  } catch (error) {
    showStatus(`Cannot start a conversation: ${error.message}.`);
    return;
  }
  showStatus("");
  const readAloud = $("#read-aloud").checked;
  const turn = newTurn(text, readAloud);
  state.turn = turn;
  state.turns.set(turn.id, turn);
  if (readAloud) send({ speakText: { text, flush: true, turnId: turn.id } });
  else send({ userText: { text, turnId: turn.id } });
  updateButtons();
}

$("#composer").addEventListener("submit", submit);
$("#stop").addEventListener("click", interrupt);
$("#voice").addEventListener("change", () => {
  // A voice belongs to a session: the next message starts a new one.
  if (state.ws) state.ws.close(1000, "voice changed");
  state.ws = null;
});

// For tests and the curious: the page's audio state.
window.parley = {
  state,
  playedMs: () => playedMs(state.turn),
  scheduledMs: () => (state.turn ? state.turn.audioMs : 0),
  contextTime: () => (state.ctx ? state.ctx.currentTime : 0),
};

loadVoices();
requestAnimationFrame(tick);
