// sisyphus.js: the browser client of Sisyphus, one dependency-free ES module.
//
//   import { connect } from "https://push.example/sisyphus.js";
//   const sub = connect("https://push.example/", { token, tokenProvider, onMessage, onStatus, onReset });
//   sub.close();
//
// What it owns: reading one event stream (fetch, parsed here, so the service's
// `retry:` hints and the last id are ours to use), keep-alives, statuses, token
// refresh, reconnects with backoff, and sharing one stream between the tabs of an
// origin (Web Locks elect the tab that holds it, BroadcastChannel carries its events).
// It speaks the JSON flavour (`format=json`): statuses carry reasons, messages channels.
// See docs/browser.md.

const TOKEN_REASONS = new Set(["expired", "invalid_token", "not_yet_valid", "missing_token"]);
const STOPPING = new Set(["failure", "disconnected"]);
const XML_STATUS = /^<message><status>([a-z_]+)<\/status><\/message>$/;
// <epoch>-<seq>-<time>; on a Redis Cluster, one seq per sequence group: <s0>.<s1>...
const EVENT_ID = /^([0-9a-z]{1,16})-(\d{1,19}(?:\.\d{1,19}){0,63})-\d{1,12}$/;
const FIRST_RETRY_MS = 1000; // before the service hinted anything
const MAX_BACKOFF_MS = 60000;
const HELLO_WAIT_MS = 150; // a new holder asks the other tabs how far they got
const MAX_REFRESHES = 2; // token refreshes in a row without an `ok` before giving up
const CATCH_WAIT_MS = 10000; // a joining tab waits at most this long for its replay

/** Open a stream (or join the one another tab of this origin holds). */
export function connect(url, options = {}) {
  return new Subscription(String(url), options);
}

function parseId(id) {
  const match = typeof id === "string" ? EVENT_ID.exec(id) : null;
  return match ? { epoch: match[1], seqs: match[2].split(".").map(BigInt) } : null;
}

// Whether position `a` is at or before `b` in every group (the same epoch, the same
// groups): everything up to `a` is also up to `b`.
function atOrBefore(a, b) {
  return a.epoch === b.epoch && a.seqs.length === b.seqs.length &&
    a.seqs.every((seq, group) => seq <= b.seqs[group]);
}

// The id of the later of two positions, group by group: one of the ids when it is at
// or after the other, else one made of the higher seq of each group.
function laterId(a, aId, b, bId) {
  if (atOrBefore(b, a)) return aId;
  if (atOrBefore(a, b)) return bId;
  const seqs = a.seqs.map((seq, group) => (seq > b.seqs[group] ? seq : b.seqs[group]));
  return `${a.epoch}-${seqs.join(".")}-0`;
}

// The id of the earlier of two positions, group by group: one of the ids when it is
// at or before the other, else one made of the lower seq of each group.
function earlierId(a, aId, b, bId) {
  if (atOrBefore(a, b)) return aId;
  if (atOrBefore(b, a)) return bId;
  const seqs = a.seqs.map((seq, group) => (seq < b.seqs[group] ? seq : b.seqs[group]));
  return `${a.epoch}-${seqs.join(".")}-0`;
}

function jittered(ms) {
  return Math.round(ms * (1 + Math.random() * 0.5));
}

function randomWord() {
  return Math.random().toString(36).slice(2, 10);
}

// The stream URL without what differs from page to page (a rendered position, a token):
// the rest names the stream the tabs share. Those two become options when not given.
function splitUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  let target;
  try {
    target = new URL(url, base);
  } catch {
    return { url, lastEventId: null, token: null };
  }
  const lastEventId = target.searchParams.get("lastEventId");
  const token = target.searchParams.get("token");
  target.searchParams.delete("lastEventId");
  target.searchParams.delete("token");
  return { url: target.href, lastEventId, token };
}

