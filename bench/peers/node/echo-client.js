// An independent echo load generator (node `ws` client) to cross-check canal-bench's ordering.
// usage: node echo-client.js URL CONNECTIONS SECONDS [SIZE]
// Closed loop: each connection keeps one 32-byte text message in flight and checks the echo.
// Prints one JSON line: round trips/s and latency percentiles (ms) over the measured window
// (the first second is warm-up). Loopback only; stops after SECONDS (at most 120).
'use strict';
const WebSocket = require('ws');

const url = process.argv[2];
const conns = Math.min(Number(process.argv[3] || 100), 1000);
const secs = Math.min(Number(process.argv[4] || 10), 120);
const size = Number(process.argv[5] || 32);
if (!/^ws:\/\/(127\.\d+\.\d+\.\d+|localhost)(:\d+)?\//.test(url)) {
  console.error('loopback ws:// URLs only'); process.exit(2);
}
const payload = 'x'.repeat(size);
let measuring = false, done = false, rts = 0, mismatches = 0, open = 0;
const lat = [];
const t0 = Date.now();

for (let i = 0; i < conns; i++) {
  const ws = new WebSocket(url, { perMessageDeflate: false });
  let sentAt = 0;
  const send = () => { sentAt = process.hrtime.bigint(); ws.send(payload); };
  ws.on('open', () => { open++; send(); });
  ws.on('message', (data) => {
    if (data.toString() !== payload) mismatches++;
    if (measuring) { rts++; if (lat.length < 2e6) lat.push(Number(process.hrtime.bigint() - sentAt) / 1e6); }
    if (!done) send();
  });
  ws.on('error', (e) => { console.error(`conn ${i}: ${e.message}`); });
}
setTimeout(() => { measuring = true; }, 1000);
setTimeout(() => {
  done = true; measuring = false;
  lat.sort((a, b) => a - b);
  const q = (p) => lat.length ? +lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(3) : null;
  console.log(JSON.stringify({ client: 'node-ws', open, round_trips: rts,
    round_trips_per_s: +(rts / (secs - 1)).toFixed(1), p50_ms: q(0.5), p99_ms: q(0.99), mismatches,
    wall_s: (Date.now() - t0) / 1000 }));
  process.exit(0);
}, secs * 1000);
