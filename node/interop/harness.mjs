// Shared machinery for the interop suite: starting/stopping the server under test, a recording
// WebSocket for the real client, and a test client that drives the real `WebsocketAdapter`
// exactly as `CanvasStore.sync()` does every frame (pull from every adapter, then push the
// whole list to every adapter).
//
// Environment:
//   CANVAS_STORE_SERVER_CMD   command that starts the server under test, as a JSON array or a
//                             whitespace-separated string. The harness appends
//                             `--host 127.0.0.1 --port P --data-dir D --save-throttle S
//                             --idle-timeout S [--authorize SPEC]` and reads the port from the
//                             first `ws://HOST:PORT` it prints (stdout or stderr).
//                             Default: the Node reference server (reference-server.mjs).
//   CANVAS_STORE_AUTHORIZE    SPEC passed to --authorize (default `interop_auth:authorize`,
//                             i.e. tests/interop_auth.py on PYTHONPATH).
//   CANVAS_STORE_SERVER_KIND  `reference` or `trio`; only used to mark tests of known reference
//                             bugs as todo. Default: `reference` when CANVAS_STORE_SERVER_CMD is
//                             unset, `trio` otherwise.
//   CANVAS_STORE_INTEROP_VERBOSE=1  print server output and frame logs as tests run.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { after, before } from 'node:test'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { materializeFields, WebsocketAdapter } from '@woven-ecs/canvas-store'
import { WebSocket as WsWebSocket } from 'ws'

const HERE = dirname(fileURLToPath(import.meta.url))

export const VERBOSE = process.env.CANVAS_STORE_INTEROP_VERBOSE === '1'
export const SERVER_KIND =
  process.env.CANVAS_STORE_SERVER_KIND ?? (process.env.CANVAS_STORE_SERVER_CMD ? 'trio' : 'reference')
export const IS_REFERENCE = SERVER_KIND === 'reference'

// Mirrors the client's (unexported) `Origin` constants, src/constants.ts.
export const Origin = { ECS: 1, History: 2, Persistence: 3, Websocket: 4, Snapshot: 5 }

/** One animation frame, as the client's app loop would run `store.sync()`. */
export const FRAME_MS = 16

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// ---------------------------------------------------------------------------
// Frame recording
// ---------------------------------------------------------------------------

/** clientId -> [{ seq, conn, dir: 'in' | 'out', msg }] for every frame on every socket. */
const framesByClient = new Map()
let frameSeq = 0
const connCounter = new Map()

function record(clientId, conn, dir, raw) {
  let msg
  try {
    msg = JSON.parse(raw)
  } catch {
    msg = { unparseable: String(raw) }
  }
  if (!framesByClient.has(clientId)) framesByClient.set(clientId, [])
  const entry = { seq: ++frameSeq, conn, dir, msg }
  framesByClient.get(clientId).push(entry)
  if (VERBOSE) console.log(`[${clientId}#${conn}] ${dir === 'in' ? '<-' : '->'} ${raw}`)
}

/**
 * The browser-style WebSocket the client constructs (`new WebSocket(url)`), backed by `ws`
 * (Node 20 has no global WebSocket), recording every text frame both ways.
 */
class RecordingWebSocket extends WsWebSocket {
  constructor(url, ...rest) {
    super(url, ...rest)
    const clientId = new URL(url).searchParams.get('clientId') ?? '?'
    const conn = (connCounter.get(clientId) ?? 0) + 1
    connCounter.set(clientId, conn)
    this._rec = { clientId, conn }
    this.addEventListener('message', (ev) => record(clientId, conn, 'in', ev.data))
    this.addEventListener('close', (ev) => {
      if (!framesByClient.has(clientId)) framesByClient.set(clientId, [])
      framesByClient.get(clientId).push({ seq: ++frameSeq, conn, dir: 'close', msg: { code: ev.code, reason: ev.reason } })
      if (VERBOSE) console.log(`[${clientId}#${conn}] closed ${ev.code} ${ev.reason}`)
    })
  }

