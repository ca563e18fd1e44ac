// Durability across server restarts, with the clients staying up and reconnecting on their own:
// SIGTERM keeps every acked edit; SIGKILL before a throttled save rolls the server back and the
// clients heal it through `resync`; an idle room saves when it closes; snapshot files move
// between the reference server and the server under test.
import assert from 'node:assert/strict'
import { readdirSync, rmSync } from 'node:fs'
import { after, test } from 'node:test'
import {
  cid,
  connectAll,
  IS_REFERENCE,
  liveView,
  makeDataDir,
  REFERENCE_COMMAND,
  ServerProcess,
  serverCommand,
  sleep,
  TestClient,
  waitConverged,
  waitFor,
} from './harness.mjs'

const clients = []
const servers = []

function newServer(opts) {
  const s = new ServerProcess(opts)
  servers.push(s)
  return s
}

function client(server, room, prefix) {
  const c = new TestClient({ url: server.url, room, clientId: cid(prefix) })
  clients.push(c)
  return c
}

after(async () => {
  for (const c of clients) c.close()
  for (const s of servers) await s.dispose()
})

/**
 * The clients reconnect on their own, 500 ms after losing the server, so they come back to the
 * restarted server at the same moment. The reference server then often splits the room in two
 * (a known reference bug); against it only, the second client's first retry is delayed.
 */
function staggerReconnects(cs) {
  if (!IS_REFERENCE) return
  cs.forEach((c, i) => {
    c.adapter.reconnectDelay = 500 + i * 1000
  })
}

/** Wait until `c` has received `synced` on a connection after connection number `after`. */
function waitReconnected(c, after, timeout = 15000) {
  return waitFor(() => c.framesIn('synced', { after }).length > 0, {
    what: `${c.clientId} reconnected on its own and got synced (after connection ${after})`,
    timeout,
    clients: [c],
  })
}

