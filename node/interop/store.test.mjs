// The whole client: `CanvasStore` (ECS + history + websocket adapters) on a @woven-ecs/core
// `World` with real components, synced every frame through the server under test.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'
import { CanvasStore, defineCanvasComponent, defineCanvasSingleton, Synced } from '@woven-ecs/canvas-store'
import {
  addComponent,
  createEntity,
  defineQuery,
  field,
  hasComponent,
  removeComponent,
  removeEntity,
  World,
} from '@woven-ecs/core'
import { cid, FRAME_MS, formatFrames, framesOf, ServerProcess, sleep, waitFor } from './harness.mjs'

const Shape = defineCanvasComponent(
  { name: 'Shape', sync: 'document' },
  {
    x: field.float64().default(0),
    y: field.float64().default(0),
    color: field.string().max(32).default('black'),
  },
)
const Stroke = defineCanvasComponent(
  { name: 'Stroke', sync: 'document' },
  {
    points: field.buffer(field.float32()).size(64),
    count: field.uint32().default(0),
  },
)
const Cursor = defineCanvasComponent(
  { name: 'Cursor', sync: 'ephemeral' },
  {
    x: field.float64().default(0),
    y: field.float64().default(0),
  },
)
const Camera = defineCanvasSingleton(
  { name: 'Camera', sync: 'document' },
  {
    zoom: field.float64().default(1),
  },
)
const COMPONENTS = [Shape, Stroke, Cursor]
const SINGLETONS = [Camera]
const synced = defineQuery((q) => q.with(Synced))

const server = new ServerProcess({ name: 'store', saveThrottle: 0.3, idleTimeout: 2 })
const stores = []

/** An app: a World, a CanvasStore with websocket sync, and a frame loop calling `store.sync`. */
class App {
  constructor(room, prefix, { history = false } = {}) {
    this.clientId = cid(prefix)
    this.room = room
    this.history = history
    this.syncCalls = 0
    this.closed = false
    stores.push(this)
  }

  async start() {
    this.world = new World([Synced, Shape, Stroke, Cursor, Camera], { maxEntities: 1000, maxEvents: 8192 })
    this.store = new CanvasStore({
      history: this.history ? { commitCheckpointAfterFrames: 2 } : undefined,
      websocket: {
        documentId: this.room,
        url: server.url,
        clientId: this.clientId,
        onSync: () => {
          this.syncCalls += 1
        },
      },
    })
    await this.store.initialize({ components: COMPONENTS, singletons: SINGLETONS })
    this.loop = (async () => {
      while (!this.closed) {
        await this.world.execute((ctx) => this.store.sync(ctx))
        await sleep(FRAME_MS)
      }
    })()
    await waitFor(() => this.store.isSynced, { what: `${this.clientId} isSynced`, clients: [this.clientId] })
    return this
  }

  /** Run `fn(ctx)` in the world between frames, like an app system. */
  async run(fn) {
    let result
    await this.world.execute((ctx) => {
      result = fn(ctx)
    })
    return result
  }

  entity(ctx, stableId) {
    for (const eid of synced.current(ctx)) {
      if (Synced.read(ctx, eid).id === stableId) return eid
    }
    return undefined
  }

  /** What the app would render: stable id -> component -> plain values, read from the world. */
  async view() {
    return await this.run((ctx) => {
      const out = {}
      const ids = []
      for (const eid of synced.current(ctx)) ids.push([Synced.read(ctx, eid).id, eid])
      ids.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      for (const [id, eid] of ids) {
        const rec = {}
        if (hasComponent(ctx, eid, Shape)) {
          const s = Shape.read(ctx, eid)
          rec.Shape = { x: s.x, y: s.y, color: s.color }
        }
        if (hasComponent(ctx, eid, Stroke)) {
          const s = Stroke.read(ctx, eid)
          rec.Stroke = { count: s.count, points: Array.from(s.points.slice(0, s.count * 2)) }
        }
        if (hasComponent(ctx, eid, Cursor)) {
          const c = Cursor.read(ctx, eid)
          rec.Cursor = { x: c.x, y: c.y }
        }
        if (Object.keys(rec).length > 0) out[id] = rec
      }
      out.Camera = { zoom: Camera.read(ctx).zoom }
      return out
    })
  }

  async close() {
    if (this.closed) return
    this.closed = true
    await this.loop
    this.store.close()
  }
}

async function waitViews(apps, check, what) {
  let views = []
  await waitFor(
    async () => {
      views = await Promise.all(apps.map((a) => a.view()))
      return check(views)
    },
    {
      what,
      timeout: 6000,
      clients: apps.map((a) => a.clientId),
      explain: () => apps.map((a, i) => `${a.clientId}: ${JSON.stringify(views[i])}`).join('\n'),
    },
  )
  return views
}

const allEqual = (views) => views.every((v) => JSON.stringify(v) === JSON.stringify(views[0]))

before(async () => {
  await server.start()
})

after(async () => {
  for (const s of stores) await s.close()
  const exit = await server.stop()
  await server.dispose()
  assert.equal(exit.code, 0, `server exit on SIGTERM: ${JSON.stringify(exit)}\n${server.output}`)
})

