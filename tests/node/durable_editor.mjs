// Real npm clients that edit without pause, and report every edit the server acked.
//
//   node tests/node/durable_editor.mjs --url ws://127.0.0.1:PORT/ --room a --room b \
//        [--clients 2] [--keys 6] [--node-modules DIR]
//
// Starts --clients `WebsocketAdapter`s of @woven-ecs/canvas-store per room (client ids
// `ROOM-c0`, `ROOM-c1`, ...) and runs the loop `CanvasStore.sync()` runs, every 16 ms: pull
// from the adapter, then push this frame's local edits. Each frame every client writes one of
// its own keys, `CLIENT/kN` (N < --keys), as `{ _exists: true, v }`, with `v` counting up per
// client, so a key's values only ever grow; and it moves its presence (`CLIENT/cursor`).
// The adapters reconnect on their own when the server goes away, as they do in a browser.
//
// The adapter takes the global WebSocket; ours is `ws`'s, wrapped to watch the frames. One JSON
// line on stdout per event:
//   {"event":"ack","client":C,"room":R,"messageId":M,"timestamp":T,"values":{KEY:V,...},
//    "inFlight":false}
//        the server acked M; `values` are the `v`s M's document patch carried. `inFlight` is
//        whether the adapter still holds M after handling the ack (it must not).
//   {"event":"reconnect","client":C,"room":R,"lastTimestamp":L,"values":{KEY:V,...}}
//        the adapter sent `reconnect`, carrying these values of its offline buffer
//   {"event":"synced","client":C,"room":R,"timestamp":T}   a `synced` frame arrived
//   {"event":"resync","client":C,"room":R,"since":S}        the server asked for a resync
//                                                         (it has gone back in time)
//   {"event":"closed","client":C,"room":R,"code":N}         a socket closed
//   {"event":"error","message":...}                         then it exits with status 1
// On stdin EOF (or a line `stop`) it closes every client, prints {"event":"stopped"} and exits 0.
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
    url: { type: 'string' },
    room: { type: 'string', multiple: true },
    clients: { type: 'string', default: '2' },
    keys: { type: 'string', default: '6' },
    'node-modules': { type: 'string' },
  },
})
if (!options.url || !options.room) {
  console.error('usage: durable_editor.mjs --url URL --room ROOM [--room ROOM...] [--clients N] [--keys N]')
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

/** `ws` as a browser-style WebSocket, watching what the adapter sends and receives. */
class WatchingWebSocket extends WsWebSocket {
  constructor(url, ...rest) {
    super(url, ...rest)
    const params = new URL(url).searchParams
    this.who = { client: params.get('clientId'), room: params.get('roomId') }
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
  constructor(room, clientId, keys) {
    this.clientId = clientId
    this.keys = keys
    this.n = 0
    this.adapter = new WebsocketAdapter({
      url: options.url,
      clientId,
      documentId: room,
      usePersistence: false,
      components: [],
      singletons: [],
    })
    adapters.set(clientId, this.adapter)
  }

  /** One `CanvasStore.sync()` frame, with this frame's edit. */
  frame() {
    this.n += 1
    const key = `${this.clientId}/k${this.n % this.keys}`
    const local = [
      { patch: { [key]: { _exists: true, v: this.n } }, origin: ECS, syncBehavior: 'document' },
      { patch: { [`${this.clientId}/cursor`]: { _exists: true, x: this.n } }, origin: ECS, syncBehavior: 'ephemeral' },
    ]
    this.adapter.push([...local, ...this.adapter.pull()])
  }
}

const editors = []
for (const room of options.room) {
  for (let i = 0; i < Number(options.clients); i++) {
    editors.push(new Editor(room, `${room}-c${i}`, Number(options.keys)))
  }
}
await Promise.all(editors.map((e) => e.adapter.init()))
const timer = setInterval(() => {
  for (const e of editors) e.frame()
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
  if (line.trim() === 'stop') stop()
})
input.on('close', stop)