test('acked edits survive a SIGTERM restart; clients reconnect without needing a resync', async () => {
  const server = newServer({ name: 'sigterm', saveThrottle: 30, idleTimeout: 30 })
  await server.start()
  const room = `sigterm-${process.pid}`
  const a = client(server, room, 'A')
  const b = client(server, room, 'B')
  await connectAll([a, b])

  a.edit({ 'e1/Shape': { _exists: true, x: 1, label: 'one' }, 'n/Counter': { _exists: true, value: 0 } })
  b.edit({ 'e2/Shape': { _exists: true, x: 2, pts: [1, 2, 3, 4] } })
  await waitConverged([a, b])
  b.edit({ 'e2/Shape': { pts: { __buf: 1, len: 6, runs: [[4, [5, 6]]] } } })
  a.edit({ 'e1/Shape': { _exists: false } })
  await waitConverged([a, b])

  // A edits every few ms, so patches are in flight when the server is told to stop. The writer
  // stops, and the send buffer drains, just before SIGTERM: an edit still in the client's send
  // buffer at a disconnect would be re-sent after the newer offline edits and win (a client bug
  // in @woven-ecs/canvas-store 2.0.1, whatever the server does).
  let value = 0
  const writer = setInterval(() => {
    value += 1
    a.edit({ 'n/Counter': { value } })
  }, 5)
  await sleep(250)
  clearInterval(writer)
  await waitFor(() => a.local.length === 0 && a.adapter.documentSendBuffer.length === 0, {
    what: "A's send buffer drained",
    clients: [a],
  })
  staggerReconnects([a, b])
  const exit = await server.stop()
  assert.equal(exit.code, 0, `SIGTERM exits 0, got ${JSON.stringify(exit)}\n${server.output}`)

  // Every acked document frame is in the snapshot file.
  const snap = server.readSnapshot(room)
  assert.ok(snap, `no snapshot file ${server.snapshotPath(room)} after SIGTERM\n${server.output}`)
  assert.deepEqual(Object.keys(snap).sort(), ['state', 'timestamp', 'timestamps'])
  const maxAck = Math.max(a.lastAckTimestamp(), b.lastAckTimestamp())
  assert.ok(snap.timestamp >= maxAck, `file timestamp ${snap.timestamp} < highest ack ${maxAck}`)
  const sentById = new Map(a.framesOut('patch').map((m) => [m.messageId, m]))
  const ackedValues = a
    .framesIn('ack')
    .map((ack) => sentById.get(ack.messageId)?.documentPatches?.[0]?.['n/Counter']?.value)
    .filter((v) => v !== undefined)
  const lastAckedValue = Math.max(0, ...ackedValues)
  assert.ok(lastAckedValue > 0, 'some counter edits were acked before the shutdown')
  assert.ok(
    snap.state['n/Counter'].value >= lastAckedValue,
    `acked counter value ${lastAckedValue} lost: file has ${snap.state['n/Counter'].value}`,
  )
  assert.deepEqual(snap.state['e1/Shape'], { _exists: false })
  assert.deepEqual(snap.state['e2/Shape'].pts, [1, 2, 3, 4, 5, 6])

  // Restart on the same port; the clients reconnect by themselves.
  await server.restart()
  await waitReconnected(a, 1)
  await waitReconnected(b, 1)
  const expected = {
    'e2/Shape': { _exists: true, x: 2, pts: [1, 2, 3, 4, 5, 6] },
    'n/Counter': { _exists: true, value },
  }
  await waitConverged([a, b], { expected, what: 'converged after restart (unacked edits re-sent)', timeout: 8000 })
  assert.deepEqual(a.framesIn('resync'), [], 'A was not asked to resync: nothing acked was lost')
  assert.deepEqual(b.framesIn('resync'), [], 'B was not asked to resync: nothing acked was lost')

  // Edits keep working after the restart, and a late joiner loads everything.
  b.edit({ 'e3/Shape': { _exists: true, x: 3 } })
  await waitFor(() => a.allAcked() && b.allAcked(), { what: 'all acked after restart', clients: [a, b] })
  const c = client(server, room, 'C')
  await connectAll([c])
  await waitConverged([a, b, c], {
    expected: { ...expected, 'e3/Shape': { _exists: true, x: 3 } },
    what: 'late joiner after restart',
  })
})

// The two kill tests' edits: batch 1 creates three shapes and a stroke, from two clients;
// batch 2 updates a shape, deletes one, writes a buffer delta and creates a fourth.
function editBatch1(a, b) {
  a.edit({
    'e1/Shape': { _exists: true, x: 1, color: 'red' },
    'e2/Shape': { _exists: true, x: 2, color: 'red' },
    's/Stroke': { _exists: true, pts: [1, 1, 0, 0, 0, 0, 0, 0] },
  })
  b.edit({ 'e3/Shape': { _exists: true, x: 3, color: 'red' } })
}

async function editBatch2(a, b, { pauseMs = 0 } = {}) {
  a.edit({ 'e1/Shape': { x: 10 } })
  a.edit({ 'e2/Shape': { _exists: false } })
  a.edit({ 's/Stroke': { pts: { __buf: 1, len: 8, runs: [[2, [2, 2]]] } } })
  if (pauseMs) await sleep(pauseMs)
  b.edit({ 'e3/Shape': { color: 'blue' }, 'e4/Shape': { _exists: true, x: 4, color: 'green' } })
}

/** The live document after both batches (e2 deleted). */
const AFTER_BATCH_2 = {
  'e1/Shape': { _exists: true, x: 10, color: 'red' },
  's/Stroke': { _exists: true, pts: [1, 1, 2, 2, 0, 0, 0, 0] },
  'e3/Shape': { _exists: true, x: 3, color: 'blue' },
  'e4/Shape': { _exists: true, x: 4, color: 'green' },
}

