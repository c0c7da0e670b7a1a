// uWebSockets.js peer for canal's benchmark (issue 6): the demo contract.
//   /ws/echo/          echo every message verbatim (text stays text, binary stays binary)
//   /ws/chat/{room}/   broadcast every message verbatim to all members, sender included
//   GET /health        200 "ok"
// Rooms use uWS's own pub/sub: ws.subscribe(room) + app.publish(room, msg, isBinary). The sender
// is subscribed, so app.publish (not ws.publish, which skips the sender) delivers to it as well.
// The native addon is required directly, so a silent pure-JS fallback cannot fake the result.
'use strict';
const path = require('path');
const ABI = process.versions.modules; // 115 for node 20
const addon = path.join(
  path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json')),
  'dist', `uws_${process.platform}_${process.arch}_${ABI}.node`);
const uWS = require(addon);

const port = Number(process.argv[2] || 9001);
const host = '127.0.0.1';
const app = uWS.App();

app.ws('/ws/echo/', {
  // shipped defaults for compression, maxPayloadLength, idleTimeout, maxBackpressure
  message: (ws, msg, isBinary) => { ws.send(msg, isBinary); },
});

app.ws('/ws/chat/:room/', {
  upgrade: (res, req, context) => {
    const room = req.getParameter(0);
    res.upgrade({ room },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context);
  },
  open: (ws) => { ws.subscribe(ws.getUserData().room); },
  message: (ws, msg, isBinary) => { app.publish(ws.getUserData().room, msg, isBinary); },
});

app.get('/health', (res) => { res.end('ok'); });
app.any('/*', (res) => { res.writeStatus('404 Not Found').end('not found'); });

app.listen(host, port, (token) => {
  if (!token) { console.error(`uws: cannot listen on ${host}:${port}`); process.exit(1); }
  console.log(`uws ${ABI} listening on ${host}:${port}`);
});
