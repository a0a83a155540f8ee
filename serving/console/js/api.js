// Calls to the service's own API with the key the user gave (session storage: this tab only).
// Every failure becomes an ApiError carrying the API's message, shown by showError().

const KEY = "adaface-api-key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

let askForKey = async () => false;      // set by main.js: opens the key dialog, true when a key was given

export function onKeyNeeded(handler) {
  askForKey = handler;
}

const listeners = [];

/** Call fn(response) for every answer (main.js watches for synthetic weights). */
export function onResponse(fn) {
  listeners.push(fn);
}

async function errorOf(response) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    } else if (body && body.message) {
      message = body.message;
    }
  } catch (_) {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/**
 * fetch() on this service with the key; on 401 the key dialog opens once and the call is retried.
 * Returns the Response (ok), or throws ApiError.
 */
export async function call(path, options = {}, retried = false) {
  const headers = new Headers(options.headers || {});
  const key = getKey();
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network", `the service did not answer (${err.message})`);
  }
  listeners.forEach((fn) => fn(response));
  if (response.ok) return response;
  const error = await errorOf(response);
  if (response.status === 401 && !retried && (await askForKey(error.message))) {
    return call(path, options, true);
  }
  throw error;
}

export async function json(path, options = {}) {
  const response = await call(path, options);
  return response.json();
}

/** POST a photo (File or base64 text) to path; answers the JSON body. */
export async function postPhoto(path, photo) {
  const body = typeof photo === "string" ? photo.replace(/\s+/g, "") : photo;
  const type = typeof photo === "string" ? "text/plain" : "application/octet-stream";
  return json(path, { method: "POST", headers: { "Content-Type": type }, body });
}

/** An object URL for an image the API serves with the key (img src cannot send headers). */
export async function imageUrl(path) {
  const response = await call(path);
  return URL.createObjectURL(await response.blob());
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? "?" + s : "";
}
