// One real npm client with a JWT, for tests/test_jwt.py:
//
//   node tests/node/jwt_client.mjs --url ws://127.0.0.1:PORT/ --room R --client C \
//        --token JWT [--refresh JWT] --node-modules DIR
//
// A `WebsocketAdapter` of @woven-ecs/canvas-store connects with `token` (the adapter puts it
// in the `token` query parameter). Once synced it pushes one edit, `C/note`, and once that is
// acked it calls `setToken(--refresh)` (an `auth-refresh` frame). One JSON line on stdout
// per event, and it exits 0 after the first close:
//   {"event":"synced"}  {"event":"ack","messageId":M}  {"event":"refreshed"}
//   {"event":"closed","code":N,"reason":S}
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

const { values: options } = parseArgs({
  options: {
    url: { type: 'string' },
    room: { type: 'string' },
    client: { type: 'string' },
    token: { type: 'string' },
    refresh: { type: 'string' },
    'node-modules': { type: 'string' },
  },
})
const require = createRequire(join(options['node-modules'], 'resolve-from-here.js'))
const { WebsocketAdapter } = require('@woven-ecs/canvas-store')
const { WebSocket: WsWebSocket } = require('ws')

const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`)
let adapter
let synced = false
let pushed = false

/** `ws` as a browser-style WebSocket that reports acks and the close. */
class WatchingWebSocket extends WsWebSocket {
  constructor(...args) {
    super(...args)
    this.addEventListener('message', (ev) => {
      const msg = JSON.parse(ev.data)
      if (msg.type !== 'ack') return
      emit({ event: 'ack', messageId: msg.messageId })
      if (options.refresh) {
        adapter.setToken(options.refresh)
        emit({ event: 'refreshed' })
      }
    })
    this.addEventListener('close', (ev) => {
      emit({ event: 'closed', code: ev.code, reason: ev.reason })
      adapter.close()
      setTimeout(() => process.exit(0), 50)
    })
  }
}
globalThis.WebSocket = WatchingWebSocket

adapter = new WebsocketAdapter({
  url: options.url,
  clientId: options.client,
  documentId: options.room,
  token: options.token,
  usePersistence: false,
  components: [],
  singletons: [],
  onSynced: () => {
    synced = true
    emit({ event: 'synced' })
  },
})
// What `CanvasStore.sync()` does every frame: pull (which reports `synced`), then push.
setInterval(() => {
  adapter.pull()
  if (synced && !pushed) {
    pushed = true
    const note = { [`${options.client}/note`]: { _exists: true, text: 'signed in' } }
    adapter.push([{ patch: note, origin: 1, syncBehavior: 'document' }]) // 1: Origin.ECS
  }
}, 16)
await adapter.init()