class Subscription {
  constructor(url, options) {
    const split = splitUrl(url);
    this._url = split.url;
    this._options = options;
    this._token = options.token ?? split.token ?? null;
    this._tabId = randomWord();
    this._closed = false;
    this._stopped = false;
    this._state = "connecting";
    this._leader = false;
    // What this tab has: the position (epoch, seq) of the last event it delivered (or
    // of the lastEventId it was given, or the holder's when it joined), and its id.
    this._lastId = options.lastEventId || split.lastEventId || null;
    this._pos = parseId(this._lastId);
    // The state-changing status last delivered (a joining tab gets the holder's).
    this._lastStatus = null;
    // Where this tab's next stream starts: the last id its previous stream sent.
    this._resume = this._lastId;
    // A joining tab's position while it waits for the replay from there (see _caught).
    this._catching = null;
    this._catchTimer = null;
    this._abort = null; // the running fetch's AbortController
    this._rewinding = false; // that fetch was aborted to read again from further back
    this._timer = null;
    this._wake = null;
    this._release = null;
    this._gathered = null;
    this._channel = null;
    this._lockAbort = null;
    const shared =
      options.shareTabs !== false &&
      typeof BroadcastChannel === "function" &&
      typeof navigator !== "undefined" &&
      navigator.locks &&
      typeof navigator.locks.request === "function";
    if (shared) {
      this._share();
    } else {
      this._run();
    }
  }

  /** "connecting", "open" (an `ok` arrived, here or in the tab holding the stream) or "closed". */
  get state() {
    return this._state;
  }

  /** Whether this tab holds the stream (the others get its events). */
  get leader() {
    return this._leader;
  }

  /** This tab's position: the id of the last event it delivered (see `_pos`). */
  get lastEventId() {
    return this._lastId;
  }

  close() {
    if (this._closed) return;
    this._halt();
    this._closed = true;
    if (this._channel) this._channel.close();
  }

  // Stop for good (close(), a final status, a refused token this tab can't refresh):
  // end the stream, and give the lock up so that another tab can take the stream over.
  _halt() {
    this._stopped = true;
    this._state = "closed";
    this._leader = false;
    if (this._abort) this._abort.abort();
    if (this._lockAbort) this._lockAbort.abort();
    clearTimeout(this._timer);
    this._caughtUp();
    if (this._wake) this._wake();
    if (this._release) this._release();
  }

  // Tab sharing --------------------------------------------------------------
  //
  // On the channel: "hello" (a tab joins; the holder answers "here" with its position
  // and status), "ask" (a new holder asks every tab for its position, answered "here"),
  // and "event" (each event the holder's stream sent, in order, whether or not the
  // holder itself had it already: a tab that lacks it delivers it, the others drop it).
  _share() {
    const name = "sisyphus " + this._url;
    this._channel = new BroadcastChannel(name);
    this._channel.onmessage = (event) => this._onBroadcast(event.data);
    this._lockAbort = new AbortController();
    // A tab with a position may be behind the stream: until its replay begins (or the
    // holder says none is needed), the holder's live events are ahead of what it lacks.
    if (this._pos) {
      this._catching = this._pos;
      this._catchTimer = setTimeout(() => this._caughtUp(), CATCH_WAIT_MS);
    }
    this._post({ t: "hello", from: this._tabId, id: this._lastId });
    navigator.locks
      .request(name, { signal: this._lockAbort.signal }, () => this._hold())
      .catch(() => {}); // aborted by close() or a stop while waiting
  }

  async _hold() {
    if (this._stopped) return;
    this._leader = true;
    this._caughtUp(); // its own stream resumes from its position (or before)
    const held = new Promise((resolve) => (this._release = resolve));
    // The tabs may be at different positions (one joined with an older lastEventId,
    // the old holder's last broadcasts reached some only; this one may have none): resume
    // from the least of them, so that every tab gets what it lacks; each drops what it
    // already has.
    this._gathered = [];
    this._post({ t: "ask", from: this._tabId });
    await new Promise((resolve) => setTimeout(resolve, HELLO_WAIT_MS));
    const ids = [this._lastId, ...this._gathered];
    this._gathered = null;
    let least = null;
    for (const id of ids) {
      const pos = parseId(id);
      if (!pos) continue;
      if (!least) {
        this._resume = id;
      } else if (pos.epoch === least.epoch && pos.seqs.length === least.seqs.length) {
        this._resume = earlierId(pos, id, least, this._resume);
      } else {
        continue;
      }
      least = parseId(this._resume);
    }
    if (!least) this._resume = this._lastId;
    if (!this._stopped) this._run();
    await held; // the lock is held until this tab stops (or goes away)
  }

