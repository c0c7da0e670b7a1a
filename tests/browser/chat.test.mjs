// The chat page end to end: a real `canal serve` child process on a free port, Debian's
// headless Chromium driven by playwright-core, one isolated browser context per person.
//
//   CANAL_BIN  the canal binary (default: ../../target/debug/canal, or $CARGO_TARGET_DIR)
//   CHROMIUM   the browser (default: /usr/bin/chromium)
//
// Screenshots go to tests/browser/artifacts/ (git-ignored).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "..", "..");
const TARGET = process.env.CARGO_TARGET_DIR || path.join(ROOT, "target");
const CANAL = process.env.CANAL_BIN || path.join(TARGET, "debug", "canal");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.join(HERE, "artifacts");
const TOKEN = "browser-test-token";
const ADMIN_TOKEN = "browser-admin-token";
const ROOM = "e2e-room";
const OTHER_ROOM = "e2e-elsewhere";
const WAIT = 20_000; // generous: a reconnect backs off up to 10 s

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `canal serve` as a child process; start/stop it as often as needed on one port. */
class Canal {
  constructor(port) {
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.child = null;
    this.log = "";
  }

  async start(extra = []) {
    const child = spawn(
      CANAL,
      [
        "serve", "--bind", `127.0.0.1:${this.port}`, "--publish-token", TOKEN,
        "--admin", "--admin-token", ADMIN_TOKEN, "--no-access-log", ...extra,
      ],
      { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn" } },
    );
    this.child = child;
    child.stdout.on("data", (d) => { this.log += d; });
    child.stderr.on("data", (d) => { this.log += d; });
    this.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + WAIT;
    for (;;) {
      try {
        const r = await fetch(`${this.base}/health`);
        if (r.ok) return;
      } catch { /* not up yet */ }
      if (child.exitCode !== null) throw new Error(`canal exited early:\n${this.log}`);
      if (Date.now() > deadline) throw new Error(`canal did not come up:\n${this.log}`);
      await sleep(50);
    }
  }

  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    this.child.kill("SIGTERM");
    const { code, signal } = await this.exited;
    assert.equal(code, 0, `canal should stop cleanly on SIGTERM (signal ${signal}):\n${this.log}`);
    this.child = null;
  }

