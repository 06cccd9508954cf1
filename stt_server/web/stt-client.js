// A WebSocket client for stt-server, small enough to copy into your own page.
//
//   const session = new SttSession(socketUrl(), { token, json: false });
//   session.addEventListener("partial", (e) => show(e.detail.text));     // replaces the last
//   session.addEventListener("final", (e) => append(e.detail));          // text, start, end
//   session.addEventListener("closed", (e) => console.log(e.detail));   // see closeAdvice()
//   await session.ready;                  // the server's "session" message arrived
//   session.sendPcm(int16Array);          // 16 kHz mono PCM16
//   session.end();                        // the last "final", then a normal close
//
// Also fired: "open" (the session message), "error" (an error message from the server; the
// close that may follow says what to do). The token travels as the subprotocol
// "bearer.<token>" (browsers cannot set headers on a WebSocket, and a query string may end up
// in access logs).

export const SAMPLE_RATE = 16000;

// Error codes after which the session goes on (README: "Errors, limits and closes").
const NOT_CLOSING = new Set([
  "invalid_message",
  "invalid_audio",
  "device_changed",
  "transcription_failed",
]);

// The server's WebSocket on the page's own host: wss:// for an https:// page. It sits at the
// page's directory, so a page served under /stt/ by a proxy talks to /stt/.
export function socketUrl(page = window.location) {
  const url = new URL(".", page.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

export class SttSession extends EventTarget {
  constructor(url, { token = "", json = false } = {}) {
    super();
    this.json = json;
    this.lastError = null; // the server's last {"type":"error"} message
    this.ws = new WebSocket(url, token ? [`bearer.${token}`] : []);
    this.ws.binaryType = "arraybuffer";
    this.ready = new Promise((resolve, reject) => {
      this.addEventListener("open", (e) => resolve(e.detail), { once: true });
      this.addEventListener("closed", (e) => reject(e.detail), { once: true });
    });
    this.ready.catch(() => {}); // a refusal is reported through "closed" as well
    this.ws.onmessage = (event) => this.#receive(event.data);
    this.ws.onclose = (event) => {
      const detail = { code: event.code, reason: event.reason, error: this.lastError };
      this.#fire("closed", { ...detail, advice: closeAdvice(detail) });
    };
  }

  get isOpen() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  #fire(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #receive(data) {
    if (typeof data !== "string") return;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    switch (message.type) {
      case "session":
        // Binary frames are at the session's rate: make sure it is ours.
        if (!this.json && message.sample_rate !== SAMPLE_RATE) {
          this.#send(JSON.stringify({ type: "config", sample_rate: SAMPLE_RATE }));
        }
        this.#fire("open", message);
        break;
      case "realtime":
        this.#fire("partial", message);
        break;
      case "completed":
        this.#fire("final", message);
        break;
      case "error":
        // Only errors that come with a close explain it; the others are reported and forgotten.
        if (!NOT_CLOSING.has(message.code)) this.lastError = message;
        this.#fire("error", message);
        break;
      default: // clients ignore message types they do not know
    }
  }

  #send(data) {
    if (this.isOpen) this.ws.send(data);
  }

  // 16 kHz mono PCM16 samples: one binary frame, or the JSON message with base64.
  sendPcm(pcm) {
    if (!this.json) {
      this.#send(pcm.buffer.byteLength === pcm.byteLength ? pcm.buffer : pcm.slice().buffer);
      return;
    }
    const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    }
    this.#send(JSON.stringify({ type: "audio", data: btoa(binary), sample_rate: SAMPLE_RATE }));
  }

  flush() {
    this.#send(JSON.stringify({ type: "flush" }));
  }

  // Finalize the open utterance; the server sends its "final", then closes with 1000.
  end() {
    this.#send(JSON.stringify({ type: "end" }));
  }

  close() {
    this.ws.close(1000);
  }
}

// What a client should do after a close: { retry: seconds or null, fatal, message }.
// The close code decides; the server's error message just before it explains, and its
// retry_after hint sets the wait. `retry` is set when trying again makes sense: a busy,
// draining or restarting server, a rate limit that ends, a lost network.
export function closeAdvice({ code, error }) {
  const hint = error?.retry_after ?? null;
  const told = error?.message ? `: ${error.message}` : "";
  switch (code) {
    case 4401:
      return { retry: null, fatal: true, message: "This server needs a valid access token." };
    case 1013:
      return { retry: hint ?? 5, message: `The server is busy${told}.` };
    case 1008:
      if (error?.code === "rate_limited" && hint !== null) {
        return { retry: hint, message: `Rate limited${told}.` };
      }
      return { retry: null, fatal: true, message: `Refused by the server's limits${told}.` };
    case 1001:
    case 1012: // service restart
      return { retry: 1, message: "The server is going away; moving to another one." };
    case 4000:
      return { retry: null, fatal: true, message: `Disconnected by an operator${told}.` };
    case 1000:
      return { retry: null, message: error ? `Session ended${told}.` : "Session ended." };
    case 1006:
      return { retry: 2, message: "Lost the connection to the server." };
    case 1011:
      return { retry: 2, message: `The server failed${told}.` };
    default:
      return { retry: null, fatal: true, message: `The connection closed (${code})${told}.` };
  }
}

// Exponential back-off with jitter for the n-th retry in a row (0, 1, 2…), never sooner than
// the server asked, at most a minute.
export function backoff(attempt, atLeast = 1) {
  const base = Math.min(60, Math.max(atLeast, 2 ** attempt));
  return Math.min(60, Math.max(atLeast, base * (0.8 + 0.4 * Math.random())));
}