  _post(message) {
    if (this._channel && !this._closed) this._channel.postMessage(message);
  }

  _onBroadcast(message) {
    if (this._stopped || !message) return;
    if (message.t === "event") {
      this._deliver(message.e, false);
    } else if (message.t === "hello" || message.t === "ask") {
      if (this._gathered && message.id) this._gathered.push(message.id);
      if (message.t === "hello" && !this._leader) return; // the holder answers
      const reply = { t: "here", to: message.from, id: this._lastId };
      if (this._leader) {
        reply.holder = true;
        reply.status = this._lastStatus;
        reply.rewinding = message.t === "hello" && this._rewind(message.id);
      }
      this._post(reply);
    } else if (message.t === "here" && message.to === this._tabId) {
      if (this._gathered && message.id) this._gathered.push(message.id);
      if (!message.holder || this._leader) return;
      // No rewind: the holder's stream was not ahead of this tab, so what it sent before
      // this answer was at or behind this tab's position, and what follows is what it lacks.
      if (!message.rewinding) this._caughtUp();
      // The holder's answer to this tab's hello: every event it sends from now on
      // reaches this tab, so a tab that had no position has the holder's.
      const pos = parseId(message.id);
      if (!this._pos && pos) {
        this._pos = pos;
        this._lastId = message.id;
      }
      const status = message.status;
      if (status && this._state === "connecting") this._status(status.status, status.reason);
    }
  }

  // A tab joined at a position behind the stream's (a page rendered a while ago): read
  // the stream again from there, so that it gets what it lacks; the tabs that have it
  // drop it. A joiner from another epoch has nothing to replay (the service would reset).
  // True when the next stream (this one, reconnected at once) starts from `id`.
  _rewind(id) {
    const pos = parseId(id);
    const at = parseId(this._resume);
    if (!pos || (at && (pos.epoch !== at.epoch || atOrBefore(at, pos)))) return false;
    this._resume = at ? earlierId(pos, id, at, this._resume) : id;
    if (this._abort && !this._abort.signal.aborted) {
      this._rewinding = true; // _run reconnects at once, with no status and no backoff
      this._abort.abort();
    }
    return true;
  }

  // Catching up: a tab that joined at a position behind the stream gets the holder's
  // live events before the replay it asked for (they were on their way, or the rewound
  // stream is still connecting). Delivering them would move its position past the
  // replay, which it would then drop as "had". So it drops them (the replay brings them
  // again, in order) until that replay begins: an `ok` at or before its position (the
  // rewound stream's, or a new holder's that resumed from the least position). Anything
  // of another epoch or a `reset` ends it too: no replay from its position will come.
  // A final status still stops the tab; other statuses are reported, without their ids
  // (ahead). A plain PUBLISH (never replayed) is missed. True when it is delivered as usual.
  _caught(e) {
    const pos = parseId(e.id);
    const at = this._catching;
    const ok = e.kind === "status" && e.status === "ok";
    const reset = e.kind === "status" && e.status === "reset";
    if (e.final || reset || (pos && pos.epoch !== at.epoch) || (ok && pos && atOrBefore(pos, at))) {
      this._caughtUp();
      return true;
    }
    if (e.kind === "status" && !ok) this._status(e.status, e.reason);
    return false;
  }

  _caughtUp() {
    this._catching = null;
    clearTimeout(this._catchTimer);
  }

