#!/usr/bin/env node
// Parley from Node.js: ask a question over one Converse stream, print the captions as they
// stream, write the spoken reply to a WAV file, and print the turn's timings.
//
//   node client.js "Why is the sky blue?" [--server localhost:50051] [--out reply.wav] [--rate 16000] [--voice ID]
import { writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = resolve(here, "../../protos");

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    server: { type: "string", default: process.env.PARLEY_SERVER || "localhost:50051" },
    out: { type: "string", default: "reply.wav" },
    rate: { type: "string", default: "0" },
    voice: { type: "string", default: "" },
    speak: { type: "boolean", default: false },
  },
});
const question = positionals.join(" ");
if (!question) {
  console.error('usage: node client.js "question" [--server host:port] [--out reply.wav] [--rate hz] [--voice id] [--speak]');
  process.exit(2);
}

// The .proto is the contract: load it as is, keeping field names as written (snake_case).
const definition = protoLoader.loadSync("parley/v1/voice.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { parley } = grpc.loadPackageDefinition(definition);
const client = new parley.v1.VoiceService(values.server, grpc.credentials.createInsecure());

const call = client.Converse();
const pcm = [];
let sampleRate = 0;

call.on("data", (response) => {
  switch (response.kind) {
    case "session_started":
      sampleRate = response.session_started.audio.sample_rate_hz;
      console.error(`[session ${response.session_started.session_id}: voice ${response.session_started.voice}, ${sampleRate} Hz]`);
      break;
    case "text_delta":
      process.stdout.write(response.text_delta.text);
      break;
    case "audio":
      pcm.push(response.audio.data);
      break;
    case "turn_ended": {
      const ended = response.turn_ended;
      const t = ended.timings;
      process.stdout.write("\n");
      const audio = Buffer.concat(pcm);
      if (audio.length) writeFileSync(values.out, wav(audio, sampleRate));
      console.error(
        `[${ended.reason.replace("TURN_END_REASON_", "").toLowerCase()}: first token ${t.first_llm_token_ms} ms, ` +
          `first audio ${t.first_audio_ms} ms, total ${t.total_ms} ms, ` +
          `${(t.audio_duration_ms / 1000).toFixed(1)} s of speech${audio.length ? `, audio in ${values.out}` : ""}]`,
      );
      if (ended.error) {
        console.error(`[turn failed: ${ended.error}]`);
        process.exitCode = 1;
      }
      call.end(); // half-close: the service then ends the stream with OK
      break;
    }
  }
});

call.on("error", (error) => {
  const hint = error.code === grpc.status.UNAVAILABLE ? " (is the service running?)" : "";
  console.error(`error: ${grpc.status[error.code] ?? error.code}: ${error.details}${hint}`);
  process.exitCode = 1;
});

call.on("end", () => client.close());

call.write({
  start: { voice: values.voice, audio: { encoding: "AUDIO_ENCODING_PCM16", sample_rate_hz: Number(values.rate) } },
});
if (values.speak) call.write({ speak_text: { text: question, flush: true } });
else call.write({ user_text: { text: question } });

// A 44-byte RIFF header for mono 16-bit PCM, then the samples.
function wav(samples, rate) {
  const header = Buffer.alloc(44);
  header.write("RIFF", 0);
  header.writeUInt32LE(36 + samples.length, 4);
  header.write("WAVEfmt ", 8);
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20);
  header.writeUInt16LE(1, 22);
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * 2, 28);
  header.writeUInt16LE(2, 32);
  header.writeUInt16LE(16, 34);
  header.write("data", 36);
  header.writeUInt32LE(samples.length, 40);
  return Buffer.concat([header, samples]);
}
