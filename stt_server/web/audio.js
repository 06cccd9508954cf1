// Audio sources for the page. Both deliver 16 kHz mono PCM16 (Int16Array) in 100 ms chunks,
// with a loudness from 0 to 1 for a level meter:
//   openMicrophone(onChunk)          the microphone, through an AudioWorklet (pcm-worklet.js)
//   decodeFile(file) + streamSamples(samples, speed, onChunk, …)   a file, paced

export const SAMPLE_RATE = 16000;
const CHUNK = SAMPLE_RATE / 10;

// Starts capturing. Resolves to { stop(), context } once audio flows; rejects with the
// browser's error (NotAllowedError when the user refused, NotFoundError without a microphone).
export async function openMicrophone(onChunk) {
  // Browser defaults otherwise: echo cancellation and noise suppression suit speech.
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  const context = new AudioContext();
  try {
    await context.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(stream);
    const worklet = new AudioWorkletNode(context, "pcm16-downsampler");
    worklet.port.onmessage = ({ data }) => onChunk(new Int16Array(data.pcm), data.level);
    source.connect(worklet);
    worklet.connect(context.destination); // it outputs silence; this keeps it pulled everywhere
    // Without a click on the page first, autoplay rules keep the context suspended and
    // resume() pending until one comes: wait a moment, the caller checks context.state.
    const resumed = context.resume().catch(() => {});
    await Promise.race([resumed, new Promise((resolve) => setTimeout(resolve, 500))]);
  } catch (error) {
    stream.getTracks().forEach((track) => track.stop());
    context.close();
    throw error;
  }
  let stopped = false;
  return {
    context,
    stop() {
      if (stopped) return;
      stopped = true;
      stream.getTracks().forEach((track) => track.stop());
      context.close();
    },
  };
}

// Decodes a file (WAV, MP3, Ogg, Opus, FLAC, AAC, a video's sound track: whatever this
// browser knows) straight to 16 kHz mono samples; the browser resamples while decoding.
export async function decodeFile(file) {
  const data = await file.arrayBuffer();
  const context = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  const decoded = await context.decodeAudioData(data);
  const mono = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
  }
  return mono;
}

export function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  let sumSquares = 0;
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    sumSquares += s * s;
    pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  const rms = Math.sqrt(sumSquares / Math.max(1, samples.length));
  return { pcm, level: Math.max(0, Math.min(1, 1 + (20 * Math.log10(rms + 1e-9)) / 60)) };
}

// Sends `samples` in 100 ms chunks at `speed` times real time: onChunk(pcm, level, progress).
// Before each batch it awaits ready() (the connection), and the pace restarts from there, so
// a reconnect costs time, not audio. Late timers (background tabs run them once a second)
// are caught up. Resolves when all is sent or `signal` aborts.
export async function streamSamples(samples, speed, onChunk, { signal, ready }) {
  let started = performance.now();
  let startedAt = 0; // samples sent when `started` was taken
  let sent = 0;
  while (sent < samples.length && !signal.aborted) {
    const before = performance.now();
    await ready();
    if (performance.now() - before > 50) {
      started = performance.now();
      startedAt = sent;
    }
    const due = startedAt + ((performance.now() - started) / 1000) * speed * SAMPLE_RATE + CHUNK;
    while (sent < Math.min(due, samples.length) && !signal.aborted) {
      const { pcm, level } = toPcm16(samples.subarray(sent, sent + CHUNK));
      sent += pcm.length;
      onChunk(pcm, level, sent / samples.length);
    }
    await new Promise((resolve) => setTimeout(resolve, 100 / speed));
  }
}