  // Delivery: each event reaches the application once, whichever tab read it -----
  _admit(e) {
    const pos = parseId(e.id);
    if (!pos) return true;
    const newer = !this._pos || pos.epoch !== this._pos.epoch || !atOrBefore(pos, this._pos);
    if (newer) {
      // With several sequence groups two positions may not compare (each ahead in a
      // group): the tab has both, so it holds the later of each group.
      const same = this._pos && pos.epoch === this._pos.epoch &&
        pos.seqs.length === this._pos.seqs.length;
      this._lastId = same ? laterId(pos, e.id, this._pos, this._lastId) : e.id;
      this._pos = parseId(this._lastId);
    }
    // At or behind: a message replayed (this tab has it) is dropped. A plain PUBLISH
    // (it repeats its stream's last id) is never replayed, so it is always new, and a
    // status is still news.
    return newer || e.plain === true || e.kind === "status";
  }

  _deliver(e, own) {
    if (own) this._post({ t: "event", e });
    if (this._catching && !own && !this._caught(e)) return;
    if (!this._admit(e)) return;
    if (e.kind === "message") {
      const meta = { id: e.id };
      if (e.channel !== undefined) meta.channel = e.channel;
      this._call("onMessage", e.data, meta);
      return;
    }
    if (e.status === "reset") {
      this._call("onStatus", e.status, e.reason);
      this._call("onReset");
    } else {
      this._status(e.status, e.reason, e.final);
    }
    if (e.final && !own) this._halt(); // every tab stops: a new holder would meet the same
  }

  // A status that changes the state; `ok` is reported when the state becomes "open",
  // not again for a stream that changes hands (or a reconnect this tab didn't notice).
  _status(status, reason, final) {
    this._lastStatus = { status, reason };
    const was = this._state;
    if (status === "ok") this._state = "open";
    else this._state = final ? "closed" : "connecting";
    if (status !== "ok" || was !== "open") this._call("onStatus", status, reason);
  }

  _call(name, ...args) {
    const callback = this._options[name];
    if (typeof callback !== "function" || this._closed) return;
    try {
      callback(...args);
    } catch (error) {
      setTimeout(() => {
        throw error; // reported as uncaught, without breaking the stream
      });
    }
  }

  // The stream ----------------------------------------------------------------
  async _run() {
    let failures = 0;
    let refreshes = 0;
    while (!this._stopped) {
      const end = await this._once();
      if (this._stopped) return;
      if (this._rewinding) {
        this._rewinding = false;
        continue;
      }
      const status = end.status;
      if (!status && this._state === "open") this._state = "connecting"; // dropped
      if (end.opened) failures = 0;
      if (end.opened) refreshes = 0;
      let delay;
      if (status && status.status === "failure" && TOKEN_REASONS.has(status.reason)) {
        if (typeof this._options.tokenProvider !== "function" || refreshes >= MAX_REFRESHES) {
          return this._finish();
        }
        refreshes += 1;
        try {
          this._token = await this._options.tokenProvider();
          delay = 0;
        } catch (error) {
          failures += 1;
          delay = this._backoff(failures, end.retry);
        }
      } else if (status && STOPPING.has(status.status)) {
        return this._finish();
      } else if (end.httpStatus && end.httpStatus < 500 && end.httpStatus !== 429) {
        return this._finish(); // the request itself is refused: retrying won't help
      } else {
        failures += 1; // `error`, a dropped connection, a refused connect, a 5xx
        delay = this._backoff(failures, end.retry);
      }
      if (delay > 0) await this._sleep(delay);
    }
  }

  // This tab gives up. Its last status went to the other tabs with the events: a final
  // one stopped them too; a token refused (this tab's own) lets the next tab in line
  // take the lock and try with its own token.
  _finish() {
    this._halt();
  }

