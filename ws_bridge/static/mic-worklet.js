// The page's microphone: turns the capture (the AudioContext's rate, any number of channels) into
// mono PCM16 at `targetRate` and posts it in `chunkMs` chunks (ArrayBuffers of little-endian samples).
// Downsampling is band-limited: each output sample is a windowed-sinc low-pass of the input at the
// output's Nyquist frequency, evaluated at its (fractional) position, so nothing above it aliases.
"use strict";

class ParleyMic extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, chunkMs = 20 } = options.processorOptions || {};
    this.step = sampleRate / targetRate;            // input samples per output sample
    this.cutoff = Math.min(1, 1 / this.step) * 0.92; // of the input's Nyquist: a little below the output's
    this.half = Math.ceil(10 / this.cutoff);         // filter half-width, in input samples
    this.input = new Float32Array(8192);
    this.length = 0;                                 // input samples held
    this.position = this.half;                       // where the next output sample falls in `input`
    this.chunkLength = Math.round((targetRate * chunkMs) / 1000);
    this.chunk = new Int16Array(this.chunkLength);
    this.filled = 0;
    this.port.onmessage = (event) => { if (event.data === "stop") this.stopped = true; };
  }

  push(samples) {
    if (this.length + samples.length > this.input.length) {
      const grown = new Float32Array(Math.max(this.input.length * 2, this.length + samples.length));
      grown.set(this.input.subarray(0, this.length));
      this.input = grown;
    }
    this.input.set(samples, this.length);
    this.length += samples.length;
  }

  sample(at) {
    const { input, half, cutoff } = this;
    let sum = 0;
    for (let k = Math.ceil(at - half); k <= Math.floor(at + half); k++) {
      const d = at - k;
      const x = Math.PI * cutoff * d;
      const sinc = x === 0 ? 1 : Math.sin(x) / x;
      const window = 0.42 + 0.5 * Math.cos((Math.PI * d) / half) + 0.08 * Math.cos((2 * Math.PI * d) / half);
      sum += input[k] * sinc * window;
    }
    return sum * cutoff;
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.chunk[this.filled++] = clipped < 0 ? clipped * 32768 : clipped * 32767;
    if (this.filled === this.chunkLength) {
      const out = this.chunk.buffer;
      this.port.postMessage(out, [out]); // (transferred: `out` is empty now)
      this.chunk = new Int16Array(this.chunkLength);
      this.filled = 0;
    }
  }

  process(inputs) {
    if (this.stopped) return false;
    const channels = inputs[0];
    if (!channels || !channels.length) return true;
    const frames = channels[0].length;
    const mono = new Float32Array(frames);
    for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i] / channels.length;
    this.push(mono);
    while (this.position + this.half < this.length) {
      this.emit(this.sample(this.position));
      this.position += this.step;
    }
    // Keep only what the next output samples still need.
    const drop = Math.max(0, Math.floor(this.position - this.half) - 1);
    if (drop > 0) {
      this.input.copyWithin(0, drop, this.length);
      this.length -= drop;
      this.position -= drop;
    }
    return true;
  }
}

registerProcessor("parley-mic", ParleyMic);
