// AudioWorklet processor: the microphone at the audio context's rate (usually 48 kHz) in,
// 16 kHz mono PCM16 out, in chunks of 100 ms posted to the page with their loudness.
//
// Resampling is a windowed-sinc low-pass evaluated at each output instant (a polyphase table
// of 64 fractional phases), so it works for any input rate (44.1 kHz included) and does not
// fold the 8-24 kHz band back into speech the way dropping samples would.

const TARGET_RATE = 16000;
const CHUNK = 1600; // samples per message: 100 ms at 16 kHz
const ZERO_CROSSINGS = 8; // of the sinc, on each side: longer = sharper filter, more work
const PHASES = 64;

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const cutoff = 0.45 * Math.min(1, outRate / inRate); // cycles per input sample
    this.half = Math.ceil(ZERO_CROSSINGS / (2 * cutoff)); // taps on each side
    const taps = 2 * this.half;
    this.table = [];
    for (let p = 0; p <= PHASES; p++) {
      const row = new Float32Array(taps);
      let sum = 0;
      for (let j = 0; j < taps; j++) {
        const x = j - this.half + 1 - p / PHASES; // distance from the output instant
        const arg = 2 * cutoff * x;
        const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
        const w = 0.42 + 0.5 * Math.cos((Math.PI * x) / this.half) +
          0.08 * Math.cos((2 * Math.PI * x) / this.half); // Blackman
        row[j] = Math.abs(x) < this.half ? sinc * w : 0;
        sum += row[j];
      }
      for (let j = 0; j < taps; j++) row[j] /= sum; // unity gain at DC for every phase
      this.table.push(row);
    }
    // Pending input, starting with half-1 samples of silence so the first output has history.
    this.buffer = new Float32Array(4096 + 2 * taps);
    this.length = this.half - 1;
    this.time = this.half - 1; // position of the next output sample in `buffer`
  }

  // Feed input samples; calls emit(sample) for every output sample that is now complete.
  process(input, emit) {
    if (this.length + input.length > this.buffer.length) {
      const bigger = new Float32Array(2 * (this.length + input.length));
      bigger.set(this.buffer.subarray(0, this.length));
      this.buffer = bigger;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const taps = 2 * this.half;
    while (Math.floor(this.time) + this.half < this.length) {
      const i = Math.floor(this.time);
      const row = this.table[Math.round((this.time - i) * PHASES)];
      const start = i - this.half + 1;
      let y = 0;
      for (let j = 0; j < taps; j++) y += this.buffer[start + j] * row[j];
      emit(y);
      this.time += this.step;
    }
    const keepFrom = Math.floor(this.time) - this.half + 1;
    if (keepFrom > 0) {
      this.buffer.copyWithin(0, keepFrom, this.length);
      this.length -= keepFrom;
      this.time -= keepFrom;
    }
  }
}

class Pcm16Downsampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, TARGET_RATE); // sampleRate: the context's
    this.mono = new Float32Array(128);
    this.chunk = new Int16Array(CHUNK);
    this.filled = 0;
    this.sumSquares = 0;
    this.emit = (y) => {
      const s = Math.max(-1, Math.min(1, y));
      this.sumSquares += s * s;
      this.chunk[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === CHUNK) this.flush();
    };
  }

  flush() {
    const rms = Math.sqrt(this.sumSquares / CHUNK);
    // Loudness on a 60 dB scale, 0 (silence) to 1 (full scale), for a level meter.
    const level = Math.max(0, Math.min(1, 1 + (20 * Math.log10(rms + 1e-9)) / 60));
    this.port.postMessage({ pcm: this.chunk.buffer, level }, [this.chunk.buffer]);
    this.chunk = new Int16Array(CHUNK);
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels.length > 0) {
      const frames = channels[0].length;
      if (this.mono.length !== frames) this.mono = new Float32Array(frames);
      this.mono.fill(0);
      for (const channel of channels) {
        for (let i = 0; i < frames; i++) this.mono[i] += channel[i] / channels.length;
      }
      this.resampler.process(this.mono, this.emit);
    }
    return true; // keep running while the microphone is connected
  }
}

registerProcessor("pcm16-downsampler", Pcm16Downsampler);
