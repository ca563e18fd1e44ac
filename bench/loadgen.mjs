#!/usr/bin/env node
// Load generator for bench/run.py. One process drives one server through one shape and
// prints JSON lines on stdout: {"event":"stage",...} at barriers (multi-process runs) and
// {"event":"result",...} at the end. It is a plain canvas-store protocol v2 client built on
// `ws` (resolved from ../node/node_modules, the pinned copy, or $CANVAS_STORE_NODE_MODULES).
//
//   node bench/loadgen.mjs '<json config>'
//
// Config: {url, serverPid, clkTck, maxSeconds, shape, params, shard: {index, count}, barrier}
// Shapes:
//   edit  - R rooms x E editors, each editor keeps one document patch in flight
//           (send, wait for the ack, send the next). Counts acks, broadcast deliveries and
//           ack latency inside a measurement window after a warm-up.
//   join  - time from `new WebSocket` to `synced` for a big document: cold (first session,
//           the server loads the file) and warm (room already open).
//   stall - a probe in its own room sends ephemeral patches back to back while a big room
//           saves; reports the longest gap between two probe acks.
//   idle  - server RSS before/after opening N idle sessions in one room, or N rooms.
//   burst - N rooms opened at once: N clients, one per room, all connecting in the same
//           tick with lastTimestamp 0; per-client time from `new WebSocket` to `synced`.
//
// Every wait is bounded: per-connection timeouts, drain timeouts and a hard process deadline.
import { createRequire } from 'node:module'
import { performance } from 'node:perf_hooks'
import { Worker } from 'node:worker_threads'
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import readline from 'node:readline'

// $CANVAS_STORE_NODE_MODULES names another node_modules folder to resolve `ws` from (a
// worktree without its own node/node_modules); bench/run.py sets it when it uses one.
const nodeModules = process.env.CANVAS_STORE_NODE_MODULES
const require = createRequire(
  nodeModules ? join(nodeModules, 'resolve-from-here.js') : new URL('../node/package.json', import.meta.url),
)
const WebSocket = require('ws')

const cfg = JSON.parse(process.argv[2])
const P = cfg.params ?? {}
const shard = cfg.shard ?? { index: 0, count: 1 }
const CLK_TCK = cfg.clkTck ?? 100
const now = () => performance.now()
const epochNow = () => performance.timeOrigin + performance.now()
const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)))

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}
function fail(msg) {
  emit({ event: 'error', error: String(msg) })
  process.exit(2)
}
const hardDeadline = setTimeout(() => fail(`loadgen exceeded its ${cfg.maxSeconds}s deadline`), (cfg.maxSeconds ?? 120) * 1000)
hardDeadline.unref()
process.on('unhandledRejection', (e) => fail(e?.stack ?? e))

// ---- barrier with the harness (only when several loadgen processes share a shape) ----
const stdinLines = []
const stdinWaiters = []
let rl = null
if (cfg.barrier) {
  rl = readline.createInterface({ input: process.stdin })
  rl.on('line', (l) => {
    const w = stdinWaiters.shift()
    if (w) w(l)
    else stdinLines.push(l)
  })
}
async function barrier(name) {
  if (!cfg.barrier) return null
  emit({ event: 'stage', name })
  const line = stdinLines.length ? stdinLines.shift() : await new Promise((r) => stdinWaiters.push(r))
  return line.trim()
}

// ---- /proc readers for the server process ----
function readProc(pid) {
  if (!pid) return { cpu: 0, sys: 0, rssKB: 0 }
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  // fields after ")": state(3) ... utime is field 14 => index 11, stime 15 => index 12
  const cpu = (Number(f[11]) + Number(f[12])) / CLK_TCK
  const sys = Number(f[12]) / CLK_TCK
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const m = /VmRSS:\s+(\d+)\s+kB/.exec(status)
  return { cpu, sys, rssKB: m ? Number(m[1]) : 0 }
}
async function rssMedianKB(samples = 5, gapMs = 200) {
  const v = []
  for (let i = 0; i < samples; i++) {
    v.push(readProc(cfg.serverPid).rssKB)
    if (i < samples - 1) await sleep(gapMs)
  }
  v.sort((a, b) => a - b)
  return v[Math.floor(v.length / 2)]
}