test('a server killed before its throttled save comes back behind the clients and is healed by resync', async () => {
  // Acks from memory, as the reference server gives them: the case durable acks close.
  const server = newServer({ name: 'sigkill', saveThrottle: 1.5, idleTimeout: 30, durableAcks: false })
  await server.start()
  const room = `sigkill-${process.pid}`
  const a = client(server, room, 'A')
  const b = client(server, room, 'B')
  await connectAll([a, b])

  // Batch 1: saved by the throttle.
  editBatch1(a, b)
  await waitFor(() => a.allAcked() && b.allAcked(), { what: 'batch 1 acked', clients: [a, b] })
  const batch1Ts = Math.max(a.lastAckTimestamp(), b.lastAckTimestamp())
  await waitFor(() => server.readSnapshot(room)?.timestamp === batch1Ts, {
    what: `throttled save of timestamp ${batch1Ts} reaches ${server.snapshotPath(room)}`,
    timeout: 6000,
    explain: () => JSON.stringify(server.readSnapshot(room)),
  })
  await waitConverged([a, b])

  // Batch 2: acked, but the server dies before its throttled save.
  await editBatch2(a, b, { pauseMs: 40 })
  await waitConverged([a, b])
  await waitFor(() => a.allAcked() && b.allAcked(), { what: 'batch 2 acked', clients: [a, b] })
  const lastTs = Math.max(a.lastAckTimestamp(), b.lastAckTimestamp())
  staggerReconnects([a, b])
  await server.kill()
  const snap = server.readSnapshot(room)
  assert.equal(
    snap?.timestamp,
    batch1Ts,
    `the file should hold batch 1 only (timestamp ${batch1Ts}); the save throttle fired early? ${JSON.stringify(snap)}`,
  )
  assert.ok(lastTs > batch1Ts)

  const expected = AFTER_BATCH_2

  await server.restart()
  await waitReconnected(a, 1)
  await waitReconnected(b, 1)

  // The first client back finds the server at the saved timestamp and is asked to resync.
  const resyncs = [...a.framesIn('resync', { after: 1 }), ...b.framesIn('resync', { after: 1 })]
  assert.ok(resyncs.length >= 1, 'at least one client was asked to resync')
  assert.ok(
    resyncs.some((m) => m.since === batch1Ts),
    `a resync names the restored timestamp ${batch1Ts}: ${JSON.stringify(resyncs)}`,
  )
  // The first client asked answers with the edits the server lost. A client asked
  // after that client's answer reached it may find nothing newer than `since` to send:
  // the npm client then sends no patch at all, so only one answer is required.
  const answeredResync = (c) =>
    c.framesOut('patch', { after: 1 }).some((m) => m.messageId.includes('-resync-'))
  await waitFor(() => answeredResync(a) || answeredResync(b), {
    what: 'a client answered resync with a patch',
    clients: [a, b],
  })

  await waitConverged([a, b], { expected, what: 'clients agree after the heal', timeout: 8000 })
  await waitFor(() => a.allAcked() && b.allAcked(), { what: 'heal acked', clients: [a, b] })

  // The server itself is healed: a newcomer loads the full document.
  const c = client(server, room, 'C')
  await connectAll([c])
  await waitConverged([a, b, c], { expected, what: 'late joiner loads the healed document' })
  assert.deepEqual(c.framesIn('resync'), [])

  // And after a clean shutdown the healed document is on disk, deletion included.
  const exit = await server.stop()
  assert.equal(exit.code, 0, `SIGTERM exits 0: ${JSON.stringify(exit)}`)
  const healed = server.readSnapshot(room)
  assert.deepEqual(liveView(healed.state), liveView(expected))
  assert.deepEqual(healed.state['e2/Shape'], { _exists: false }, 'the deletion came back as a tombstone')
})

