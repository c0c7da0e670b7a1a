// node `ws` 8 peer for canal's benchmark (issue 6): the demo contract.
//   /ws/echo/          echo every message verbatim
//   /ws/chat/{room}/   broadcast every message verbatim to all members, sender included
//   GET /health        200 "ok" (the http server on the same port)
// Shipped defaults of ws (its server leaves permessage-deflate off unless asked, and canal-bench
// never offers the extension anyway).
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 9002);
const host = '127.0.0.1';
const rooms = new Map(); // room -> Set<WebSocket>

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/health') { res.writeHead(200); res.end('ok'); return; }
  res.writeHead(404); res.end('not found');
});
const wss = new WebSocketServer({ noServer: true });
const CHAT = /^\/ws\/chat\/([^/]+)\/$/;

server.on('upgrade', (req, socket, head) => {
  const url = req.url.split('?')[0];
  let room = null;
  if (url !== '/ws/echo/') {
    const m = CHAT.exec(url);
    if (!m) { socket.destroy(); return; }
    room = m[1];
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (room === null) {
      ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
      return;
    }
    let members = rooms.get(room);
    if (!members) { members = new Set(); rooms.set(room, members); }
    members.add(ws);
    ws.on('message', (data, isBinary) => {
      for (const m of members) if (m.readyState === 1) m.send(data, { binary: isBinary });
    });
    ws.on('close', () => {
      members.delete(ws);
      if (members.size === 0) rooms.delete(room);
    });
  });
});

server.listen(port, host, () => console.log(`ws listening on ${host}:${port}`));
