#!/usr/bin/env node
// Calling the FTS API with fts-tokend, Node.js standard library only.
//
// Four ways, each a function to copy:
//   tokenFromFile()        read the token (and the key) from the headers file, per request
//   followToken()          keep a token current through the socket's long poll
//   callApi()              on a 401, report the token as rejected and retry with the next one
//   callThroughProxy()     call the API through the daemon's proxy, holding no secret at all
//
// Run as a script it does each once and prints one line per step; `make test-examples` runs it
// against the mock server and a real daemon. Environment as examples/python/fts_client.py.
'use strict';
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');

const API = process.env.FTS_API || 'https://global-api.fintechstudios.com';
const HEADERS_FILE = process.env.FTS_HEADERS_FILE || '/run/fts-tokend/headers';
const SOCKET = process.env.FTS_SOCKET || '/run/fts-tokend/tokend.sock';
const PROXY_SOCKET = process.env.FTS_PROXY_SOCKET || '/run/fts-tokend/api.sock';
const PATH = process.env.FTS_PATH || '/api/whoami';

/** One HTTP exchange: resolves to {status, headers, body}. */
function request(options, body) {
  return new Promise((resolve, reject) => {
    const client = options.protocol === 'https:' ? https : http;
    const req = client.request({ timeout: 70000, ...options }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end(body);
  });
}

/** What the daemon calls a token in logs and on the socket: the first 8 hex of its SHA-256. */
const fingerprint = (token) => crypto.createHash('sha256').update(token).digest('hex').slice(0, 8);

// 1. Files: read the headers file for every request (the daemon replaces it atomically, so a read
//    is always one whole token, and each read sees the latest rotation).
function tokenFromFile() {
  const headers = {};
  for (const line of fs.readFileSync(HEADERS_FILE, 'utf8').split('\n')) {
    const at = line.indexOf(': ');
    if (at > 0) headers[line.slice(0, at)] = line.slice(at + 2);
  }
  return headers;
}

function apiRequest(headers, path = PATH) {
  const url = new URL(API);
  return request({ protocol: url.protocol, hostname: url.hostname, port: url.port, path: url.pathname.replace(/\/$/, '') + path, headers });
}

// 2. The socket's long poll: GET /token?wait=300&after=FP answers once a token other than FP is
//    current. `onToken` is called with each token, the first at once.
async function followToken(onToken, { signal } = {}) {
  let fp = 'none';
  while (!signal?.aborted) {
    try {
      const answer = await request({ socketPath: SOCKET, path: `/token?wait=300&after=${fp}`, timeout: 320000 });
      if (answer.status !== 200) throw new Error(`HTTP ${answer.status}`);
      if (answer.headers['x-token-fingerprint'] !== fp) {
        fp = answer.headers['x-token-fingerprint'];
        onToken(answer.body, fp);
      }
    } catch (error) {
      await new Promise((resolve) => setTimeout(resolve, 5000)); // daemon restarting, or no valid token
    }
  }
}

// 3. A 401 before the token's expiry: report it (the daemon logs in at once, one login for all
//    reporters, at most one per refresh.minForcedRefreshSeconds) and use the next token.
async function reportRejected(token) {
  const fp = fingerprint(token);
  for (;;) {
    const answer = await request({ socketPath: SOCKET, method: 'POST', path: '/token/invalidate', headers: { 'X-Token-Fingerprint': fp } });
    if (answer.status === 202) return fp; // a login is under way: wait past this token
    if (answer.status === 409) return null; // already replaced: read the current one
    if (answer.status === 429) {
      await new Promise((resolve) => setTimeout(resolve, 1000 * Number(answer.headers['retry-after'] || 1)));
      continue;
    }
    throw new Error(`report refused: HTTP ${answer.status}`);
  }
}

async function callApi(path = PATH) {
  const headers = tokenFromFile();
  const first = await apiRequest(headers, path);
  if (first.status !== 401) return first;
  const after = await reportRejected(headers.Authorization.split(' ').pop());
  if (after) await request({ socketPath: SOCKET, path: `/token?wait=60&after=${after}` });
  return apiRequest(tokenFromFile(), path);
}

// 4. The proxy: the request goes to api.sock as if it were the API; the daemon adds the key and the
//    token and replays it once after a 401. The consumer holds no secret.
const callThroughProxy = (path = PATH) => request({ socketPath: PROXY_SOCKET, path });

async function main(steps) {
  for (const step of steps) {
    if (step === 'files') {
      const answer = await apiRequest(tokenFromFile());
      console.log(`files: GET ${PATH} with the headers file -> ${answer.status}`);
      if (answer.status !== 200) return 1;
    } else if (step === 'longpoll') {
      const controller = new AbortController();
      const next = await new Promise((resolve) => {
        let first = null;
        const timer = setTimeout(() => resolve(null), 60000);
        followToken((token, fp) => {
          if (first === null) {
            first = fp;
            console.log(`longpoll: token ${fp}; waiting for the next rotation`);
          } else {
            clearTimeout(timer);
            resolve(fp);
          }
        }, { signal: controller.signal });
      });
      controller.abort();
      console.log(`longpoll: next token ${next || 'none within 60 s'}`);
      if (!next) return 1;
    } else if (step === 'rejected') {
      const answer = await callApi();
      console.log(`rejected: GET ${PATH}, reported on 401 and retried -> ${answer.status}`);
      if (answer.status !== 200) return 1;
    } else if (step === 'proxy') {
      const answer = await callThroughProxy();
      console.log(`proxy: GET ${PATH} through api.sock with no credentials -> ${answer.status}`);
      if (answer.status !== 200) return 1;
    } else {
      throw new Error(`unknown step ${step} (files, longpoll, rejected, proxy)`);
    }
  }
  return 0;
}

if (require.main === module) {
  const steps = process.argv.slice(2);
  main(steps.length ? steps : ['files', 'longpoll', 'rejected', 'proxy']).then((code) => process.exit(code), (error) => {
    console.error(error.message);
    process.exit(1);
  });
}

module.exports = { tokenFromFile, followToken, reportRejected, callApi, callThroughProxy, fingerprint };
