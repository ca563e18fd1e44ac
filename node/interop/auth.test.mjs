// Permissions through the server's authorize hook (`--authorize`, policy in
// tests/interop_auth.py and reference-server.mjs): token "ro" is readonly, "deny" is refused.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { cid, connectAll, serveAround, framesOf, ServerProcess, sleep, TestClient, waitConverged, waitFor } from './harness.mjs'

const server = new ServerProcess({ name: 'auth', authorize: true, saveThrottle: 0.3, idleTimeout: 2 })
const clients = []
let roomSeq = 0
const newRoom = (name) => `${name}-${process.pid}-${++roomSeq}`

function client(room, prefix, token) {
  const c = new TestClient({ url: server.url, room, clientId: cid(prefix), token })
  clients.push(c)
  return c
}

/** Patch frames this client received from `sender`. */
const patchesFrom = (c, sender) => c.framesIn('patch').filter((m) => m.clientId === sender.clientId)

serveAround(server, clients)

test('a readonly token can load the document but cannot change anything', async () => {
  const room = newRoom('ro')
  const w = client(room, 'W', 'rw')
  await connectAll([w])
  w.edit({ 'e1/Shape': { _exists: true, x: 1 } })
  await waitFor(() => w.allAcked(), { what: 'W acked', clients: [w] })
  const ts = w.lastAckTimestamp()
  assert.equal(ts, 1)

  const r = client(room, 'R', 'ro')
  await connectAll([r])
  await waitConverged([w, r], { what: 'readonly client loads the document' })
  await waitFor(() => w.lastClientCount() === 2, { what: 'W sees the readonly client', clients: [w, r] })

  // Every kind of change from the readonly client: field write, create, delete, buffer, presence.
  r.edit({ 'e1/Shape': { x: 99 } })
  r.edit({ 'e2/Shape': { _exists: true, x: 2 } })
  r.setPresence({ [`${r.clientId}/Cursor`]: { _exists: true, x: 5 } })
  await sleep(50)
  r.edit({ 'e1/Shape': { _exists: false } })
  r.edit({ 'b/Stroke': { _exists: true, pts: [0, 0, 0, 0] } })
  await waitFor(() => r.allAcked(), { what: "readonly client's patches are still acked", clients: [r] })
  const acks = r.framesIn('ack')
  assert.ok(acks.length >= 2)
  for (const ack of acks) assert.equal(ack.timestamp, ts, `ack to a readonly patch keeps the room timestamp: ${JSON.stringify(ack)}`)

  // Disconnect and edit offline, then reconnect: the reconnect frame's patches are ignored too.
  r.disconnect()
  await waitFor(() => !r.online, { what: 'R offline', clients: [r] })
  r.edit({ 'e3/Shape': { _exists: true, x: 3 } })
  await sleep(60) // let a frame push it into the offline buffer
  await r.reconnect()
  await waitFor(() => r.framesIn('synced', { conn: 2 }).length === 1, { what: 'R synced again', clients: [r] })
  assert.ok(r.framesOut('reconnect', { conn: 2 })[0].documentPatches, 'reconnect carried the offline edit')
  assert.deepEqual(r.framesIn('synced', { conn: 2 }), [{ type: 'synced', timestamp: ts }])
  assert.equal(r.framesIn('resync').length, 0, 'a readonly client is never asked to resync')
  await waitFor(() => r.allAcked(), { what: 'R acked after reconnect', clients: [r] })

  await sleep(150)
  assert.deepEqual(patchesFrom(w, r), [], 'nothing from the readonly client was broadcast')
  assert.deepEqual(w.live(), { 'e1/Shape': { _exists: true, x: 1 } })
  assert.deepEqual(w.presence, {})

  // A newcomer sees the document as W wrote it, and no presence from R.
  const late = client(room, 'L', 'rw')
  await connectAll([late])
  assert.deepEqual(late.live(), { 'e1/Shape': { _exists: true, x: 1 } })
  assert.deepEqual(late.presence, {})
  assert.deepEqual(late.framesIn('synced'), [{ type: 'synced', timestamp: ts }])

  // And the room timestamp moved only for W.
  w.edit({ 'e1/Shape': { x: 2 } })
  await waitFor(() => w.allAcked(), { what: 'W acked again', clients: [w] })
  assert.equal(w.lastAckTimestamp(), ts + 1)
})

test('auth-refresh upgrades a readonly session, and a refused refresh closes it', async () => {
  const room = newRoom('refresh')
  const w = client(room, 'W', 'rw')
  const r = client(room, 'R', 'ro')
  await connectAll([w, r])

  r.edit({ 'a/Box': { _exists: true, v: 'while readonly' } })
  await waitFor(() => r.allAcked(), { what: 'R acked', clients: [r] })
  await sleep(100)
  assert.deepEqual(patchesFrom(w, r), [])

  r.adapter.setToken('rw-now')
  assert.deepEqual(r.framesOut('auth-refresh'), [{ type: 'auth-refresh', token: 'rw-now' }])
  await sleep(300) // the refresh is authorized asynchronously and has no reply
  r.edit({ 'b/Box': { _exists: true, v: 'after refresh' } })
  await waitFor(() => w.live()['b/Box']?.v === 'after refresh', {
    what: 'an edit after auth-refresh to a readwrite token reaches W',
    clients: [w, r],
  })
  assert.equal(w.live()['a/Box'], undefined, 'the edit made while readonly was not applied')

  r.adapter.setToken('deny-now')
  await waitFor(() => framesOf(r.clientId).some((f) => f.dir === 'close' && f.conn === 1), {
    what: 'server closes the socket after a refused auth-refresh',
    clients: [r],
  })
  await waitFor(() => w.lastClientCount() === 1, { what: 'W sees R removed', clients: [w] })
  r.close()
})

test('a refused token never gets synced', async () => {
  const room = newRoom('deny')
  const w = client(room, 'W', 'rw')
  await connectAll([w])
  const d = client(room, 'D', 'deny')
  await d.start()
  await waitFor(() => framesOf(d.clientId).some((f) => f.dir === 'close'), {
    what: 'server closes a refused connection',
    clients: [d],
  })
  d.close()
  assert.equal(d.framesIn('synced').length, 0)
  assert.equal(d.framesIn('patch').length, 0)
  await sleep(100)
  assert.ok(
    w.framesIn('clientCount').every((m) => m.count === 1),
    `a refused client never counts as a member: ${JSON.stringify(w.framesIn('clientCount'))}`,
  )
})
