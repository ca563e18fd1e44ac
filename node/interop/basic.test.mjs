// Live sync through one server: connect, edit, merge, delete, buffer deltas, presence,
// offline edits and late joiners, all with the real @woven-ecs/canvas-store WebsocketAdapter.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import {
  serveAround,
  cid,
  connectAll,
  connectTogether,
  formatFrames,
  IS_REFERENCE,
  ServerProcess,
  sameJson,
  TestClient,
  waitConverged,
  waitFor,
} from './harness.mjs'

const server = new ServerProcess({ name: 'basic', saveThrottle: 0.3, idleTimeout: 2 })
const clients = []

function client(room, prefix, opts = {}) {
  const c = new TestClient({ url: server.url, room, clientId: cid(prefix), ...opts })
  clients.push(c)
  return c
}

let roomSeq = 0
const newRoom = (name) => `${name}-${process.pid}-${++roomSeq}`

serveAround(server, clients)

describe('connect', () => {
  test('both clients get synced, and clients connecting at the same moment see each other', {
    todo: IS_REFERENCE ? 'reference bug: simultaneous first connections can split into two rooms' : false,
  }, async () => {
    // Several fresh rooms, each opened by three clients in the same tick.
    for (let round = 0; round < 4; round++) {
      const room = newRoom('together')
      const group = [client(room, 'A'), client(room, 'B'), client(room, 'C')]
      await connectTogether(group)

      for (const c of group) {
        const synced = c.framesIn('synced')
        assert.equal(synced.length, 1, `${c.clientId} got one synced`)
        assert.equal(synced[0].timestamp, 0, 'a new room is at timestamp 0')
        const out = c.framesOut('reconnect')
        assert.equal(out.length, 1)
        assert.equal(out[0].lastTimestamp, 0)
        assert.equal(out[0].protocolVersion, 2)
      }
      await waitFor(() => group.every((c) => c.lastClientCount() === 3), {
        what: `round ${round}: clientCount 3 on every client (one room object)`,
        clients: group,
      })

      // And they really share a room: an edit from each reaches the others.
      group.forEach((c, i) => c.edit({ [`e${i}/Shape`]: { _exists: true, x: i } }))
      await waitConverged(group, {
        expected: Object.fromEntries(group.map((_, i) => [`e${i}/Shape`, { _exists: true, x: i }])),
        what: `round ${round}: edits from clients that connected together converge`,
      })
      for (const c of group) c.close()
    }
  })

  test('a client alone in a new room gets an empty synced and clientCount 1', async () => {
    const room = newRoom('solo')
    const a = client(room, 'A')
    await connectAll([a])
    await waitFor(() => a.lastClientCount() === 1, { what: 'clientCount 1', clients: [a] })
    assert.deepEqual(a.framesIn('synced'), [{ type: 'synced', timestamp: 0 }])
    assert.equal(a.framesIn('patch').length, 0, 'no patch for an empty room')
  })
})

