// History: a version restored through the admin API while real clients are connected. They
// see the document go back through ordinary patches and keep their connections.
// canvas-store-trio only: the reference server keeps no history and has no admin API.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import {
  cid,
  connectAll,
  IS_REFERENCE,
  serveAround,
  ServerProcess,
  sleep,
  TestClient,
  waitConverged,
  waitFor,
} from './harness.mjs'

const TOKEN = 'interop-admin-token'
const server = new ServerProcess({
  name: 'history',
  trioArgs: ['--history-interval', '0.05', '--admin-token', TOKEN],
})
const clients = []

serveAround(server, clients)

async function admin(method, path) {
  const response = await fetch(`http://127.0.0.1:${server.port}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}` },
  })
  return { status: response.status, body: await response.json() }
}

test('a restore reaches connected clients as patches, and they stay connected', {
  skip: IS_REFERENCE ? 'the reference server keeps no history' : false,
}, async () => {
  const room = `history-${process.pid}`
  const a = new TestClient({ url: server.url, room, clientId: cid('A') })
  const b = new TestClient({ url: server.url, room, clientId: cid('B') })
  clients.push(a, b)
  await connectAll([a, b])

  const first = {
    'n1/Note': { _exists: true, text: 'first', x: 1 },
    'n2/Note': { _exists: true, text: 'second', x: 2 },
  }
  a.edit(first)
  await waitConverged([a, b], { expected: first })
  await waitFor(() => a.allAcked(), { what: 'A acked', clients: [a] })
  await sleep(100)
  // This edit keeps version 1: the document as it was before it.
  b.edit({ 'n1/Note': { text: 'changed' }, 'n2/Note': { _exists: false }, 'n3/Note': { _exists: true, text: 'third' } })
  await waitFor(() => b.allAcked() && a.live()['n3/Note'], { what: "B's edit acked and seen", clients: [a, b] })
  const versions = await waitFor(async () => (await admin('GET', `/admin/rooms/${room}/history`)).body.versions[0], {
    what: 'version 1 listed',
  })
  assert.equal(versions.version, 1)

  const restored = await admin('POST', `/admin/rooms/${room}/history/1/restore`)
  assert.deepEqual(restored, { status: 200, body: { room_id: room, version: 1, timestamp: 3 } })
  await waitConverged([a, b], { expected: first, what: 'both clients back at version 1' })
  for (const c of [a, b]) {
    assert.equal(c.connections, 1, `${c.clientId} kept its connection`)
    const patches = c.framesIn('patch').filter((f) => f.clientId === '@server')
    assert.equal(patches.length, 1, `${c.clientId} got the restore as one patch`)
    assert.equal(patches[0].timestamp, 3)
  }

  // Their sessions go on as before.
  b.edit({ 'n4/Note': { _exists: true, text: 'after' } })
  await waitConverged([a, b], { expected: { ...first, 'n4/Note': { _exists: true, text: 'after' } } })
  assert.deepEqual([a.connections, b.connections], [1, 1])
})
