// The transcript: final utterances with their times (seconds since the transcript began),
// and its text, SubRip (.srt) and WebVTT (.vtt) renderings.

export class Transcript {
  constructor() {
    this.lines = []; // { start, end, text }
  }

  add(start, end, text) {
    // "-->" would end a cue's timing line early in SRT and WebVTT.
    const line = { start, end: Math.max(start, end), text: text.trim().replaceAll("-->", "->") };
    if (line.text) this.lines.push(line);
    return line;
  }

  clear() {
    this.lines = [];
  }

  toText() {
    return this.lines.map((line) => line.text).join("\n") + (this.lines.length ? "\n" : "");
  }

  toSrt() {
    return this.lines
      .map((line, i) => {
        const times = `${timestamp(line.start, ",")} --> ${timestamp(line.end, ",")}`;
        return `${i + 1}\n${times}\n${line.text}\n`;
      })
      .join("\n");
  }

  toVtt() {
    const cues = this.lines.map(
      (line) => `${timestamp(line.start, ".")} --> ${timestamp(line.end, ".")}\n${line.text}\n`,
    );
    return ["WEBVTT\n", ...cues].join("\n");
  }
}

// 3723.5 -> "01:02:03,500" (SRT) or "01:02:03.500" (WebVTT)
export function timestamp(seconds, separator) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  const h = Math.floor(ms / 3600000);
  const m = Math.floor(ms / 60000) % 60;
  const s = Math.floor(ms / 1000) % 60;
  return `${pad(h)}:${pad(m)}:${pad(s)}${separator}${pad(ms % 1000, 3)}`;
}

// 75.2 -> "1:15", for the transcript on screen
export function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