  send(data, ...rest) {
    record(this._rec.clientId, this._rec.conn, 'out', data)
    return super.send(data, ...rest)
  }
}
globalThis.WebSocket = RecordingWebSocket

export function framesOf(clientId) {
  return framesByClient.get(clientId) ?? []
}

export function formatFrames(clientIds, tail = 40) {
  const lines = []
  for (const id of clientIds) {
    const frames = framesOf(id)
    lines.push(`--- frames of client ${id} (last ${Math.min(tail, frames.length)} of ${frames.length}) ---`)
    for (const f of frames.slice(-tail)) {
      const arrow = f.dir === 'in' ? '<-' : f.dir === 'out' ? '->' : '##'
      let text = JSON.stringify(f.msg)
      if (text.length > 600) text = `${text.slice(0, 600)}...`
      lines.push(`  #${f.seq} conn${f.conn} ${arrow} ${text}`)
    }
  }
  return lines.join('\n')
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/**
 * Poll `cond` until it returns a truthy value (which is returned). On timeout throw an error
 * naming `what`, with the frame logs of `clients` and whatever `explain()` returns.
 */
export async function waitFor(cond, { what, timeout = 5000, clients = [], explain, interval = 10 } = {}) {
  const deadline = Date.now() + timeout
  let lastError
  for (;;) {
    try {
      const value = await cond()
      if (value) return value
    } catch (err) {
      lastError = err
    }
    if (Date.now() > deadline) break
    await sleep(interval)
  }
  const parts = [`timed out after ${timeout} ms waiting for: ${what}`]
  if (lastError) parts.push(`last error: ${lastError.stack ?? lastError}`)
  if (explain) parts.push(String(explain()))
  const ids = clients.map((c) => (typeof c === 'string' ? c : c.clientId))
  if (ids.length > 0) parts.push(formatFrames(ids))
  throw new Error(parts.join('\n'))
}

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

const liveServers = new Set()
process.on('exit', () => {
  for (const s of liveServers) {
    try {
      s.proc.kill('SIGKILL')
    } catch {}
  }
})

/** The Node reference server, whatever the server under test is. */
export const REFERENCE_COMMAND = [process.execPath, join(HERE, '..', 'reference-server.mjs')]

export function serverCommand() {
  const raw = process.env.CANVAS_STORE_SERVER_CMD
  if (!raw) return REFERENCE_COMMAND
  const trimmed = raw.trim()
  if (trimmed.startsWith('[')) return JSON.parse(trimmed)
  return trimmed.split(/\s+/)
}

export function makeDataDir(prefix = 'cs-interop-') {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  return dir
}

/**
 * A server process under test. `start()` launches it (on `port`, 0 = any) and resolves once
 * it prints its `ws://` address; `restart()` launches it again on the same port and data dir.
 */
export class ServerProcess {
  /**
   * `durableAcks`: true or false passes `--durable-acks` or `--no-durable-acks` to the server
   * under test (the reference has no such flag and acks from memory); undefined passes none.
   * `trioArgs`: more options, for canvas-store-trio only (the reference gets none of them).
   */
  constructor({ dataDir, saveThrottle = 0.3, idleTimeout = 2, authorize = false, name = 'server', command, durableAcks, trioArgs = [] } = {}) {
    this.command = command
    this.durableAcks = durableAcks
    this.trioArgs = trioArgs
    this.dataDir = dataDir ?? makeDataDir()
    this.ownsDataDir = dataDir === undefined
    this.saveThrottle = saveThrottle
    this.idleTimeout = idleTimeout
    this.authorize = authorize
    this.name = name
    this.port = 0
    this.proc = null
    this.output = ''
    this.exit = null
    this.generation = 0
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/`
  }

  async start({ timeout = 20000 } = {}) {
    if (this.proc) throw new Error('server already running')
    const [cmd, ...baseArgs] = this.command ?? serverCommand()
    const args = [
      ...baseArgs,
      '--host',
      '127.0.0.1',
      '--port',
      String(this.port),
      '--data-dir',
      this.dataDir,
      '--save-throttle',
      String(this.saveThrottle),
      '--idle-timeout',
      String(this.idleTimeout),
    ]
    if (this.durableAcks !== undefined && !IS_REFERENCE) {
      args.push(this.durableAcks ? '--durable-acks' : '--no-durable-acks')
    }
    if (this.authorize) args.push('--authorize', process.env.CANVAS_STORE_AUTHORIZE ?? 'interop_auth:authorize')
    if (!IS_REFERENCE) args.push(...this.trioArgs)
    this.generation += 1
    const gen = this.generation
    this.output += `\n=== ${this.name} start #${gen}: ${[cmd, ...args].join(' ')}\n`
    const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: process.env })
    this.proc = proc
    this.exit = null
    const entry = { proc }
    liveServers.add(entry)
    this.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => {
        liveServers.delete(entry)
        this.exit = { code, signal }
        this.output += `=== ${this.name} #${gen} exited: code=${code} signal=${signal}\n`
        if (this.proc === proc) this.proc = null
        resolve(this.exit)
      })
    })
    let startTimer
    const listening = new Promise((resolve, reject) => {
      let buffered = ''
      const onData = (chunk) => {
        const text = chunk.toString()
        this.output += text
        if (VERBOSE) {
          for (const line of text.split('\n')) if (line) console.log(`[${this.name}#${gen}] ${line}`)
        }
        buffered += text
        const m = /ws:\/\/[^\s/:]+:(\d+)/.exec(buffered)
        if (m) {
          buffered = ''
          resolve(Number(m[1]))
        }
      }
      proc.stdout.on('data', onData)
      proc.stderr.on('data', onData)
      proc.on('error', (err) => reject(new Error(`could not start ${cmd}: ${err.message}`)))
      proc.on('exit', (code, signal) =>
        reject(new Error(`${this.name} exited (code=${code} signal=${signal}) before listening:\n${this.output}`)),
      )
      startTimer = setTimeout(
        () => reject(new Error(`${this.name} printed no ws:// address within ${timeout} ms:\n${this.output}`)),
        timeout,
      )
    })
    try {
      const port = await listening
      if (this.port !== 0 && port !== this.port) throw new Error(`asked for port ${this.port}, server says ${port}`)
      this.port = port
    } catch (err) {
      proc.kill('SIGKILL')
      throw err
    } finally {
      clearTimeout(startTimer)
    }
    return this
  }

  /** SIGTERM and wait; resolves to { code, signal }. Escalates to SIGKILL after `timeout`. */
  async stop({ timeout = 10000 } = {}) {
    if (!this.proc) return this.exit
    this.proc.kill('SIGTERM')
    const timer = setTimeout(() => this.proc?.kill('SIGKILL'), timeout)
    const exit = await this.exited
    clearTimeout(timer)
    return exit
  }

  /** SIGKILL: no shutdown, no flush. */
  async kill() {
    if (!this.proc) return this.exit
    this.proc.kill('SIGKILL')
    return await this.exited
  }

  async restart() {
    await this.start()
  }

  /** The room's snapshot file as the Node FileStorage names it (plain room ids only). */
  snapshotPath(roomId) {
    return join(this.dataDir, `${roomId}.json`)
  }

  readSnapshot(roomId) {
    try {
      return JSON.parse(readFileSync(this.snapshotPath(roomId), 'utf-8'))
    } catch {
      return null
    }
  }

  async dispose() {
    if (this.proc) {
      await this.stop({ timeout: 3000 })
    }
    // A traceback or error in the server's log is worth seeing even when the tests pass.
    if (!VERBOSE && /traceback|exception|error|unhandled/i.test(this.output)) {
      console.log(`--- ${this.name} server output (it mentions an error) ---\n${this.output}`)
    }
    if (this.ownsDataDir) rmSync(this.dataDir, { recursive: true, force: true })
  }
}

