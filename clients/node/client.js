#!/usr/bin/env node
// Parley from Node.js: ask a question over one Converse stream, print the captions as they
// stream, write the spoken reply to a WAV file, and print the turn's timings.
//
//   node client.js "Why is the sky blue?" [--server localhost:50051] [--out reply.wav] [--rate 16000] [--voice ID]
//                  [--encoding pcm16|wav|ogg_opus|mp3|mulaw|alaw]
//
// Copied elsewhere (with package.json, then `npm ci`), it needs the contract: --protos names the
// folder that holds parley/v1/voice.proto, or the .proto file itself.
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const PROTO_FILE = "parley/v1/voice.proto";
const USAGE = `usage: node client.js [options] QUESTION...

Ask Parley a question (the words are joined; quotes are optional): the captions stream to stdout,
the spoken reply is written as a WAV file, the timings go to stderr.

options:
  --server HOST:PORT  the service (env PARLEY_SERVER; default localhost:50051)
  --out FILE          the file to write (default reply.wav; reply.ogg, reply.mp3, ... for --encoding)
  --rate HZ           sample rate, 8000 to 48000 (default: the voice's own)
  --encoding NAME     the audio the service sends: pcm16 (default, written as WAV), wav, ogg_opus,
                      mp3, mulaw or alaw (the turn's bytes written as they came)
  --voice ID          voice (default: the service's)
  --token KEY         an API key of the service, sent as authorization: Bearer (env PARLEY_TOKEN)
  --tls               connect with TLS, trusting the system's CAs
  --ca-file PEM       connect with TLS, trusting the CA certificates in PEM
  --speak             read QUESTION aloud instead of asking the LLM
  --protos PATH       the folder holding ${PROTO_FILE}, or that file itself
                      (default: this repository's protos/, ../../protos from client.js)
  -h, --help          show this and exit`;

function usageError(message) {
  console.error(`${USAGE}\n\nerror: ${message}`);
  process.exit(2);
}

let values, positionals;
try {
  ({ values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      server: { type: "string", default: process.env.PARLEY_SERVER || "localhost:50051" },
      out: { type: "string" },
      encoding: { type: "string", default: "pcm16" },
      token: { type: "string", default: process.env.PARLEY_TOKEN || "" },
      tls: { type: "boolean", default: false },
      "ca-file": { type: "string" },
      rate: { type: "string", default: "0" },
      voice: { type: "string", default: "" },
      speak: { type: "boolean", default: false },
      protos: { type: "string", default: resolve(here, "../../protos") },
      help: { type: "boolean", short: "h", default: false },
    },
  }));
} catch (error) {
  usageError(error.message); // an unknown option, or one without its value
}
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
const EXTENSIONS = { pcm16: "wav", wav: "wav", ogg_opus: "ogg", mp3: "mp3", mulaw: "ulaw", alaw: "alaw" };
if (!(values.encoding in EXTENSIONS)) {
  usageError(`--encoding ${values.encoding} is not one of ${Object.keys(EXTENSIONS).join(", ")}`);
}
values.out ??= `reply.${EXTENSIONS[values.encoding]}`;
const question = positionals.join(" ");
if (!question.trim()) usageError("give the question to ask");
const rate = Number(values.rate);
if (!Number.isInteger(rate) || (rate !== 0 && (rate < 8000 || rate > 48000))) {
  usageError(`--rate ${values.rate} is not a sample rate: give 8000 to 48000 Hz, or 0 for the voice's own`);
}

// Imported here rather than above, so that --help works, and a missing `npm ci` is said plainly.
let grpc, protoLoader;
try {
  grpc = await import("@grpc/grpc-js");
  protoLoader = await import("@grpc/proto-loader");
} catch (error) {
  console.error(`error: ${error.message}\n(run \`npm ci\` in the folder of client.js and package.json first)`);
  process.exit(1);
}

// The .proto is the contract: load it as is, keeping field names as written (snake_case).
function loadContract(path) {
  const isFile = existsSync(path) && statSync(path).isFile();
  const file = isFile ? resolve(path) : join(path, PROTO_FILE);
  if (!existsSync(file)) {
    usageError(
      `cannot find ${file}: pass --protos with the folder that holds ${PROTO_FILE} ` +
        "(the protos/ folder of the Parley repository), or with that file",
    );
  }
  try {
    return protoLoader.loadSync(file, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  } catch (error) {
    console.error(`error: cannot read ${file}: ${error.message}`);
    process.exit(1);
  }
}
const definition = loadContract(values.protos);
const { parley } = grpc.loadPackageDefinition(definition);
let client;
try {
  let credentials = grpc.credentials.createInsecure();
  if (values.tls || values["ca-file"]) {
    let ca = null;
    if (values["ca-file"]) {
      try {
        ca = readFileSync(values["ca-file"]);
      } catch (error) {
        usageError(`--ca-file ${values["ca-file"]}: ${error.message}`);
      }
    }
    credentials = grpc.credentials.createSsl(ca);
  }
  client = new parley.v1.VoiceService(values.server, credentials);
} catch (error) {
  usageError(`--server ${JSON.stringify(values.server)} is not an address: ${error.message}`);
}

const metadata = new grpc.Metadata();
if (values.token) metadata.set("authorization", `Bearer ${values.token}`);
const call = client.Converse(metadata);
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
      let saved = audio.length > 0;
      if (saved) {
        try {
          // PCM16 gets a WAV header; the other encodings' bytes are already a file of their format.
          writeFileSync(values.out, values.encoding === "pcm16" ? wav(audio, sampleRate) : audio);
        } catch (error) {
          console.error(`error: cannot write the reply to ${values.out}: ${error.message}`);
          process.exitCode = 1;
          saved = false;
        }
      }
      console.error(
        `[${ended.reason.replace("TURN_END_REASON_", "").toLowerCase()}: first token ${t.first_llm_token_ms} ms, ` +
          `first audio ${t.first_audio_ms} ms, total ${t.total_ms} ms, ` +
          `${(t.audio_duration_ms / 1000).toFixed(1)} s of speech${saved ? `, audio in ${values.out}` : ""}]`,
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
  start: {
    voice: values.voice,
    audio: { encoding: `AUDIO_ENCODING_${values.encoding.toUpperCase()}`, sample_rate_hz: rate },
  },
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