  async publish(body) {
    const r = await fetch(`${this.base}/api/publish`, {
      method: "POST",
      headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: await r.json() };
  }
}

let canal;
let browser;
const people = {};

async function shot(page, name) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** A person who chose `name` on an earlier visit: their own browser context (own storage),
 * one chat page in `room`. */
async function person(name, room) {
  const context = await browser.newContext({ viewport: { width: 820, height: 700 } });
  await context.addInitScript((n) => localStorage.setItem("canal.name", n), name);
  const page = await context.newPage();
  page.on("pageerror", (e) => { page.errors = (page.errors || []).concat(String(e)); });
  await page.goto(`${canal.base}/chat/${room}/`);
  await connected(page);
  assert.equal(await page.inputValue("#name"), name);
  return page;
}

function connected(page) {
  return page.waitForSelector('body[data-state="connected"]', { timeout: WAIT });
}

/** The entries on a page: [{kind, author, text}] in display order. */
function entries(page) {
  return page.$$eval("#messages li.msg", (items) => items.map((li) => ({
    kind: li.getAttribute("data-kind"),
    author: (li.querySelector(".author") || {}).textContent || "",
    text: li.getAttribute("data-kind") === "message" || li.getAttribute("data-kind") === "plain"
      ? (li.querySelector(".text") || {}).textContent || ""
      : "",
  })));
}

async function say(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
}

/** Waits until `page` shows `count` entries of `kind` (and returns all its entries). */
async function waitForKind(page, kind, count) {
  await page.waitForFunction(
    ([k, n]) => document.querySelectorAll(`#messages li.msg[data-kind="${k}"]`).length >= n,
    [kind, count],
    { timeout: WAIT },
  );
  return entries(page);
}

const messages = (list) => list.filter((e) => e.kind === "message").map((e) => `${e.author}: ${e.text}`);

describe("the chat page in headless Chromium", () => {
  before(async () => {
    assert.ok(fs.existsSync(CANAL), `canal binary not found at ${CANAL} (cargo build first)`);
    assert.ok(fs.existsSync(CHROMIUM), `chromium not found at ${CHROMIUM}`);
    fs.rmSync(ARTIFACTS, { recursive: true, force: true });
    canal = new Canal(await freePort());
    await canal.start();
    // playwright-core gives each launch a fresh temporary user-data-dir of its own.
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    if (browser) await browser.close();
    if (canal) await canal.stop();
  });

  test("two pages in one room see each other's messages in order; another room sees none", async () => {
    people.alice = await person("alice", ROOM);
    people.bob = await person("bob", ROOM);
    people.carol = await person("carol", OTHER_ROOM);
    const { alice, bob, carol } = people;

    // Alice was there first: she sees Bob join.
    const seen = await waitForKind(alice, "join", 1);
    assert.ok(seen.some((e) => e.kind === "join" && e.author === "bob"), JSON.stringify(seen));

    for (const t of ["one", "two", "three"]) await say(alice, `alice ${t}`);
    for (const t of ["one", "two"]) await say(bob, `bob ${t}`);
    const a = messages(await waitForKind(alice, "message", 5));
    const b = messages(await waitForKind(bob, "message", 5));
    // Everyone in the room sees the same conversation, each sender's messages in order.
    assert.deepEqual(a, b);
    assert.deepEqual(a.filter((m) => m.startsWith("alice")), ["alice: alice one", "alice: alice two", "alice: alice three"]);
    assert.deepEqual(a.filter((m) => m.startsWith("bob")), ["bob: bob one", "bob: bob two"]);
    // A message with time and author.
    const time = await bob.$eval("#messages li.msg[data-kind=message] time", (t) => t.textContent);
    assert.match(time, /^\d\d:\d\d$/);

    // Carol's room stays quiet: give any stray delivery time to arrive, then look.
    await say(carol, "carol alone");
    const c = await waitForKind(carol, "message", 1);
    await sleep(300);
    const cAll = await entries(carol);
    assert.deepEqual(messages(cAll), ["carol: carol alone"], JSON.stringify(cAll));
    assert.ok(!cAll.some((e) => e.author === "alice" || e.author === "bob"), JSON.stringify(c));
    assert.ok(!messages(await entries(alice)).some((m) => m.includes("carol")));

    // The room list on / shows both rooms with live member counts.
    const index = await (await browser.newContext()).newPage();
    await index.goto(`${canal.base}/`);
    await index.waitForFunction(
      ([r]) => [...document.querySelectorAll("#rooms li.room")].some(
        (li) => li.querySelector(".label").textContent === r && li.querySelector(".members").textContent === "2"),
      [ROOM],
      { timeout: WAIT },
    );
    const rooms = await index.$$eval("#rooms li.room", (lis) => lis.map((li) =>
      [li.querySelector(".label").textContent, li.querySelector(".members").textContent]));
    assert.deepEqual(rooms.sort(), [[OTHER_ROOM, "1"], [ROOM, "2"]].sort());
    await shot(index, "01-room-list");
    await index.context().close();

    await shot(alice, "02-alice");
    await shot(bob, "03-bob");
    await shot(carol, "04-carol-other-room");
  });

  test("a message pushed through the publish endpoint appears in the room's pages only", async () => {
    const { alice, bob, carol } = people;
    // Plain text from a non-page client shows as a plain message.
    let r = await canal.publish({ group: ROOM, message: { type: "chat.message", text: "deploy finished" } });
    assert.deepEqual(r, { status: 202, body: { ok: true } });
    // A Channels 1 style message without a type goes straight to the sockets.
    r = await canal.publish({ group: ROOM, message: { text: "untyped hello" } });
    assert.equal(r.status, 202);
    // The page's own JSON format, pushed from outside, renders as a message by its author.
    r = await canal.publish({
      group: ROOM,
      message: { type: "chat.message", text: JSON.stringify({ kind: "message", name: "robot", text: "beep", ts: Date.now() }) },
    });
    assert.equal(r.status, 202);
    for (const page of [alice, bob]) {
      const list = await waitForKind(page, "plain", 2);
      const plain = list.filter((e) => e.kind === "plain").map((e) => e.text);
      assert.deepEqual(plain, ["deploy finished", "untyped hello"]);
      await page.waitForFunction(() => [...document.querySelectorAll("#messages li.msg[data-kind=message] .author")]
        .some((a) => a.textContent === "robot"), null, { timeout: WAIT });
    }
    await sleep(300);
    assert.ok(!(await entries(carol)).some((e) => e.kind === "plain" || e.author === "robot"));
    // A wrong token is refused and nothing arrives.
    const bad = await fetch(`${canal.base}/api/publish`, {
      method: "POST",
      headers: { Authorization: "Bearer nope" },
      body: JSON.stringify({ group: ROOM, message: { type: "chat.message", text: "intruder" } }),
    });
    assert.equal(bad.status, 401);
    await shot(alice, "05-alice-published");
  });

  test("after a server restart both pages reconnect on their own and chat again", async () => {
    const { alice, bob } = people;
    await canal.stop();
    for (const page of [alice, bob]) {
      await page.waitForSelector('body:not([data-state="connected"])', { timeout: WAIT });
      assert.equal(await page.isDisabled("#send"), true, "send is disabled while disconnected");
    }
    const state = await alice.$eval("body", (b) => b.dataset.state);
    assert.ok(["reconnecting", "connecting", "offline"].includes(state), state);
    await shot(alice, "06-alice-reconnecting");

    await canal.start();
    await connected(alice);
    await connected(bob);
    const before = messages(await entries(bob)).length;
    await say(alice, "back again");
    await say(bob, "welcome back");
    for (const page of [alice, bob]) {
      await page.waitForFunction(
        () => {
          const texts = [...document.querySelectorAll("#messages li.msg[data-kind=message] .text")].map((t) => t.textContent);
          return texts.includes("back again") && texts.includes("welcome back");
        },
        null,
        { timeout: WAIT },
      );
    }
    const after = messages(await entries(bob));
    assert.ok(after.length >= before + 2);
    assert.deepEqual(after.slice(-2).sort(), ["alice: back again", "bob: welcome back"]);
    await shot(alice, "07-alice-after-restart");
    await shot(bob, "08-bob-after-restart");
    for (const page of Object.values(people)) {
      assert.deepEqual(page.errors || [], [], "no script errors on the page");
    }
  });

  test("a page that closes says goodbye: the others see a leave notice", async () => {
    const { alice } = people;
    const dave = await person("dave", ROOM);
    await alice.waitForFunction(() => [...document.querySelectorAll('#messages li.msg[data-kind="join"] .author')]
      .some((a) => a.textContent === "dave"), null, { timeout: WAIT });
    await dave.context().close();
    await alice.waitForFunction(() => [...document.querySelectorAll('#messages li.msg[data-kind="leave"] .author')]
      .some((a) => a.textContent === "dave"), null, { timeout: WAIT });
    await shot(alice, "09-alice-sees-dave-leave");
  });

  test("the dashboard shows the live connections and draws its charts", async () => {
    const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
    const page = await context.newPage();
    const denied = await page.goto(`${canal.base}/admin/`);
    assert.equal(denied.status(), 401);
    await page.goto(`${canal.base}/admin/?token=${ADMIN_TOKEN}`);
    await page.waitForSelector('body[data-state="live"]', { timeout: WAIT });
    // Alice, Bob and Carol, plus the dashboard's own socket.
    await page.waitForFunction(
      () => document.getElementById("websockets").textContent === "4"
        && Number(document.body.dataset.updates || 0) >= 2,
      null,
      { timeout: WAIT },
    );
    const groups = await page.$$eval("#groups tr", (rows) => rows.map((r) =>
      [...r.querySelectorAll("td")].map((td) => td.textContent)));
    assert.deepEqual(groups, [[ROOM, "2"], [OTHER_ROOM, "1"]]);
    // The chart canvases were drawn on (some pixel is not transparent).
    const drawn = await page.$eval("#chart-connections", (c) =>
      c.getContext("2d").getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0));
    assert.ok(drawn, "the connections chart is drawn");
    await shot(page, "10-dashboard");
    await context.close();
  });
});

