// Real npm clients that edit without pause, and report every edit the server acked.
//
//   node tests/node/durable_editor.mjs --url ws://127.0.0.1:PORT/ [--url ws://...] \
//        --room a --room b [--clients 2] [--keys 6] [--node-modules DIR]
//
// Starts --clients `WebsocketAdapter`s of @woven-ecs/canvas-store per room (client ids
// `ROOM-c0`, `ROOM-c1`, ...) and runs the loop `CanvasStore.sync()` runs, every 16 ms: pull
// from the adapter, then push this frame's local edits. Each frame every client writes one of
// its own keys, `CLIENT/kN` (N < --keys), as `{ _exists: true, v }`, with `v` counting up per
// client, so a key's values only ever grow; and it moves its presence (`CLIENT/cursor`).
// The adapters reconnect on their own when the server goes away, as they do in a browser.
// With several --url, client i of the j-th room connects to URL number (i + j) modulo their
// count (several servers, each room's clients spread over them).
//
// The adapter takes the global WebSocket; ours is `ws`'s, wrapped to watch the frames. One JSON
// line on stdout per event; each names the `server` (HOST:PORT) of the socket it came from:
//   {"event":"ack","client":C,"room":R,"server":S,"messageId":M,"timestamp":T,
//    "values":{KEY:V,...},"inFlight":false}
//        the server acked M; `values` are the `v`s M's document patch carried. `inFlight` is
//        whether the adapter still holds M after handling the ack (it must not).
//   {"event":"reconnect","client":C,"room":R,"server":S,"lastTimestamp":L,"values":{KEY:V,...}}
//        the adapter sent `reconnect`, carrying these values of its offline buffer
//   {"event":"synced","client":C,"room":R,"server":S,"timestamp":T}   a `synced` frame arrived
//   {"event":"resync","client":C,"room":R,"server":S,"since":S}  the server asked for a resync
//                                                         (it has gone back in time)
//   {"event":"closed","client":C,"room":R,"server":S,"code":N}   a socket closed
//   {"event":"error","message":...}                         then it exits with status 1
// Lines on stdin steer it:
//   `url ROOM URL`  that room's clients connect to URL from their next (re)connect on
//   `settle`        stop editing; once no client has an edit unacked or unsent and no frame has
//                   arrived for 300 ms, print {"event":"state","client":C,"room":R,"state":{...}}
//                   per client (its adapter's view of the document) and {"event":"settled"}
//   `stop` (or EOF) close every client, print {"event":"stopped"} and exit 0.
//
// The packages are loaded from --node-modules, else the first $NODE_PATH entry holding
// @woven-ecs/canvas-store, else node/node_modules of this repository.
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { requireFromNodeModules } from './packages.mjs'

const FRAME_MS = 16
const ECS = 1 // the client's Origin.ECS

