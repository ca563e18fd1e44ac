// A real npm client for tests/test_client.py: one `WebsocketAdapter` of @woven-ecs/canvas-store,
// run as `CanvasStore.sync()` runs it, and told what to edit on stdin.
//
//   node tests/node/npm_peer.mjs --url ws://127.0.0.1:PORT/ --room R --client C \
//        [--node-modules DIR]
//
// Every 16 ms it pulls from the adapter, then pushes back what it pulled together with the
// edits read since the last frame (origin ECS, as the ECS adapter sends them). stdin, one JSON
// object a line:
//   {"edit": PATCH}       a document edit
//   {"presence": PATCH}   a presence (ephemeral) edit
//   {"report": true}      print one line {"state", "presence", "unsent", "synced"}: the adapter's
//                         mirror of the document, the others' presence as pulled, how many edits
//                         are not sent or not acked yet, and how many `synced` frames came
// On stdin EOF it closes the adapter and exits 0. Packages: see packages.mjs.
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { requireFromNodeModules } from './packages.mjs'

const FRAME_MS = 16
const ECS = 1 // the client's Origin.ECS

const { values: options } = parseArgs({
  options: {
    url: { type: 'string' },
    room: { type: 'string' },
    client: { type: 'string' },
    'node-modules': { type: 'string' },
  },
})
const require = requireFromNodeModules(options['node-modules'])
const { WebsocketAdapter } = require('@woven-ecs/canvas-store')
globalThis.WebSocket = require('ws').WebSocket // Node 20 has no global WebSocket

let synced = 0
const adapter = new WebsocketAdapter({
  url: options.url,
  clientId: options.client,
  documentId: options.room,
  usePersistence: false,
  components: [],
  singletons: [],
  onSynced: () => { synced += 1 },
})

/** The others' presence as the adapter hands it over: key -> record, deletions dropped. */
const presence = {}
let queued = []

function frame() {
  const pulled = adapter.pull()
  for (const m of pulled) {
    if (m.syncBehavior !== 'ephemeral') continue
    for (const [key, value] of Object.entries(m.patch)) {
      if (value._exists === false) delete presence[key]
      else presence[key] = { ...presence[key], ...value }
    }
  }
  adapter.push([...queued, ...pulled])
  queued = []
}

function report() {
  const unsent = queued.length + adapter.documentSendBuffer.length + adapter.inFlight.size +
    Object.keys(adapter.offlineBuffer).length
  process.stdout.write(`${JSON.stringify({ state: adapter.state, presence, unsent, synced })}\n`)
}

await adapter.init()
const timer = setInterval(frame, FRAME_MS)
const input = createInterface({ input: process.stdin })
input.on('line', (line) => {
  const command = JSON.parse(line)
  if (command.edit) queued.push({ patch: command.edit, origin: ECS, syncBehavior: 'document' })
  if (command.presence) queued.push({ patch: command.presence, origin: ECS, syncBehavior: 'ephemeral' })
  if (command.report) report()
})
input.on('close', () => {
  clearInterval(timer)
  adapter.close()
  setTimeout(() => process.exit(0), 50)
})