test('two CanvasStores on real Worlds stay in sync; a third loads the same world', async () => {
  const room = `store-${process.pid}`
  const a = await new App(room, 'A', { history: true }).start()
  const b = await new App(room, 'B').start()
  assert.equal(a.syncCalls, 1, 'onSync fired once')
  assert.equal(b.syncCalls, 1, 'onSync fired once')

  // A creates a shape; B's world gets an entity with the same stable id.
  await a.run((ctx) => {
    const e = createEntity(ctx)
    addComponent(ctx, e, Synced, { id: 'shape-1' })
    addComponent(ctx, e, Shape, { x: 1, y: 2, color: 'red' })
  })
  await waitViews([a, b], (v) => v[1]['shape-1']?.Shape?.color === 'red' && allEqual(v), 'B sees the new shape')

  // B moves it, A changes its colour: the two edits merge.
  await b.run((ctx) => {
    Shape.write(ctx, b.entity(ctx, 'shape-1')).x = 50
  })
  await a.run((ctx) => {
    Shape.write(ctx, a.entity(ctx, 'shape-1')).color = 'blue'
  })
  await waitViews(
    [a, b],
    (v) => allEqual(v) && JSON.stringify(v[0]['shape-1'].Shape) === JSON.stringify({ x: 50, y: 2, color: 'blue' }),
    'move and recolour merge',
  )

  // A draws a stroke point by point: the ECS adapter sends buffer deltas.
  await a.run((ctx) => {
    const e = createEntity(ctx)
    addComponent(ctx, e, Synced, { id: 'stroke-1' })
    addComponent(ctx, e, Stroke, { points: [0, 0], count: 1 })
  })
  const drawn = [0, 0]
  for (let i = 1; i <= 12; i++) {
    await a.run((ctx) => {
      const s = Stroke.write(ctx, a.entity(ctx, 'stroke-1'))
      s.points[i * 2] = i
      s.points[i * 2 + 1] = i * 2
      s.count = i + 1
    })
    drawn.push(i, i * 2)
    await sleep(FRAME_MS * 2)
  }
  await waitViews(
    [a, b],
    (v) => allEqual(v) && JSON.stringify(v[1]['stroke-1']?.Stroke?.points) === JSON.stringify(drawn),
    'B has every stroke point',
  )
  const deltas = framesOf(a.clientId).filter(
    (f) => f.dir === 'out' && f.msg.documentPatches?.some((p) => p['stroke-1/Stroke']?.points?.__buf === 1),
  )
  assert.ok(deltas.length > 0, `A sent the stroke as buffer deltas:\n${formatFrames([a.clientId])}`)

  // A document singleton.
  await b.run((ctx) => {
    Camera.write(ctx).zoom = 2.5
  })
  await waitViews([a, b], (v) => allEqual(v) && v[0].Camera.zoom === 2.5, 'camera singleton syncs')

  // Undo on A goes through the server like any edit.
  await a.run((ctx) => {
    Shape.write(ctx, a.entity(ctx, 'shape-1')).y = 99
  })
  await waitViews([a, b], (v) => allEqual(v) && v[1]['shape-1'].Shape.y === 99, 'y = 99 reaches B')
  await sleep(FRAME_MS * 6) // let history commit the checkpoint
  assert.ok(a.store.canUndo())
  a.store.undo()
  await waitViews([a, b], (v) => allEqual(v) && v[1]['shape-1'].Shape.y === 2, 'undo on A reaches B')

  // Presence: A's cursor shows on B, and goes away when A leaves.
  await a.run((ctx) => {
    const e = createEntity(ctx)
    addComponent(ctx, e, Synced, { id: `cursor-${a.clientId}` })
    addComponent(ctx, e, Cursor, { x: 7, y: 8 })
  })
  await waitViews([a, b], (v) => v[1][`cursor-${a.clientId}`]?.Cursor?.x === 7, "B sees A's cursor")

  // Delete: B removes the shape entity.
  await b.run((ctx) => {
    removeEntity(ctx, b.entity(ctx, 'shape-1'))
  })
  await waitViews([a, b], (v) => v[0]['shape-1'] === undefined && v[1]['shape-1'] === undefined, 'shape deleted on both')
  // And a component removal.
  await a.run((ctx) => {
    const e = createEntity(ctx)
    addComponent(ctx, e, Synced, { id: 'both' })
    addComponent(ctx, e, Shape, { x: 3, y: 3, color: 'green' })
    addComponent(ctx, e, Stroke, { points: [5, 5], count: 1 })
  })
  await waitViews([a, b], (v) => allEqual(v) && v[1].both?.Stroke?.count === 1, 'two-component entity')
  await a.run((ctx) => {
    removeComponent(ctx, a.entity(ctx, 'both'), Stroke)
  })
  await waitViews([a, b], (v) => allEqual(v) && v[1].both && v[1].both.Stroke === undefined, 'component removal')

  // A late joiner loads the same world (A's cursor included, it is still here).
  const c = await new App(room, 'C').start()
  const views = await waitViews([a, b, c], allEqual, 'late joiner C has the same world')
  assert.deepEqual(views[2]['stroke-1'].Stroke.points, drawn)
  assert.equal(views[2].Camera.zoom, 2.5)
  assert.equal(views[2].both.Shape.color, 'green')

  // A leaves: its cursor disappears from B and C; the document stays.
  await a.close()
  await waitViews(
    [b, c],
    (v) => v.every((x) => x[`cursor-${a.clientId}`]?.Cursor === undefined) && allEqual(v),
    "A's cursor cleared after A left",
  )
  const d = await new App(room, 'D').start()
  const after = await waitViews([b, c, d], allEqual, 'a newcomer after A left agrees')
  assert.equal(after[2][`cursor-${a.clientId}`]?.Cursor, undefined)
  assert.deepEqual(after[2]['stroke-1'].Stroke.points, drawn)
})