test(
  'with durable acks, a server killed before its throttled save comes back holding every acked edit, and nobody is asked to resync',
  { skip: IS_REFERENCE ? 'the reference server acks from memory' : false },
  async () => {
    const server = newServer({ name: 'durable', saveThrottle: 30, idleTimeout: 30, durableAcks: true })
    await server.start()
    const room = `durable-${process.pid}`
    const a = client(server, room, 'A')
    const b = client(server, room, 'B')
    await connectAll([a, b])
    editBatch1(a, b)
    await waitFor(() => a.allAcked() && b.allAcked(), { what: 'batch 1 acked', clients: [a, b] })
    await editBatch2(a, b)
    await waitConverged([a, b])
    await waitFor(() => a.allAcked() && b.allAcked(), { what: 'batch 2 acked', clients: [a, b] })
    const lastTs = Math.max(a.lastAckTimestamp(), b.lastAckTimestamp())
    await server.kill()
    assert.equal(server.readSnapshot(room), null, 'the 30 s throttle never saved a snapshot')

    const expected = AFTER_BATCH_2
    await server.restart()
    await waitReconnected(a, 1)
    await waitReconnected(b, 1)
    assert.deepEqual([...a.framesIn('resync'), ...b.framesIn('resync')], [], 'nobody came back ahead of the server')
    for (const c of [a, b]) {
      const [synced] = c.framesIn('synced', { after: 1 })
      assert.ok(synced.timestamp >= lastTs, `${c.clientId} synced at ${synced.timestamp}, acked up to ${lastTs}`)
    }
    const c = client(server, room, 'C')
    await connectAll([c])
    await waitConverged([a, b, c], { expected, what: 'a newcomer loads every acked edit from the journal' })

    const exit = await server.stop()
    assert.equal(exit.code, 0, `SIGTERM exits 0: ${JSON.stringify(exit)}`)
    const saved = server.readSnapshot(room)
    assert.deepEqual(liveView(saved.state), liveView(expected))
    assert.deepEqual(saved.state['e2/Shape'], { _exists: false }, 'the deletion is kept as a tombstone')
    assert.deepEqual(readdirSync(server.dataDir), [`${room}.json`], 'the journal was folded in')
  },
)

test('an idle room closes and saves; after a hard restart the file loads, with incremental diffs', async () => {
  const server = newServer({ name: 'idle', saveThrottle: 30, idleTimeout: 0.5 })
  await server.start()
  const room = `idle-${process.pid}`
  const a = client(server, room, 'A')
  const k = client(server, room, 'K')
  await connectAll([a, k])
  a.edit({ 'k/Note': { _exists: true, text: 'hello', list: [1, 2] }, 'SINGLETON/Camera': { _exists: true, zoom: 2 } })
  a.edit({ 'gone/Note': { _exists: true, text: 'bye' } })
  await waitConverged([a, k])
  await waitFor(() => a.allAcked(), { what: 'acked', clients: [a] })
  const kTs = a.lastAckTimestamp()

  // K goes offline with everything up to kTs; A changes more, then leaves too.
  k.disconnect()
  await waitFor(() => a.lastClientCount() === 1, { what: 'K left', clients: [a] })
  a.edit({ 'k/Note': { text: 'hello again' } })
  await sleep(40)
  a.edit({ 'gone/Note': { _exists: false }, 'new/Note': { _exists: true, text: 'new' } })
  await waitFor(() => a.allAcked(), { what: 'acked', clients: [a] })
  const ts = a.lastAckTimestamp()
  assert.ok(ts > kTs)
  a.close()

  // Not saved by the 30 s throttle: only closing the idle room can write this.
  await waitFor(() => server.readSnapshot(room)?.timestamp === ts, {
    what: 'idle room closes and saves',
    timeout: 6000,
    explain: () => `${JSON.stringify(server.readSnapshot(room))}\n${server.output}`,
  })
  await server.kill()
  await server.restart()

  // A newcomer loads everything from the file.
  const b = client(server, room, 'B')
  await connectAll([b])
  const expected = {
    'SINGLETON/Camera': { _exists: true, zoom: 2 },
    'k/Note': { _exists: true, text: 'hello again', list: [1, 2] },
    'new/Note': { _exists: true, text: 'new' },
  }
  assert.deepEqual(b.live(), liveView(expected))
  assert.deepEqual(b.framesIn('synced'), [{ type: 'synced', timestamp: ts }])

  // K reconnects from kTs and gets exactly the fields written after it, from the loaded file.
  await k.reconnect()
  await waitFor(() => k.framesIn('synced', { conn: 2 }).length === 1, { what: 'K synced again', clients: [k] })
  const catchUp = k.framesIn('patch', { conn: 2 }).filter((m) => m.documentPatches)
  assert.deepEqual(catchUp, [
    {
      type: 'patch',
      clientId: '',
      documentPatches: [
        {
          'k/Note': { text: 'hello again' },
          'gone/Note': { _exists: false },
          'new/Note': { _exists: true, text: 'new' },
        },
      ],
      timestamp: ts,
    },
  ])
  await waitConverged([b, k], { expected, what: 'K caught up' })
  assert.deepEqual(k.framesIn('resync'), [])
})

