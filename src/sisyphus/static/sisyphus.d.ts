// Types of sisyphus.js, the browser client of Sisyphus (see docs/browser.md).

/** What a message carries beside its data. */
export interface MessageMeta {
  /** The event id: a position a stream can resume from. */
  id: string;
  /** The channel the message was published on. */
  channel?: string;
}

/** `ok` and `reset` keep the stream open; the others end it (the client may reconnect). */
export type Status = "ok" | "reset" | "failure" | "error" | "disconnected";

export interface ConnectOptions {
  /** The user token, sent as the `token` query parameter. */
  token?: string;
  /** Called when the service refuses the token (expired, invalid); returns a fresh one. */
  tokenProvider?: () => string | Promise<string>;
  /** Where the first stream resumes from (e.g. the service's position() rendered into the page). */
  lastEventId?: string;
  onMessage?: (data: string, meta: MessageMeta) => void;
  /** Every status; `ok` when the state becomes "open" (not again when the stream changes tabs). */
  onStatus?: (status: Status, reason: string | undefined) => void;
  /** Missed messages could not be replayed: reload the page's state. */
  onReset?: () => void;
  /** Share one stream between the tabs of this origin that connect to the same URL, its
   * `lastEventId` and `token` parameters aside (default true). */
  shareTabs?: boolean;
  /** Send cookies to a service on another origin (it must list this origin). */
  withCredentials?: boolean;
}

export interface Subscription {
  /** Stop: this tab's stream closes (another tab takes it over), callbacks stop. */
  close(): void;
  /** "open" once an `ok` arrived; "closed" after close() or a status that ends it for good
   * (a refused token this tab can't replace, too: another tab then tries its own). */
  readonly state: "connecting" | "open" | "closed";
  /** Whether this tab holds the stream that the tabs share. */
  readonly leader: boolean;
  /** This tab's position: the id of the last event it delivered (before any: the
   * lastEventId it was given, or the holder's position when it joined). */
  readonly lastEventId: string | null;
}

export function connect(url: string, options?: ConnectOptions): Subscription;
