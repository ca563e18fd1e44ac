// The Node reference server (@woven-ecs/canvas-store-server, pinned in package.json),
// configured like `canvas-store-trio serve` so the two can be run side by side.
//
//   node reference-server.mjs [--host 127.0.0.1] [--port 0] [--data-dir DIR | --memory]
//                             [--save-throttle SECONDS] [--idle-timeout SECONDS]
//                             [--authorize SPEC]
//
// Every session is readwrite, a missing token is accepted, and a missing roomId means
// `default`, as in our example server. Prints `Listening on ws://HOST:PORT` once ready.
// With --authorize (SPEC is accepted for parity with `canvas-store-trio serve` and
// otherwise ignored), the test policy of tests/interop_auth.py applies: token "ro" is
// readonly, "deny" or "deny-*" is refused, anything else is readwrite.
import { createServer } from 'node:http'
import { parseArgs } from 'node:util'
import { acceptConnection, FileStorage, MemoryStorage, RoomManager } from '@woven-ecs/canvas-store-server'
import { WebSocketServer } from 'ws'

const { values } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'data-dir': { type: 'string', default: './data' },
    memory: { type: 'boolean', default: false },
    'save-throttle': { type: 'string', default: '5' },
    'idle-timeout': { type: 'string', default: '60' },
    authorize: { type: 'string' },
  },
})

function testPolicy({ token }) {
  if (token === 'deny' || token.startsWith('deny-')) throw new Error('token refused')
  if (token === 'ro') return { permissions: 'readonly', metadata: { token } }
  return { permissions: 'readwrite', metadata: { token } }
}
const authorize = values.authorize ? testPolicy : () => ({ permissions: 'readwrite' })

const manager = new RoomManager({ idleTimeout: Number(values['idle-timeout']) * 1000 })
const memoryStorages = new Map()
const createStorage = (roomId) => {
  if (!values.memory) return new FileStorage({ dir: values['data-dir'], roomId })
  if (!memoryStorages.has(roomId)) memoryStorages.set(roomId, new MemoryStorage())
  return memoryStorages.get(roomId)
}

const server = createServer((_req, res) => res.writeHead(200).end('ok'))
const wss = new WebSocketServer({ server })

wss.on('connection', (ws, req) => {
  // The reference parser insists on roomId and token; fill them in as our server does.
  const url = new URL(req.url ?? '/', 'http://_')
  if (!url.searchParams.get('roomId')) url.searchParams.set('roomId', 'default')
  if (!url.searchParams.get('token')) url.searchParams.set('token', '-')
  const conn = acceptConnection({
    socket: ws,
    url: url.pathname + url.search,
    request: req,
    manager,
    authorize,
    roomOptions: (roomId) => ({
      saveThrottleMs: Number(values['save-throttle']) * 1000,
      createStorage: () => createStorage(roomId),
    }),
  })
  ws.on('message', (data) => conn.onMessage(String(data)))
  ws.on('close', conn.onClose)
  ws.on('error', conn.onError)
  conn.ready.catch((err) => ws.close(1008, String(err.message).slice(0, 120)))
})

server.listen(Number(values.port), values.host, () => {
  const { port } = server.address()
  console.log(`Listening on ws://${values.host}:${port}`)
})

let shuttingDown = false
async function shutdown() {
  if (shuttingDown) return
  shuttingDown = true
  server.close()
  for (const client of wss.clients) client.terminate()
  await manager.closeAll()
  process.exit(0)
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