// ---- latency histogram (log buckets, ~1% wide), mergeable by the harness ----
class Hist {
  constructor() {
    this.b = new Map()
    this.n = 0
    this.max = 0
  }
  record(ms) {
    const us = Math.max(1, ms * 1000)
    const k = Math.floor(Math.log(us) * 100)
    this.b.set(k, (this.b.get(k) ?? 0) + 1)
    this.n++
    if (ms > this.max) this.max = ms
  }
  toJSON() {
    return { n: this.n, max: this.max, buckets: Object.fromEntries(this.b) }
  }
}

// ---- sessions ----
let stopping = false
let unexpectedCloses = 0
const ACK = Buffer.from('"ack"')
const DOC = Buffer.from('"documentPatches"')

function connect(roomId, clientId, opts = {}) {
  return new Promise((resolve, reject) => {
    const t0 = now()
    const url = `${cfg.url}/?roomId=${encodeURIComponent(roomId)}&clientId=${encodeURIComponent(clientId)}&token=bench`
    const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 1 << 30, skipUTF8Validation: true })
    const s = {
      ws, roomId, clientId, t0, tOpen: 0, tSynced: 0, syncTimestamp: 0,
      frames: opts.keepFrames ? [] : null, onFrame: null, pending: null, seq: 0, sentAt: 0,
    }
    const timer = setTimeout(() => {
      reject(new Error(`timed out joining ${roomId} as ${clientId}`))
      ws.terminate()
    }, (opts.timeout ?? 30) * 1000)
    ws.on('open', () => {
      s.tOpen = now()
      ws.send(JSON.stringify({ type: 'reconnect', lastTimestamp: opts.lastTimestamp ?? 0, protocolVersion: 2 }))
    })
    ws.on('message', (data) => {
      if (s.tSynced) {
        s.onFrame(data, s)
        return
      }
      if (data.length < 200) {
        const m = JSON.parse(data.toString())
        if (m.type === 'synced') {
          s.tSynced = now()
          s.syncTimestamp = m.timestamp
          s.onFrame = setupFrame
          clearTimeout(timer)
          resolve(s)
          return
        }
        if (m.type === 'version-mismatch') fail(`server says version-mismatch: ${data}`)
      }
      if (s.frames) s.frames.push(data)
    })
    ws.on('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
    ws.on('close', (code, reason) => {
      if (!s.tSynced) {
        clearTimeout(timer)
        reject(new Error(`${roomId}/${clientId} closed before synced: ${code} ${reason}`))
      } else if (!stopping) unexpectedCloses++
    })
  })
}

// Before the timed loop: parse everything, resolve the one pending ack.
function setupFrame(data, s) {
  if (!data.includes(ACK)) return
  const m = JSON.parse(data.toString())
  if (m.type === 'ack' && s.pending) {
    const p = s.pending
    s.pending = null
    p(m)
  }
}