describe("pushing into the pages from a shell with `canal send` (Redis layer)", () => {
  let redis;
  let shared;
  let page;
  let ctx;
  let ownBrowser;
  const haveRedis = (() => {
    try {
      return spawnSync("redis-server", ["--version"]).status === 0;
    } catch {
      return false;
    }
  })();

  before(async () => {
    if (!haveRedis) return;
    const port = await freePort();
    redis = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      { stdio: "ignore" });
    const deadline = Date.now() + WAIT;
    for (;;) {
      const up = await new Promise((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => { s.destroy(); resolve(true); });
        s.on("error", () => resolve(false));
      });
      if (up) break;
      if (Date.now() > deadline) throw new Error("redis-server did not start");
      await sleep(50);
    }
    shared = new Canal(await freePort());
    shared.layer = `redis://127.0.0.1:${port}`;
    await shared.start(["--layer", shared.layer]);
    ownBrowser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  });

  after(async () => {
    if (ctx) await ctx.close();
    if (ownBrowser) await ownBrowser.close();
    if (shared) await shared.stop();
    if (redis) redis.kill("SIGKILL");
  });

  test("a message sent with `canal send --group` appears in the room's page", async (t) => {
    if (!haveRedis) {
      assert.ok(process.env.CI !== "true", "redis-server is required under CI=true");
      t.skip("redis-server is missing");
      return;
    }
    ctx = await ownBrowser.newContext({ viewport: { width: 820, height: 700 } });
    await ctx.addInitScript(() => localStorage.setItem("canal.name", "erin"));
    page = await ctx.newPage();
    await page.goto(`${shared.base}/chat/shell-room/`);
    await connected(page);
    const result = spawnSync(CANAL, [
      "send", "--layer", shared.layer, "--group", "shell-room",
      JSON.stringify({ type: "chat.message", text: "sent from bash" }),
    ], { encoding: "utf8" });
    assert.equal(result.status, 0, result.stderr);
    const list = await waitForKind(page, "plain", 1);
    assert.deepEqual(list.filter((e) => e.kind === "plain").map((e) => e.text), ["sent from bash"]);
    await shot(page, "11-canal-send");
  });
});