  _backoff(failures, hint) {
    const doubled = Math.min(MAX_BACKOFF_MS, FIRST_RETRY_MS * 2 ** (failures - 1));
    return jittered(Math.max(hint || 0, doubled));
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      this._wake = resolve;
      this._timer = setTimeout(resolve, ms);
    });
  }

  _streamUrl() {
    const target = new URL(this._url, typeof location !== "undefined" ? location.href : undefined);
    target.searchParams.set("format", "json");
    const last = this._resume;
    if (last) target.searchParams.set("lastEventId", last);
    else target.searchParams.delete("lastEventId");
    if (this._token) target.searchParams.set("token", this._token);
    return target.href;
  }

  // One connection: read events until it ends; say how it ended.
  async _once() {
    const end = { status: null, retry: null, opened: false, httpStatus: 0, last: null };
    const abort = new AbortController();
    this._abort = abort;
    let response;
    try {
      response = await fetch(this._streamUrl(), {
        signal: abort.signal,
        cache: "no-store",
        credentials: this._options.withCredentials ? "include" : "same-origin",
        headers: { Accept: "text/event-stream" },
      });
    } catch (error) {
      return end; // refused, reset, aborted by close()
    }
    const type = response.headers.get("content-type") || "";
    if (!response.ok || !type.startsWith("text/event-stream")) {
      end.httpStatus = response.status || 599;
      abort.abort();
      if (end.httpStatus < 500 && end.httpStatus !== 429 && !this._stopped) {
        const reason = "http_" + response.status;
        this._deliver({ kind: "status", status: "failure", reason, final: true }, true);
      }
      return end;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    let type_ = "";
    let id = this._resume || "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this._stopped) break;
        buffer += value;
        let at;
        while ((at = buffer.search(/\r\n|\r|\n/)) >= 0) {
          if (buffer[at] === "\r" && at === buffer.length - 1) break; // a CRLF may be split
          const line = buffer.slice(0, at);
          buffer = buffer.slice(at + (buffer.startsWith("\r\n", at) ? 2 : 1));
          if (line === "") {
            if (data.length) {
              const stop = this._event(type_ || "message", data.join("\n"), id, end);
              if (stop) {
                abort.abort();
                return end;
              }
            }
            data = [];
            type_ = "";
            continue;
          }
          if (line[0] === ":") continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text[0] === " ") text = text.slice(1);
          if (field === "data") data.push(text);
          else if (field === "event") type_ = text;
          else if (field === "id" && !text.includes("\0")) id = text;
          else if (field === "retry" && /^\d+$/.test(text)) end.retry = Number(text);
        }
      }
    } catch (error) {
      // the connection broke, or close() aborted it
    } finally {
      abort.abort();
    }
    return end;
  }

  // One event of the stream; true when it ends the stream.
  _event(type, data, id, end) {
    let status = null;
    if (type === "status") {
      try {
        status = JSON.parse(data);
      } catch (error) {
        return false;
      }
    } else if (type === "noop" || (type === "message" && data === "noop")) {
      return false; // keep-alive
    } else if (type === "message" && XML_STATUS.test(data)) {
      status = { status: XML_STATUS.exec(data)[1] }; // the default flavour, if asked for
    }
    // Ids never go back on a stream: the next stream resumes from the last one, so
    // every tab gets what this one sent (the holder's own position may be ahead).
    const plain = end.last !== null && id === end.last; // a message repeating the id
    end.last = id;
    if (id) this._resume = id;
    if (status) {
      const name = String(status.status);
      const closing = name !== "ok" && name !== "reset";
      if (name === "ok") end.opened = true;
      // A refused token is this tab's: the other tabs have their own.
      const final = closing && STOPPING.has(name) && !TOKEN_REASONS.has(status.reason);
      const e = { kind: "status", status: name, reason: status.reason, id, final };
      this._deliver(e, true);
      if (closing) {
        end.status = { status: name, reason: status.reason };
        return true;
      }
      return false;
    }
    let message = { kind: "message", data, id, plain };
    try {
      const parsed = JSON.parse(data);
      if (parsed && typeof parsed === "object" && typeof parsed.channel === "string") {
        message = { kind: "message", data: String(parsed.data), channel: parsed.channel, id, plain };
      }
    } catch (error) {
      // a payload sent as is
    }
    this._deliver(message, true);
    return false;
  }
}
