// One device's side of a rendezvous exchange, with fetch() as a web client
// (such as Element Web) does it. Every function resolves to what the page
// could see of the answer: a CORS failure rejects with a TypeError, and a
// header the server does not expose reads as null.
"use strict";

const EXPOSED = ["etag", "location", "x-max-bytes", "expires", "last-modified", "content-type"];

async function answer(response) {
  const headers = {};
  for (const name of EXPOSED) {
    headers[name] = response.headers.get(name);
  }
  return { status: response.status, headers, body: await response.text() };
}

async function call(url, init) {
  try {
    return await answer(await fetch(url, init));
  } catch (error) {
    return { error: String(error) };
  }
}

window.rendezvous = {
  create: (base, body, type) =>
    call(base, { method: "POST", body, headers: { "Content-Type": type } }),
  read: (url) => call(url, {}),
  poll: (url, etag, wait) =>
    call(url, { headers: { "If-None-Match": etag, Prefer: `wait=${wait}` } }),
  write: (url, body, type, ifMatch) =>
    call(url, { method: "PUT", body, headers: { "Content-Type": type, "If-Match": ifMatch } }),
  remove: (url) => call(url, { method: "DELETE" }),
  // MSC4388: a JSON body (or none), and the access token if given.
  json: (method, url, body, token) => {
    const headers = {};
    if (body !== null) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = `Bearer ${token}`;
    return call(url, {
      method,
      headers,
      body: body === null ? undefined : JSON.stringify(body),
    });
  },
  // An MSC4388 read held until the sequence token changes, left running.
  startTokenPoll(url, token) {
    this.settled = false;
    const held = `${url}?sequence_token=${encodeURIComponent(token)}`;
    this.pending = call(held, {}).then((result) => {
      this.settled = true;
      return result;
    });
  },

  // A long-poll left running, to be awaited later, and a way to ask
  // whether it has settled without waiting for it.
  pending: null,
  settled: false,
  startPoll(url, etag, wait) {
    this.settled = false;
    this.pending = this.poll(url, etag, wait).then((result) => {
      this.settled = true;
      return result;
    });
  },
};