// ---------------------------------------------------------------------------
// Document model helpers
// ---------------------------------------------------------------------------

/**
 * Apply a document patch to a plain key -> record map the way the client's ECS world ends up
 * (and the way the server applies it): tombstones kept as `{_exists:false}`, partial writes to
 * missing/dead keys dropped, buffer deltas materialized.
 */
export function applyDocPatch(state, patch) {
  for (const [key, value] of Object.entries(patch)) {
    if (value._exists === false) {
      state[key] = { _exists: false }
      continue
    }
    const existing = state[key]
    const live = existing && existing._exists !== false ? existing : undefined
    if (!live && value._exists !== true) continue
    state[key] = materializeFields(live, value)
  }
}

/** Live records only (tombstones dropped), with stable key order, for comparisons. */
export function liveView(state) {
  const out = {}
  for (const key of Object.keys(state).sort()) {
    if (state[key]?._exists === false) continue
    out[key] = state[key]
  }
  return out
}

export function sameJson(a, b) {
  return JSON.stringify(a) === JSON.stringify(b)
}

// ---------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------

/**
 * An app around the real `WebsocketAdapter`. It plays the ECS adapter's part: local edits are
 * mutations of origin ECS, already applied to the local model when made; mutations pulled from
 * the websocket adapter are applied to the model in `push`. Every FRAME_MS it runs exactly
 * what `CanvasStore.sync()` runs: pull from each adapter (app first, then websocket), then push
 * the whole list to each adapter.
 */