describe('document sync', () => {
  test('create, field merge, delete and buffer-delta appends converge, and a late joiner loads the same', async () => {
    const room = newRoom('doc')
    const a = client(room, 'A')
    const b = client(room, 'B')
    await connectAll([a, b])
    await waitFor(() => a.lastClientCount() === 2, { what: 'A sees clientCount 2', clients: [a, b] })

    // Create on both sides.
    a.edit({ 'e1/Shape': { _exists: true, _version: null, x: 1, y: 2, color: 'red', tags: ['a'] } })
    b.edit({ 'e2/Shape': { _exists: true, _version: null, x: 5, y: 6, color: 'green', tags: [] } })
    await waitConverged([a, b], {
      expected: {
        'e1/Shape': { _exists: true, _version: null, x: 1, y: 2, color: 'red', tags: ['a'] },
        'e2/Shape': { _exists: true, _version: null, x: 5, y: 6, color: 'green', tags: [] },
      },
      what: 'creates converge',
    })

    // Concurrent writes to different fields of the same record merge field by field.
    a.edit({ 'e1/Shape': { x: 10 } })
    b.edit({ 'e1/Shape': { color: 'blue', meta: { nested: [1, { deep: true }] } } })
    await waitConverged([a, b], { what: 'field merge converges' })
    assert.deepEqual(a.live()['e1/Shape'], {
      _exists: true,
      _version: null,
      x: 10,
      y: 2,
      color: 'blue',
      tags: ['a'],
      meta: { nested: [1, { deep: true }] },
    })

    // Delete.
    b.edit({ 'e2/Shape': { _exists: false } })
    await waitConverged([a, b], { what: 'delete converges' })
    assert.equal(a.live()['e2/Shape'], undefined)

    // Buffer field: full create, then appends as sparse deltas over several frames.
    a.edit({ 's1/Stroke': { _exists: true, points: [0, 0, 0, 0, 0, 0, 0, 0], count: 1 } })
    await waitConverged([a, b], { what: 'stroke created' })
    const expectedPoints = [0, 0, 0, 0, 0, 0, 0, 0]
    for (let i = 1; i < 4; i++) {
      expectedPoints[i * 2] = i
      expectedPoints[i * 2 + 1] = i * 10
      a.edit({ 's1/Stroke': { points: { __buf: 1, len: 8, runs: [[i * 2, [i, i * 10]]] }, count: i + 1 } })
      await waitConverged([a, b], { what: `stroke append ${i}` })
    }
    // Grow the buffer with a delta (carry the old items, zero-fill, write the run).
    a.edit({ 's1/Stroke': { points: { __buf: 1, len: 12, runs: [[8, [4, 40]]] }, count: 5 } })
    // Shrink/overwrite a run from B concurrently with nothing else.
    await waitConverged([a, b], { what: 'stroke grow' })
    b.edit({ 's1/Stroke': { points: { __buf: 1, len: 12, runs: [[0, [9, 9]], [11, [7]]] } } })
    const finalPoints = [9, 9, 1, 10, 2, 20, 3, 30, 4, 40, 0, 7]
    await waitConverged([a, b], { what: 'stroke overwrite runs' })
    assert.deepEqual(a.live()['s1/Stroke'].points, finalPoints)
    assert.deepEqual(b.live()['s1/Stroke'].points, finalPoints)

    // Delete and re-create a key: the new record has only the new fields.
    a.edit({ 'e5/Shape': { _exists: true, x: 5, color: 'pink' } })
    await waitConverged([a, b], { what: 'e5 created' })
    b.edit({ 'e5/Shape': { _exists: false } })
    await waitConverged([a, b], { what: 'e5 deleted' })
    a.edit({ 'e5/Shape': { _exists: true, y: 55 } })
    await waitConverged([a, b], { what: 'e5 re-created' })
    assert.deepEqual(b.live()['e5/Shape'], { _exists: true, y: 55 })

    // The server relays buffer deltas as received (B saw A's deltas on the wire).
    const relayed = b
      .framesIn('patch')
      .flatMap((m) => m.documentPatches ?? [])
      .filter((p) => p['s1/Stroke']?.points?.__buf === 1)
    assert.ok(relayed.length >= 3, `B received A's buffer deltas as deltas:\n${formatFrames([b.clientId])}`)

    // Broadcasts carry the sender's clientId and a timestamp.
    for (const m of b.framesIn('patch').filter((m) => m.documentPatches)) {
      assert.equal(m.clientId, a.clientId, 'broadcast names the sender')
      assert.equal(typeof m.timestamp, 'number')
    }

    // Acks: one per document frame, timestamps go up by exactly one per accepted frame.
    await waitFor(() => a.allAcked() && b.allAcked(), { what: 'all edits acked', clients: [a, b] })
    const ackTs = [...a.framesIn('ack'), ...b.framesIn('ack')].map((m) => m.timestamp).sort((x, y) => x - y)
    const docFrames = [...a.framesOut('patch'), ...b.framesOut('patch')].filter((m) => m.documentPatches?.length)
    assert.equal(ackTs.length, docFrames.length, 'one ack per document patch frame')
    assert.deepEqual(
      ackTs,
      ackTs.map((_, i) => i + 1),
      'room timestamp counts accepted document frames 1, 2, 3, ...',
    )

    // Late joiner: loads the same live document (full arrays, tombstone as deletion).
    const c = client(room, 'C')
    await connectAll([c])
    await waitConverged([a, b, c], { what: 'late joiner converges' })
    const load = c.framesIn('patch')[0]
    assert.equal(load.clientId, '')
    assert.equal(load.timestamp, ackTs[ackTs.length - 1])
    assert.deepEqual(c.framesIn('synced'), [{ type: 'synced', timestamp: ackTs[ackTs.length - 1] }])
    const diff = load.documentPatches[0]
    assert.deepEqual(diff['e2/Shape'], { _exists: false }, 'the deletion is sent as a tombstone')
    assert.deepEqual(diff['s1/Stroke'].points, finalPoints, 'the server stores and sends the full array')
    assert.deepEqual(diff['e5/Shape'], { _exists: true, y: 55 }, 'a re-created key carries only its new fields')
  })
  // No test of same-field writes racing in the same moment: the client itself cannot converge
  // there (an edit still in its send buffer is overwritten locally by the other client's
  // broadcast, but reaches the server last), whatever the server does.
})