test('snapshot files move between the reference server and the server under test', {
  skip: IS_REFERENCE ? 'the server under test is the reference' : false,
}, async () => {
  const dataDir = makeDataDir()
  try {
    const room = `moved-${process.pid}`
    const expected = {
      'a/Shape': { _exists: true, x: 1, pts: [1, 2, 3, 0] },
      'SINGLETON/Camera': { _exists: true, zoom: 3 },
    }
    // Written by the reference...
    const ref = newServer({ name: 'reference', command: REFERENCE_COMMAND, dataDir, saveThrottle: 30 })
    await ref.start()
    const w = client(ref, room, 'W')
    await connectAll([w])
    w.edit({ 'a/Shape': { _exists: true, x: 1, pts: [1, 2, 0, 0] }, 'b/Shape': { _exists: true, x: 2 } })
    w.edit({ 'SINGLETON/Camera': { _exists: true, zoom: 3 } })
    await sleep(50)
    w.edit({ 'b/Shape': { _exists: false }, 'a/Shape': { pts: { __buf: 1, len: 4, runs: [[2, [3]]] } } })
    await waitFor(() => w.allAcked(), { what: 'acked by the reference', clients: [w] })
    const ts = w.lastAckTimestamp()
    w.close()
    assert.equal((await ref.stop()).code, 0)

    // ...loads in the server under test, tombstone and timestamps included.
    const ours = newServer({ name: 'under-test', command: serverCommand(), dataDir, saveThrottle: 30 })
    await ours.start()
    const r = client(ours, room, 'R')
    await connectAll([r])
    assert.deepEqual(r.live(), liveView(expected))
    assert.deepEqual(r.framesIn('synced'), [{ type: 'synced', timestamp: ts }])
    r.edit({ 'c/Shape': { _exists: true, x: 5 } })
    await waitFor(() => r.allAcked(), { what: 'acked by the server under test', clients: [r] })
    r.close()
    assert.equal((await ours.stop()).code, 0)

    // ...and what it writes loads in the reference again.
    const back = newServer({ name: 'reference-again', command: REFERENCE_COMMAND, dataDir, saveThrottle: 30 })
    await back.start()
    const z = client(back, room, 'Z')
    await connectAll([z])
    assert.deepEqual(z.live(), liveView({ ...expected, 'c/Shape': { _exists: true, x: 5 } }))
    assert.deepEqual(z.framesIn('synced'), [{ type: 'synced', timestamp: ts + 1 }])
    const diff = z.framesIn('patch')[0].documentPatches[0]
    assert.deepEqual(diff['b/Shape'], { _exists: false }, 'the tombstone survived both moves')
    z.close()
    assert.equal((await back.stop()).code, 0)
  } finally {
    for (const s of servers) if (s.dataDir === dataDir) await s.stop()
    rmSync(dataDir, { recursive: true, force: true })
  }
})