function request(s, frame, timeoutMs = 30000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ack for ${frame.messageId} in ${timeoutMs} ms`)), timeoutMs)
    s.pending = (m) => {
      clearTimeout(timer)
      resolve(m)
    }
    s.ws.send(JSON.stringify(frame))
  })
}

async function pool(items, limit, fn) {
  let i = 0
  const out = new Array(items.length)
  const worker = async () => {
    while (i < items.length) {
      const k = i++
      out[k] = await fn(items[k], k)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  return out
}

function closeAll(sessions) {
  stopping = true
  for (const s of sessions) s.ws.terminate()
}

function cpuWindow() {
  const p = readProc(cfg.serverPid)
  return { t: now(), server: p.cpu, serverSys: p.sys, rssKB: p.rssKB, self: process.cpuUsage() }
}
function cpuDelta(a, b) {
  const wall = (b.t - a.t) / 1000
  const self = (b.self.user + b.self.system - a.self.user - a.self.system) / 1e6
  return { wallS: wall, serverCpuS: b.server - a.server, serverSysS: b.serverSys - a.serverSys, loadgenCpuS: self }
}

// ---- shape: edit ----
async function shapeEdit() {
  const { rooms, editors, warmup, duration, prefix, concurrency = 50 } = P
  // Editors are numbered globally; this shard owns e % count == index.
  const mine = []
  for (let r = 0; r < rooms; r++) {
    for (let e = 0; e < editors; e++) {
      const g = r * editors + e
      if (g % shard.count === shard.index) mine.push({ room: `${prefix}-r${r}`, client: `${prefix}-r${r}-c${e}`, first: e === 0 })
    }
  }
  // First sessions of each room first, so no two connections race to create a room
  // (the Node server can split a room in two when they do).
  const firsts = mine.filter((m) => m.first)
  const rest = mine.filter((m) => !m.first)
  emit({ event: 'phase', name: 'connect', epochMs: epochNow() })
  const tc0 = now()
  const sessions = []
  sessions.push(...(await pool(firsts, concurrency, (m) => connect(m.room, m.client))))
  await barrier('firsts-joined')
  sessions.push(...(await pool(rest, concurrency, (m) => connect(m.room, m.client))))
  const connectS = (now() - tc0) / 1000
  emit({ event: 'phase', name: 'connected', epochMs: epochNow() })
  // Each editor creates its own component.
  await pool(sessions, concurrency, (s) =>
    request(s, { type: 'patch', messageId: `${s.clientId}-0`, documentPatches: [{ [`${s.clientId}/pos`]: { _exists: true, x: 0, y: 0 } }] }),
  )
  const go = await barrier('ready')

  const hist = new Hist()
  let acks = 0
  let deliveries = 0
  let deliveriesTotal = 0
  let badFrames = 0
  let running = true
  let active = sessions.length
  let drained
  const drainP = new Promise((r) => (drained = r))
  // Window in performance.now() terms; aligned across shards through the epoch in `go`.
  const startEpoch = go ? Number(go.split(' ')[1]) : epochNow()
  const winStart = now() + (startEpoch - epochNow()) + warmup * 1000
  const winEnd = winStart + duration * 1000

  const send = (s) => {
    s.seq++
    s.sentAt = now()
    s.ws.send(`{"type":"patch","messageId":"${s.clientId}-${s.seq}","documentPatches":[{"${s.clientId}/pos":{"x":${s.seq},"y":${s.seq}}}]}`)
  }
  const onFrame = (data, s) => {
    const t = now()
    if (data.includes(ACK)) {
      const m = JSON.parse(data.toString())
      if (m.type === 'ack') {
        if (m.messageId !== `${s.clientId}-${s.seq}`) badFrames++
        if (t >= winStart && t < winEnd) {
          acks++
          s.winAcks++
          hist.record(t - s.sentAt)
        }
        if (running && t < winEnd) send(s)
        else if (--active === 0) drained()
        return
      }
    }
    if (data.includes(DOC)) {
      deliveriesTotal++
      if (t >= winStart && t < winEnd) deliveries++
      // Spot-check one delivery in 500: a patch from someone else.
      if (deliveriesTotal % 500 === 1) {
        const m = JSON.parse(data.toString())
        if (m.type !== 'patch' || m.clientId === s.clientId || typeof m.timestamp !== 'number') badFrames++
      }
    }
  }
  for (const s of sessions) {
    s.winAcks = 0
    s.onFrame = onFrame
  }
  const startDelay = winStart - warmup * 1000 - now()
  await sleep(startDelay)
  for (const s of sessions) send(s)
  await sleep(winStart - now())
  const c0 = cpuWindow()
  emit({ event: 'phase', name: 'measure', epochMs: epochNow() })
  await sleep(winEnd - now())
  const c1 = cpuWindow()
  emit({ event: 'phase', name: 'done', epochMs: epochNow() })
  running = false
  const drainTimeout = sleep(10000).then(() => 'timeout')
  const d = await Promise.race([drainP, drainTimeout])
  const perEditor = sessions.map((s) => s.winAcks).sort((a, b) => a - b)
  closeAll(sessions)
  return {
    sessions: sessions.length,
    connectS,
    windowS: duration,
    acks,
    deliveries,
    hist: hist.toJSON(),
    ...cpuDelta(c0, c1),
    rssKB: c1.rssKB,
    minEditorAcks: perEditor[0] ?? 0,
    maxEditorAcks: perEditor[perEditor.length - 1] ?? 0,
    badFrames,
    unexpectedCloses,
    drainTimedOut: d === 'timeout',
  }
}

// ---- shape: join ----
function countDiffKeys(frames) {
  let keys = 0
  for (const f of frames) {
    const m = JSON.parse(f.toString())
    if (m.type === 'patch' && m.documentPatches) for (const p of m.documentPatches) keys += Object.keys(p).length
  }
  return keys
}

async function shapeJoin() {
  const { bigRooms, warmReps = 3, expectKeys, timeout = 120 } = P
  const cold = []
  const warm = []
  const coldServerCpu = []
  const holders = []
  const rss0 = readProc(cfg.serverPid).rssKB
  emit({ event: 'phase', name: 'measure', epochMs: epochNow() })
  for (let i = 0; i < bigRooms.length; i++) {
    const room = bigRooms[i]
    const a = cpuWindow()
    const s = await connect(room, `holder-${i}`, { keepFrames: true, timeout })
    const b = cpuWindow()
    cold.push(s.tSynced - s.t0)
    coldServerCpu.push(b.server - a.server)
    const keys = countDiffKeys(s.frames)
    if (expectKeys && keys !== expectKeys) fail(`cold join of ${room} got ${keys} keys, expected ${expectKeys}`)
    s.frames = null
    holders.push(s)
    await sleep(300)
    for (let k = 0; k < warmReps; k++) {
      const w = await connect(room, `joiner-${i}-${k}`, { keepFrames: true, timeout })
      warm.push(w.tSynced - w.t0)
      const wk = countDiffKeys(w.frames)
      if (expectKeys && wk !== expectKeys) fail(`warm join of ${room} got ${wk} keys, expected ${expectKeys}`)
      w.frames = null
      stopping = true
      w.ws.terminate()
      stopping = false
      await sleep(300)
    }
  }
  emit({ event: 'phase', name: 'done', epochMs: epochNow() })
  await sleep(500)
  const rss1 = await rssMedianKB(3, 200)
  closeAll(holders)
  return { coldMs: cold, warmMs: warm, coldServerCpuS: coldServerCpu, rssPerBigRoomKB: (rss1 - rss0) / bigRooms.length, unexpectedCloses }
}

// ---- shape: stall ----
function newestMtimeMs(dir) {
  let newest = 0
  let entries = []
  try {
    entries = readdirSync(dir)
  } catch {
    return 0
  }
  for (const e of entries) {
    try {
      const st = statSync(join(dir, e))
      if (st.mtimeMs > newest) newest = st.mtimeMs
    } catch {}
  }
  return newest
}

async function shapeStall() {
  const { bigRoom, probeRoom, throttle, saves, baseline, settle, dataDir, probeIntervalMs = 1, timeout = 120 } = P
  const holder = await connect(bigRoom, 'holder', { timeout })
  // The probe runs in a worker thread with its own heap and event loop.
  const cap = Math.ceil((2000 / probeIntervalMs) * ((baseline + saves) * (throttle + settle + 2) + 10))
  const sab = {
    times: new SharedArrayBuffer(cap * 8),
    lats: new SharedArrayBuffer(cap * 8),
    ctl: new SharedArrayBuffer(8),
  }
  const ctl = new Int32Array(sab.ctl)
  const worker = new Worker(new URL('./probe.mjs', import.meta.url), { workerData: { url: cfg.url, room: probeRoom, sab, intervalMs: probeIntervalMs } })
  const inbox = []
  let wake = null
  worker.on('message', (m) => {
    if (m.error) fail(`probe: ${m.error}`)
    inbox.push(m)
    if (wake) wake()
  })
  worker.on('error', (e) => fail(`probe worker: ${e?.stack ?? e}`))
  const next = async (key, ms = 30000) => {
    const until = now() + ms
    while (now() < until) {
      const i = inbox.findIndex((m) => key in m)
      if (i >= 0) return inbox.splice(i, 1)[0]
      await Promise.race([new Promise((r) => (wake = r)), sleep(100)])
    }
    fail(`probe did not send ${key} in ${ms} ms; its last words: ${JSON.stringify(inbox.slice(-3))}`)
  }
  await next('ready', 60000)
  const mark = async () => {
    worker.postMessage('mark')
    return (await next('mark')).mark
  }
  const windows = []
  await mark()
  // Baseline: windows as long as the save windows, with no save anywhere near.
  for (let k = 0; k < baseline; k++) {
    const b0 = epochNow()
    const a = cpuWindow()
    await sleep((throttle + settle) * 1000)
    const b = cpuWindow()
    windows.push({ kind: 'baseline', t0: b0, t1: epochNow(), serverCpuS: b.server - a.server, selfMaxMs: await mark() })
  }
  emit({ event: 'phase', name: 'measure', epochMs: epochNow() })
  for (let k = 0; k < saves; k++) {
    const t0 = epochNow()
    const a = cpuWindow()
    await request(holder, { type: 'patch', messageId: `holder-${k + 1}`, documentPatches: [{ 'bench-edit/pos': { _exists: true, x: k, y: k } }] })
    // Watch the data dir for the save while the throttle runs out.
    let savedAt = null
    const until = t0 + (throttle + settle) * 1000
    while (epochNow() < until) {
      await sleep(50)
      if (savedAt === null && newestMtimeMs(dataDir) > t0) savedAt = epochNow() - t0
    }
    const b = cpuWindow()
    windows.push({ kind: 'save', t0, t1: epochNow(), savedAtMs: savedAt, serverCpuS: b.server - a.server, selfMaxMs: await mark() })
  }
  emit({ event: 'phase', name: 'done', epochMs: epochNow() })
  Atomics.store(ctl, 1, 1)
  await Promise.race([next('done', 5000), sleep(5000)])
  await worker.terminate()
  closeAll([holder])
  const n = Atomics.load(ctl, 0)
  const ackT = new Float64Array(sab.times).subarray(0, n)
  const lat = new Float64Array(sab.lats).subarray(0, n)
  // Longest gap between consecutive probe acks inside each window, and p99 latency.
  const out = []
  for (const w of windows) {
    let maxGap = 0
    let gapAt = null
    let maxLat = 0
    const l = []
    for (let i = 1; i < n; i++) {
      if (ackT[i] < w.t0 || ackT[i] > w.t1) continue
      l.push(lat[i])
      if (lat[i] > maxLat) maxLat = lat[i]
      const g = ackT[i] - ackT[i - 1]
      if (g > maxGap) {
        maxGap = g
        gapAt = ackT[i - 1] - w.t0
      }
    }
    l.sort((x, y) => x - y)
    out.push({
      kind: w.kind, acks: l.length, maxGapMs: maxGap, maxGapAtMs: gapAt, maxLatMs: maxLat,
      probeMaxLoopDelayMs: w.selfMaxMs, p99LatMs: l.length ? l[Math.floor(l.length * 0.99)] : null,
      savedAtMs: w.savedAtMs ?? null, serverCpuS: w.serverCpuS ?? null,
    })
  }
  return { windows: out, probeFull: n >= cap, unexpectedCloses }
}

// ---- shape: idle ----
async function shapeIdle() {
  const { mode, n, settle, prefix, expectKeys, concurrency = 50 } = P
  // Warm the server up first (lazy imports, JIT, buffers) and keep those sessions open.
  const warm = []
  warm.push(await connect(`${prefix}-warm`, 'warm-0'))
  for (let i = 1; i < 10; i++) warm.push(await connect(`${prefix}-warm`, `warm-${i}`))
  for (const s of warm) await request(s, { type: 'patch', messageId: `${s.clientId}-0`, documentPatches: [{ [`${s.clientId}/pos`]: { _exists: true, x: 0, y: 0 } }] })
  await sleep(settle * 1000)
  const rss0 = await rssMedianKB()
  const sessions = []
  const idx = Array.from({ length: n }, (_, i) => i)
  if (mode === 'sessions') {
    sessions.push(await connect(`${prefix}-idle`, 'idle-0'))
    sessions.push(...(await pool(idx.slice(1), concurrency, (i) => connect(`${prefix}-idle`, `idle-${i}`))))
  } else {
    // One room each, one session each. The harness wrote each room a small document to load,
    // so nothing is edited or saved here: no save garbage in the server's heap.
    sessions.push(...(await pool(idx, concurrency, (i) => connect(`${prefix}-room-${i}`, `idle-${i}`))))
    if (expectKeys) {
      const s = sessions[0]
      if (!s.syncTimestamp) fail(`room ${s.roomId} did not load its document (synced at timestamp 0)`)
    }
  }
  // RSS once a second while things settle (V8 shrinks its heap some seconds after the
  // allocation rate drops), then the median of the last samples.
  const series = []
  const t0 = now()
  while (now() - t0 < settle * 1000) {
    series.push(readProc(cfg.serverPid).rssKB)
    await sleep(1000)
  }
  const rss1 = await rssMedianKB()
  const open = sessions.filter((s) => s.ws.readyState === WebSocket.OPEN).length
  closeAll([...sessions, ...warm])
  if (open !== n) fail(`only ${open} of ${n} idle sessions still open`)
  return { mode, n, rss0KB: rss0, rss1KB: rss1, rssSeriesKB: series, perItemBytes: ((rss1 - rss0) * 1024) / n, unexpectedCloses }
}

// ---- shape: burst ----
async function shapeBurst() {
  const { n, bursts, saved, prefix, gapMs = 1000, timeout = 60 } = P
  // One session first, so the server's lazy start-up (imports, first thread) is not
  // counted against the first burst.
  const warm = await connect(`${prefix}-warm`, 'warm-0', { timeout })
  await sleep(gapMs)
  const held = [warm]
  const out = []
  const pct = (v, q) => v[Math.min(v.length - 1, Math.floor(q * v.length))]
  emit({ event: 'phase', name: 'measure', epochMs: epochNow() })
  for (let b = 0; b < bursts; b++) {
    const a = cpuWindow()
    const tb = now()
    // Every socket is opened in this one tick; nothing is awaited in between.
    const pending = []
    for (let i = 0; i < n; i++) pending.push(connect(`${prefix}-b${b}-room-${i}`, `c${b}-${i}`, { timeout }))
    const sessions = await Promise.all(pending)
    const c = cpuWindow()
    held.push(...sessions)
    for (const s of sessions) {
      // A saved room loaded its file (synced at its timestamp); a new room is empty.
      if (saved ? !s.syncTimestamp : s.syncTimestamp) fail(`room ${s.roomId} synced at ${s.syncTimestamp}, saved=${saved}`)
    }
    const joins = sessions.map((s) => s.tSynced - s.t0).sort((x, y) => x - y)
    const opens = sessions.map((s) => s.tOpen - s.t0).sort((x, y) => x - y)
    const after = sessions.map((s) => s.tSynced - s.tOpen).sort((x, y) => x - y)
    out.push({
      p50Ms: pct(joins, 0.5), p99Ms: pct(joins, 0.99), maxMs: joins[joins.length - 1],
      openP50Ms: pct(opens, 0.5), openP99Ms: pct(opens, 0.99),
      afterOpenP50Ms: pct(after, 0.5), afterOpenP99Ms: pct(after, 0.99),
      wallMs: Math.max(...sessions.map((s) => s.tSynced)) - tb,
      serverCpuS: c.server - a.server, loadgenCpuS: cpuDelta(a, c).loadgenCpuS,
    })
    await sleep(gapMs)
  }
  emit({ event: 'phase', name: 'done', epochMs: epochNow() })
  closeAll(held)
  return { n, bursts: out, unexpectedCloses }
}

const shapes = { edit: shapeEdit, join: shapeJoin, stall: shapeStall, idle: shapeIdle, burst: shapeBurst }
try {
  const fn = shapes[cfg.shape]
  if (!fn) fail(`unknown shape ${cfg.shape}`)
  const result = await fn()
  emit({ event: 'result', shard: shard.index, result })
  process.exit(0)
} catch (e) {
  fail(e?.stack ?? e)
}