describe('presence', () => {
  test('ephemeral state reaches others and late joiners, and is cleared when its owner leaves', async () => {
    const room = newRoom('presence')
    const a = client(room, 'A')
    const b = client(room, 'B')
    await connectAll([a, b])
    a.edit({ 'doc/Shape': { _exists: true, x: 1 } })
    await waitConverged([a, b])
    await waitFor(() => a.allAcked(), { what: 'A acked', clients: [a] })
    const tsBefore = a.lastAckTimestamp()

    const cursorKey = `${a.clientId}/Cursor`
    a.setPresence({ [cursorKey]: { _exists: true, x: 3, y: 4 } })
    await waitFor(() => sameJson(b.presence[cursorKey], { _exists: true, x: 3, y: 4 }), {
      what: "B sees A's cursor",
      clients: [a, b],
    })
    a.setPresence({ [cursorKey]: { x: 30 } })
    await waitFor(() => b.presence[cursorKey]?.x === 30, { what: "B sees A's cursor move", clients: [a, b] })

    // Presence never moves the document timestamp and never carries one.
    for (const m of b.framesIn('patch').filter((m) => m.ephemeralPatches)) {
      assert.equal(m.timestamp, undefined, `ephemeral-only broadcast has no timestamp: ${JSON.stringify(m)}`)
      assert.equal(m.documentPatches, undefined)
      assert.equal(m.clientId, a.clientId)
    }

    // A late joiner gets the presence snapshot (not its own, others').
    const c = client(room, 'C')
    await connectAll([c])
    await waitFor(() => c.presence[cursorKey]?.x === 30 && c.presence[cursorKey]?.y === 4, {
      what: "late joiner C sees A's cursor",
      clients: [c],
    })

    // A leaves: B and C get A's presence deleted (clientId A), then clientCount 2.
    a.close()
    for (const other of [b, c]) {
      await waitFor(() => other.presence[cursorKey] === undefined, {
        what: `${other.clientId}: A's cursor cleared after A left`,
        clients: [other],
      })
      const deletion = other
        .framesIn('patch')
        .find((m) => m.ephemeralPatches?.[0]?.[cursorKey]?._exists === false)
      assert.deepEqual(deletion, {
        type: 'patch',
        ephemeralPatches: [{ [cursorKey]: { _exists: false } }],
        clientId: a.clientId,
      })
      await waitFor(() => other.lastClientCount() === 2, { what: 'clientCount 2 after A left', clients: [other] })
    }

    // The document timestamp did not move for presence.
    b.edit({ 'doc/Shape': { x: 2 } })
    await waitFor(() => b.allAcked(), { what: 'B acked', clients: [b] })
    assert.equal(b.lastAckTimestamp(), tsBefore + 1, 'presence frames did not advance the room timestamp')

    // A newcomer after A left sees no trace of A's cursor.
    const d = client(room, 'D')
    await connectAll([d])
    await waitConverged([b, c, d])
    assert.equal(d.presence[cursorKey], undefined)
  })
})

