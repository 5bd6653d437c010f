// The dashboard's link to the fleet server: the token (sessionStorage, never a URL), JSON calls
// with an `Authorization: Bearer` header, and the live stream read with fetch() + ReadableStream
// (EventSource cannot send headers).

const KEY = "modelfleet.token";

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(t) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body, contentType) {
  const headers = { Authorization: "Bearer " + (token() || "") };
  if (contentType) headers["Content-Type"] = contentType;
  const resp = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit" });
  const text = await resp.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, (json && json.error) || resp.statusText || "request failed");
  }
  return json;
}

export const get = (path) => call("GET", path);
export const postJson = (path, value) =>
  call("POST", path, JSON.stringify(value === undefined ? {} : value), "application/json");
export const postBytes = (path, bytes) => call("POST", path, bytes, "application/octet-stream");

// Reads GET /api/v1/stream and calls onEvent(name, data) for each server-sent event; reconnects
// after a pause when the connection drops. Returns a function that stops it.
export function stream(onEvent, onState) {
  let stopped = false;
  let controller = null;
  async function run() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const resp = await fetch("/api/v1/stream", {
          headers: { Authorization: "Bearer " + (token() || ""), Accept: "text/event-stream" },
          signal: controller.signal,
          cache: "no-store",
          credentials: "omit",
        });
        if (!resp.ok || !resp.body) throw new ApiError(resp.status, "stream refused");
        onState(true);
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (data.length) {
              let parsed = null;
              try {
                parsed = JSON.parse(data.join("\n"));
              } catch (_) {
                parsed = data.join("\n");
              }
              onEvent(name, parsed);
            }
          }
        }
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status === 401) {
          onState(false);
          return;
        }
      }
      onState(false);
      if (!stopped) await new Promise((r) => setTimeout(r, 2000));
    }
  }
  run();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}
