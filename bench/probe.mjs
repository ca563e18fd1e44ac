// Event-loop stall probe for bench/loadgen.mjs (shape `stall`), run as a worker thread so
// that the main thread's garbage (a 100k-component frame, file polling) cannot pause it.
// It joins its own room and sends a tiny ephemeral patch every `intervalMs`, one in flight,
// recording the epoch time of every ack and its latency into shared arrays. A server that
// blocks its event loop shows up as a long gap between two acks.
//
// workerData: {url, room, intervalMs, sab: {times, lats, ctl}}; ctl = Int32Array [count, stop].
// Messages from the parent: 'mark' -> replies {mark: max own loop delay ms since last mark}.
import { createRequire } from 'node:module'
import { monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { parentPort, workerData } from 'node:worker_threads'

const require = createRequire(new URL('../node/package.json', import.meta.url))
const WebSocket = require('ws')

const { url, room, sab, intervalMs = 1 } = workerData
const times = new Float64Array(sab.times)
const lats = new Float64Array(sab.lats)
const ctl = new Int32Array(sab.ctl)
const cap = times.length
const epochNow = () => performance.timeOrigin + performance.now()

const eld = monitorEventLoopDelay({ resolution: 1 })
eld.enable()
parentPort.on('message', (m) => {
  if (m === 'mark') {
    parentPort.postMessage({ mark: eld.max / 1e6 })
    eld.reset()
  }
})

const ws = new WebSocket(`${url}/?roomId=${encodeURIComponent(room)}&clientId=probe&token=bench`, { perMessageDeflate: false })
let synced = false
let ready = false
let seq = 0
let sentAt = 0
const send = () => {
  seq++
  sentAt = epochNow()
  ws.send(`{"type":"patch","messageId":"probe-${seq}","ephemeralPatches":[{"probe/cursor":{"x":${seq},"y":1}}]}`)
}
ws.on('open', () => {
  parentPort.postMessage({ status: 'open' })
  ws.send('{"type":"reconnect","lastTimestamp":0,"protocolVersion":2}')
})
ws.on('message', (data) => {
  const t = epochNow()
  const m = JSON.parse(data.toString())
  if (!synced) {
    parentPort.postMessage({ status: `before synced: ${String(data).slice(0, 200)}` })
    if (m.type === 'synced') {
      synced = true
      // Create the ephemeral key; ephemeral state is never saved, so the probe adds no saves.
      ws.send('{"type":"patch","messageId":"probe-0","ephemeralPatches":[{"probe/cursor":{"_exists":true,"x":0,"y":0}}]}')
    }
    return
  }
  if (!ready) parentPort.postMessage({ status: `after synced: ${String(data).slice(0, 200)}` })
  if (m.type !== 'ack') return
  if (!ready) {
    ready = true
    parentPort.postMessage({ ready: true })
    send()
    return
  }
  const i = ctl[0]
  if (i < cap) {
    times[i] = t
    lats[i] = t - sentAt
    Atomics.store(ctl, 0, i + 1)
  }
  // Paced, not back to back: an idle server and an idle probe leave the two cores free, so
  // the OS scheduler adds little noise, and a stall of S ms still shows as >= S - interval.
  if (Atomics.load(ctl, 1) === 0 && i < cap) setTimeout(send, Math.max(0, sentAt + intervalMs - epochNow()))
  else {
    ws.terminate()
    parentPort.postMessage({ done: true, full: i >= cap })
  }
})
ws.on('error', (e) => parentPort.postMessage({ error: String(e) }))
ws.on('close', () => {
  if (!Atomics.load(ctl, 1)) parentPort.postMessage({ error: 'probe socket closed' })
})