describe('offline', () => {
  test('offline edits merge on reconnect, and a late joiner loads the same document', async () => {
    const room = newRoom('offline')
    const a = client(room, 'A')
    const b = client(room, 'B')
    await connectAll([a, b])
    a.edit({ 'p/Pos': { _exists: true, x: 0, y: 0, z: 0 }, 'q/Pos': { _exists: true, x: 9 } })
    await waitConverged([a, b])
    await waitFor(() => a.allAcked(), { what: 'A acked', clients: [a] })

    b.disconnect()
    await waitFor(() => !b.online, { what: 'B offline', clients: [b] })
    await waitFor(() => a.lastClientCount() === 1, { what: 'A sees B leave', clients: [a] })

    // Both edit while B is offline; A is online.
    a.edit({ 'p/Pos': { x: 5, z: 1 } })
    a.edit({ 'a1/Pos': { _exists: true, x: 1 } })
    b.edit({ 'p/Pos': { y: 7, z: 2 } }) // z conflicts: B's reconnect is applied later, so B wins
    b.edit({ 'b1/Pos': { _exists: true, x: 2 } })
    b.edit({ 'q/Pos': { _exists: false } })
    await waitFor(() => a.allAcked(), { what: 'A acked while B offline', clients: [a] })
    await new Promise((r) => setTimeout(r, 50))
    assert.equal(b.framesOut('patch', { conn: b.connections }).filter((m) => m.documentPatches).length, 0)

    await b.reconnect()
    await waitFor(() => b.syncedCount >= 1 && b.framesIn('synced', { conn: 2 }).length === 1, {
      what: 'B synced again',
      clients: [b],
    })
    const reconnect = b.framesOut('reconnect', { conn: 2 })[0]
    assert.ok(reconnect.documentPatches?.length === 1, 'reconnect carries the offline edits')
    assert.ok(reconnect.lastTimestamp > 0)

    const expected = {
      'p/Pos': { _exists: true, x: 5, y: 7, z: 2 },
      'a1/Pos': { _exists: true, x: 1 },
      'b1/Pos': { _exists: true, x: 2 },
    }
    await waitConverged([a, b], { expected, what: 'offline edits merged on both' })
    await waitFor(() => a.allAcked() && b.allAcked(), { what: 'all acked', clients: [a, b] })
    assert.equal(b.framesIn('resync').length, 0, 'no resync for a client that is behind')

    const c = client(room, 'C')
    await connectAll([c])
    await waitConverged([a, b, c], { expected, what: 'late joiner loads the merged document' })
  })

  test('a client that starts offline and connects later pushes its edits', async () => {
    const room = newRoom('startoffline')
    const a = client(room, 'A')
    await connectAll([a])
    a.edit({ 'x/Pos': { _exists: true, x: 1 } })
    const b = client(room, 'B', { startOffline: true })
    await b.start()
    b.edit({ 'y/Pos': { _exists: true, y: 2 } })
    await new Promise((r) => setTimeout(r, 60))
    await b.reconnect()
    await waitConverged([a, b], {
      expected: { 'x/Pos': { _exists: true, x: 1 }, 'y/Pos': { _exists: true, y: 2 } },
      what: 'start-offline client merges',
    })
  })
})