const { values: options } = parseArgs({
  options: {
    url: { type: 'string', multiple: true },
    room: { type: 'string', multiple: true },
    clients: { type: 'string', default: '2' },
    keys: { type: 'string', default: '6' },
    'node-modules': { type: 'string' },
  },
})
if (!options.url || !options.room) {
  console.error('usage: durable_editor.mjs --url URL [--url URL...] --room ROOM [--room ROOM...] [--clients N] [--keys N]')
  process.exit(2)
}

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`)
}

function fail(err) {
  emit({ event: 'error', message: String(err?.stack ?? err) })
  process.exit(1)
}
process.on('uncaughtException', fail)
process.on('unhandledRejection', fail)

const require = requireFromNodeModules(options['node-modules'])
const { WebsocketAdapter } = require('@woven-ecs/canvas-store')
const { WebSocket: WsWebSocket } = require('ws')

/** clientId -> its adapter, so a socket can ask whether the adapter let go of an ack. */
const adapters = new Map()
/** When the last frame arrived from any server (performance.now()). */
let lastFrameAt = 0

/** `ws` as a browser-style WebSocket, watching what the adapter sends and receives. */
class WatchingWebSocket extends WsWebSocket {
  constructor(url, ...rest) {
    super(url, ...rest)
    const parsed = new URL(url)
    const params = parsed.searchParams
    this.who = { client: params.get('clientId'), room: params.get('roomId'), server: parsed.host }
    /** messageId -> the values its document patch carried, until acked (per socket). */
    this.sent = new Map()
    this.addEventListener('message', (ev) => this.received(ev.data))
    this.addEventListener('close', (ev) => emit({ event: 'closed', ...this.who, code: ev.code }))
  }

  send(data, ...rest) {
    const msg = JSON.parse(data)
    const values = {}
    for (const patch of msg.documentPatches ?? []) {
      for (const [key, record] of Object.entries(patch)) {
        if (typeof record.v === 'number') values[key] = record.v
      }
    }
    if (msg.type === 'patch' && msg.documentPatches?.length) {
      this.sent.set(msg.messageId, values)
    } else if (msg.type === 'reconnect') {
      emit({ event: 'reconnect', ...this.who, lastTimestamp: msg.lastTimestamp, values })
    }
    return super.send(data, ...rest)
  }

  received(data) {
    lastFrameAt = performance.now()
    const msg = JSON.parse(data)
    if (msg.type === 'ack' && this.sent.has(msg.messageId)) {
      const values = this.sent.get(msg.messageId)
      this.sent.delete(msg.messageId)
      // This listener runs before the adapter's; look once the adapter has handled it.
      queueMicrotask(() => {
        const inFlight = adapters.get(this.who.client).inFlight.has(msg.messageId)
        emit({ event: 'ack', ...this.who, messageId: msg.messageId, timestamp: msg.timestamp, values, inFlight })
      })
    } else if (msg.type === 'synced') {
      emit({ event: 'synced', ...this.who, timestamp: msg.timestamp })
    } else if (msg.type === 'resync') {
      emit({ event: 'resync', ...this.who, since: msg.since })
    }
  }
}
globalThis.WebSocket = WatchingWebSocket

class Editor {
  constructor(room, clientId, keys, url) {
    this.room = room
    this.clientId = clientId
    this.keys = keys
    this.n = 0
    this.adapter = new WebsocketAdapter({
      url,
      clientId,
      documentId: room,
      usePersistence: false,
      components: [],
      singletons: [],
    })
    adapters.set(clientId, this.adapter)
  }

  /** One `CanvasStore.sync()` frame, with this frame's edit (none once settling). */
  frame() {
    if (settling) {
      this.adapter.push(this.adapter.pull())
      return
    }
    this.n += 1
    const key = `${this.clientId}/k${this.n % this.keys}`
    const local = [
      { patch: { [key]: { _exists: true, v: this.n } }, origin: ECS, syncBehavior: 'document' },
      { patch: { [`${this.clientId}/cursor`]: { _exists: true, x: this.n } }, origin: ECS, syncBehavior: 'ephemeral' },
    ]
    this.adapter.push([...local, ...this.adapter.pull()])
  }

  /** Whether every edit of this client has been sent and acked. */
  idle() {
    const a = this.adapter
    return a.isOnline && a.inFlight.size === 0 && Object.keys(a.offlineBuffer).length === 0 &&
      a.documentSendBuffer.length === 0
  }
}

let settling = false
let settled = false
const editors = []
options.room.forEach((room, j) => {
  for (let i = 0; i < Number(options.clients); i++) {
    const url = options.url[(i + j) % options.url.length]
    editors.push(new Editor(room, `${room}-c${i}`, Number(options.keys), url))
  }
})
await Promise.all(editors.map((e) => e.adapter.init()))
const timer = setInterval(() => {
  for (const e of editors) e.frame()
  if (settling && !settled && performance.now() - lastFrameAt > 300 && editors.every((e) => e.idle())) {
    settled = true
    for (const e of editors) {
      emit({ event: 'state', client: e.clientId, room: e.room, state: e.adapter.state })
    }
    emit({ event: 'settled' })
  }
}, FRAME_MS)

let stopping = false
function stop() {
  if (stopping) return
  stopping = true
  clearInterval(timer)
  for (const e of editors) e.adapter.close()
  emit({ event: 'stopped' })
  setTimeout(() => process.exit(0), 50)
}
const input = createInterface({ input: process.stdin })
input.on('line', (line) => {
  const [command, ...args] = line.trim().split(/\s+/)
  if (command === 'stop') {
    stop()
  } else if (command === 'settle') {
    settling = true
  } else if (command === 'url' && args.length === 2) {
    for (const e of editors) if (e.room === args[0]) e.adapter.url = args[1]
  } else if (command) {
    fail(`unknown command ${JSON.stringify(line)}`)
  }
})
input.on('close', stop)