export class TestClient {
  constructor({ url, room, clientId, token, startOffline = false }) {
    this.clientId = clientId
    this.room = room
    this.doc = {}
    this.presence = {}
    this.local = []
    this.synced = false
    this.syncedCount = 0
    this.online = false
    this.adapter = new WebsocketAdapter({
      url,
      clientId,
      documentId: room,
      usePersistence: false,
      startOffline,
      token,
      onSynced: () => {
        this.synced = true
        this.syncedCount += 1
      },
      onConnectivityChange: (online) => {
        this.online = online
      },
      components: [],
      singletons: [],
    })
    this.timer = null
    this.closed = false
  }

  /** `adapter.init()` (connects unless startOffline) and start the frame loop. */
  async start() {
    await this.adapter.init()
    this.timer = setInterval(() => this.frame(), FRAME_MS)
    return this
  }

  /** One `CanvasStore.sync()` frame. */
  frame() {
    const all = []
    // "ECS" adapter pull: the local edits of this frame.
    all.push(...this.local.splice(0))
    // Websocket adapter pull.
    all.push(...this.adapter.pull())
    // Push the same list to every adapter. The "ECS" side skips its own origin.
    for (const m of all) {
      if (m.origin === Origin.ECS) continue
      if (m.syncBehavior === 'document') applyDocPatch(this.doc, m.patch)
      else if (m.syncBehavior === 'ephemeral') this.applyPresence(m.patch)
    }
    this.adapter.push(all)
  }

  applyPresence(patch) {
    for (const [key, value] of Object.entries(patch)) {
      if (value._exists === false) delete this.presence[key]
      else if (this.presence[key] || value._exists === true) this.presence[key] = materializeFields(this.presence[key], value)
    }
  }

  /** A local document edit, sent by the next frame. */
  edit(patch) {
    applyDocPatch(this.doc, patch)
    this.local.push({ patch: structuredClone(patch), origin: Origin.ECS, syncBehavior: 'document' })
  }

  /** A local presence (ephemeral) edit. */
  setPresence(patch) {
    this.local.push({ patch: structuredClone(patch), origin: Origin.ECS, syncBehavior: 'ephemeral' })
  }

  live() {
    return liveView(this.doc)
  }

  /** Messages of `type` received, on connection `conn` only or on connections after `after`. */
  framesIn(type, { conn, after } = {}) {
    return this.frames('in', type, conn, after)
  }

  /** Messages of `type` sent, on connection `conn` only or on connections after `after`. */
  framesOut(type, { conn, after } = {}) {
    return this.frames('out', type, conn, after)
  }

  frames(dir, type, conn, after) {
    return framesOf(this.clientId)
      .filter(
        (f) =>
          f.dir === dir &&
          f.msg.type === type &&
          (conn === undefined || f.conn === conn) &&
          (after === undefined || f.conn > after),
      )
      .map((f) => f.msg)
  }

  /** Number of connections this client has opened so far. */
  get connections() {
    return connCounter.get(this.clientId) ?? 0
  }

  /** The last clientCount the server sent on the current connection. */
  lastClientCount() {
    const counts = this.framesIn('clientCount', { conn: this.connections })
    return counts.length ? counts[counts.length - 1].count : undefined
  }

  /** True when every local document edit has been sent and acked (reads the adapter's fields). */
  allAcked() {
    const a = this.adapter
    return (
      a.isOnline &&
      this.local.length === 0 &&
      a.documentSendBuffer.length === 0 &&
      Object.keys(a.offlineBuffer).length === 0 &&
      a.inFlight.size === 0
    )
  }

  /** The highest ack timestamp received (all connections). */
  lastAckTimestamp() {
    return Math.max(0, ...this.framesIn('ack').map((m) => m.timestamp))
  }

  disconnect() {
    this.adapter.disconnect()
  }

  async reconnect() {
    await this.adapter.reconnect()
  }

  close() {
    if (this.closed) return
    this.closed = true
    clearInterval(this.timer)
    this.adapter.close()
  }
}

let clientSeq = 0
/** A unique client id with a readable prefix. */
export function cid(prefix) {
  clientSeq += 1
  return `${prefix}-${process.pid}-${clientSeq}`
}

/**
 * Start clients one after the other, each waiting for `synced` (applied by a frame) before the
 * next one connects. (Connecting them together is a separate test: the reference server splits
 * simultaneous first connections into two rooms.)
 */
export async function connectAll(clients, { timeout = 8000 } = {}) {
  for (const c of clients) {
    await c.start()
    await waitFor(() => c.synced, { what: `synced on ${c.clientId}`, timeout, clients: [c] })
  }
  return clients
}

/** Start clients in the same tick and wait until all of them are synced. */
export async function connectTogether(clients, { timeout = 8000 } = {}) {
  await Promise.all(clients.map((c) => c.start()))
  await waitFor(() => clients.every((c) => c.synced), { what: 'synced on every client', timeout, clients })
  return clients
}

/** Wait until every client has the same live document, and (optionally) that it equals `expected`. */
export async function waitConverged(clients, { expected, timeout = 5000, what = 'documents converge' } = {}) {
  await waitFor(
    () => {
      const first = JSON.stringify(clients[0].live())
      if (expected !== undefined && first !== JSON.stringify(liveView(expected))) return false
      return clients.every((c) => JSON.stringify(c.live()) === first)
    },
    {
      what,
      timeout,
      clients,
      explain: () =>
        [
          expected !== undefined ? `expected: ${JSON.stringify(liveView(expected))}` : '',
          ...clients.map((c) => `${c.clientId}: ${JSON.stringify(c.live())}`),
        ].join('\n'),
    },
  )
}

/** Start `server` before the file's tests; after them, close `clients`, stop the server
 * and require that it exited cleanly (code 0) on SIGTERM. */
export function serveAround(server, clients) {
  before(async () => {
    await server.start()
  })
  after(async () => {
    for (const c of clients) c.close()
    const exit = await server.stop()
    await server.dispose()
    assert.equal(exit.code, 0, `server exit on SIGTERM: ${JSON.stringify(exit)}\n${server.output}`)
  })
}
