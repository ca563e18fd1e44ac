// Sticky-note board for canvas-store-trio, built on the published client packages.
//
// Every browser tab is one client. Notes are `document` components (kept by the
// server, undoable); each tab's pointer is an `ephemeral` component (shared live,
// never stored). The page talks to the sync server on the origin it was loaded
// from, unless `?server=ws://...` names another one (handy for trying the Node
// reference server with the same page).
//
// URL parameters: room=<name> (default "demo"), server=<ws url>.
import { World, addComponent, createEntity, defineQuery, field, hasComponent, removeEntity } from '@woven-ecs/core'
import { CanvasStore, Synced, defineCanvasComponent } from '@woven-ecs/canvas-store'

const TEXT_MAX_BYTES = 280
const PALETTE = ['#ffe97a', '#ffc2d1', '#b8f2c9', '#bfe3ff', '#e2cbff', '#ffd6a5']
const CURSOR_COLORS = ['#e5484d', '#3e63dd', '#30a46c', '#f76b15', '#8e4ec6', '#0090ff']

const Note = defineCanvasComponent(
  { name: 'note', sync: 'document' },
  {
    x: field.float64(),
    y: field.float64(),
    // Stacking order: raised to "now" when a note is created or picked up.
    z: field.float64(),
    text: field.string().max(TEXT_MAX_BYTES),
    color: field.string().max(16).default(PALETTE[0]),
  },
)

const Cursor = defineCanvasComponent(
  { name: 'cursor', sync: 'ephemeral' },
  {
    x: field.float64(),
    y: field.float64(),
    color: field.string().max(16),
  },
)

const noteQuery = defineQuery((q) => q.with(Synced, Note))
const cursorQuery = defineQuery((q) => q.with(Synced, Cursor))

// ---------------------------------------------------------------- settings

const params = new URLSearchParams(location.search)
const room = params.get('room') || 'demo'
const serverUrl = params.get('server') || `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/`
const clientId = newId()
const myColor = CURSOR_COLORS[Math.floor(Math.random() * CURSOR_COLORS.length)]

/** A UUID; crypto.randomUUID only exists on secure origins, so build one if needed. */
function newId() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID()
  const b = crypto.getRandomValues(new Uint8Array(16))
  b[6] = (b[6] & 0x0f) | 0x40
  b[8] = (b[8] & 0x3f) | 0x80
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('')
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

/** Cut a string so its UTF-8 form fits the field (the ECS stores bytes, not characters). */
function clampBytes(text, max) {
  const encoder = new TextEncoder()
  if (encoder.encode(text).length <= max) return text
  let out = ''
  let used = 0
  for (const ch of text) {
    const n = encoder.encode(ch).length
    if (used + n > max) break
    out += ch
    used += n
  }
  return out
}

// ---------------------------------------------------------------- page elements

const $ = (sel) => document.querySelector(sel)
const board = $('#board')
const sheet = $('#sheet')
const statusEl = $('#status')
const peersEl = $('#peers')
$('#room').textContent = room

const state = { online: false, synced: false, error: '' }

function showStatus() {
  statusEl.dataset.online = String(state.online)
  statusEl.dataset.synced = String(state.synced)
  statusEl.textContent = state.error || (state.online ? (state.synced ? 'online' : 'loading…') : 'offline – edits are kept and sent on reconnect')
}
showStatus()

/** Board coordinates (scroll-independent) of a pointer event. */
function sheetPoint(e) {
  const r = sheet.getBoundingClientRect()
  return { x: e.clientX - r.left, y: e.clientY - r.top }
}

// ---------------------------------------------------------------- store and world

// No `persistence` (IndexedDB) on purpose: this page comes from the sync server, so it
// cannot be reloaded while that server is down anyway, and without a local copy a
// reload shows exactly what the server kept. Edits made offline wait in the client's
// in-memory offline buffer and go out on reconnect.
const store = new CanvasStore({
  history: true,
  websocket: {
    documentId: room,
    url: serverUrl,
    clientId,
    onConnectivityChange: (online) => {
      state.online = online
      showStatus()
    },
    onSync: () => {
      state.synced = true
      showStatus()
    },
    onVersionMismatch: (version) => {
      state.error = `server speaks protocol ${version}; reload the page`
      showStatus()
    },
  },
})

const world = new World([Synced, Note, Cursor], { threads: 1 })

/** Edits from event handlers, applied at the start of the next frame. */
const actions = []
/** stable id -> entity, refreshed every frame by render(). */
const entityOf = new Map()

function withNote(id, fn) {
  actions.push((ctx) => {
    const eid = entityOf.get(id)
    if (eid === undefined || !hasComponent(ctx, eid, Note, false)) return
    if (Synced.read(ctx, eid).id !== id) return
    fn(ctx, eid)
  })
}

function addNote(x, y, text = '') {
  const id = newId()
  actions.push((ctx) => {
    const eid = createEntity(ctx)
    addComponent(ctx, eid, Synced, { id })
    addComponent(ctx, eid, Note, {
      x: Math.max(0, x),
      y: Math.max(0, y),
      z: Date.now(),
      text: clampBytes(text, TEXT_MAX_BYTES),
      color: PALETTE[Math.floor(Math.random() * PALETTE.length)],
    })
  })
  return id
}

function moveNote(id, x, y) {
  withNote(id, (ctx, eid) => {
    const n = Note.write(ctx, eid)
    n.x = Math.max(0, x)
    n.y = Math.max(0, y)
  })
}

function raiseNote(id) {
  withNote(id, (ctx, eid) => {
    Note.write(ctx, eid).z = Date.now()
  })
}

function setText(id, text) {
  withNote(id, (ctx, eid) => {
    Note.write(ctx, eid).text = text
  })
}

function deleteNote(id) {
  withNote(id, (ctx, eid) => removeEntity(ctx, eid))
}

let myCursor = null // entity of this tab's pointer
let pendingPointer = null

function moveCursor(p) {
  pendingPointer = p
}

function applyCursor(ctx) {
  if (!pendingPointer) return
  const { x, y } = pendingPointer
  pendingPointer = null
  if (myCursor === null) {
    myCursor = createEntity(ctx)
    addComponent(ctx, myCursor, Synced, { id: clientId })
    addComponent(ctx, myCursor, Cursor, { x, y, color: myColor })
  } else {
    const c = Cursor.write(ctx, myCursor)
    c.x = x
    c.y = y
  }
}

// ---------------------------------------------------------------- rendering

/** stable id -> { el, textarea, model: the note as stored, shown: what the DOM shows } */
const views = new Map()
const cursorViews = new Map()
let drag = null // { id, dx, dy, pointerId }

function createNoteView(id) {
  const el = document.createElement('div')
  el.className = 'note'
  el.dataset.id = id
  el.innerHTML = '<div class="grip"><span>⠿</span><button class="del" title="Delete note">×</button></div><textarea spellcheck="false"></textarea>'
  const grip = el.querySelector('.grip')
  const textarea = el.querySelector('textarea')
  const view = { el, textarea, model: null, shown: {} }

  grip.addEventListener('pointerdown', (e) => {
    if (e.button !== 0 || e.target.closest('.del')) return
    e.preventDefault()
    const p = sheetPoint(e)
    drag = { id, dx: p.x - view.shown.x, dy: p.y - view.shown.y, pointerId: e.pointerId }
    grip.setPointerCapture(e.pointerId)
    el.classList.add('dragging')
    raiseNote(id)
  })
  grip.addEventListener('pointermove', (e) => {
    if (!drag || drag.id !== id || drag.pointerId !== e.pointerId) return
    const p = sheetPoint(e)
    moveNote(id, p.x - drag.dx, p.y - drag.dy)
  })
  const endDrag = (e) => {
    if (!drag || drag.id !== id || drag.pointerId !== e.pointerId) return
    drag = null
    el.classList.remove('dragging')
  }
  grip.addEventListener('pointerup', endDrag)
  grip.addEventListener('pointercancel', endDrag)
  el.querySelector('.del').addEventListener('click', () => deleteNote(id))
  textarea.addEventListener('input', () => {
    const text = clampBytes(textarea.value, TEXT_MAX_BYTES)
    if (text !== textarea.value) textarea.value = text
    setText(id, text)
  })

  sheet.appendChild(el)
  views.set(id, view)
  return view
}

function renderNotes(ctx) {
  const seen = new Set()
  const order = []
  entityOf.clear()
  for (const eid of noteQuery.current(ctx)) {
    const id = Synced.read(ctx, eid).id
    const n = Note.read(ctx, eid)
    entityOf.set(id, eid)
    seen.add(id)
    const view = views.get(id) ?? createNoteView(id)
    view.model = { x: n.x, y: n.y, z: n.z, text: n.text, color: n.color }
    const s = view.shown
    if (s.x !== n.x || s.y !== n.y) {
      view.el.style.transform = `translate(${n.x}px, ${n.y}px)`
      s.x = n.x
      s.y = n.y
    }
    if (s.color !== n.color) {
      view.el.style.background = n.color
      s.color = n.color
    }
    // Do not fight the user's typing; a remote edit shows once they leave the note.
    if (s.text !== n.text && document.activeElement !== view.textarea) {
      view.textarea.value = n.text
      s.text = n.text
    }
    order.push([n.z, id, view])
  }
  for (const [id, view] of views) {
    if (!seen.has(id)) {
      view.el.remove()
      views.delete(id)
      if (drag?.id === id) drag = null
    }
  }
  order.sort((a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : 1))
  order.forEach(([, , view], i) => {
    if (view.shown.rank !== i) {
      view.el.style.zIndex = String(i + 1)
      view.shown.rank = i
    }
  })
  sheet.dataset.count = String(seen.size)
}

function renderCursors(ctx) {
  const seen = new Set()
  for (const eid of cursorQuery.current(ctx)) {
    const id = Synced.read(ctx, eid).id
    if (id === clientId) continue
    const c = Cursor.read(ctx, eid)
    seen.add(id)
    let el = cursorViews.get(id)
    if (!el) {
      el = document.createElement('div')
      el.className = 'cursor'
      el.innerHTML = '<svg width="18" height="18" viewBox="0 0 18 18"><path d="M1 1 L1 15 L5 11 L8 17 L11 16 L8 10 L14 10 Z" stroke="#fff" stroke-width="1.2"/></svg>'
      sheet.appendChild(el)
      cursorViews.set(id, el)
    }
    el.style.transform = `translate(${c.x}px, ${c.y}px)`
    el.querySelector('path').setAttribute('fill', c.color || '#888')
  }
  for (const [id, el] of cursorViews) {
    if (!seen.has(id)) {
      el.remove()
      cursorViews.delete(id)
    }
  }
  peersEl.textContent = seen.size === 0 ? '' : `${seen.size} other${seen.size === 1 ? '' : 's'} here`
}

// ---------------------------------------------------------------- input

/** The first place in view, on a grid, where a new note would not cover another. */
function freeSpot() {
  const notes = [...views.values()].map((v) => v.model)
  const left = board.scrollLeft + 40
  const top = board.scrollTop + 40
  const columns = Math.max(1, Math.floor((board.clientWidth - 60) / 210))
  for (let i = 0; i < 60; i++) {
    const x = left + (i % columns) * 210
    const y = top + Math.floor(i / columns) * 150
    if (!notes.some((n) => Math.abs(n.x - x) < 180 && Math.abs(n.y - y) < 120)) return { x, y }
  }
  return { x: left, y: top }
}

$('#add').addEventListener('click', () => {
  const { x, y } = freeSpot()
  addNote(x, y)
})

sheet.addEventListener('dblclick', (e) => {
  if (e.target !== sheet) return
  const p = sheetPoint(e)
  addNote(p.x - 90, p.y - 20)
})

sheet.addEventListener('pointermove', (e) => moveCursor(sheetPoint(e)))

window.addEventListener('keydown', (e) => {
  if (!(e.ctrlKey || e.metaKey) || e.target instanceof HTMLTextAreaElement) return
  const key = e.key.toLowerCase()
  if (key === 'z' && !e.shiftKey) {
    e.preventDefault()
    store.undo()
  } else if ((key === 'z' && e.shiftKey) || key === 'y') {
    e.preventDefault()
    store.redo()
  }
})

// ---------------------------------------------------------------- the frame loop

function frame() {
  world
    .execute((ctx) => {
      for (const action of actions.splice(0)) action(ctx)
      applyCursor(ctx)
      store.sync(ctx)
      renderNotes(ctx)
      renderCursors(ctx)
    })
    .catch((err) => console.error(err))
}

await store.initialize({ components: [Note, Cursor], singletons: [] })

// requestAnimationFrame stops in background tabs; a slow timer keeps a hidden
// tab applying and sending changes.
let lastFrame = 0
function onAnimationFrame() {
  lastFrame = performance.now()
  frame()
  requestAnimationFrame(onAnimationFrame)
}
requestAnimationFrame(onAnimationFrame)
setInterval(() => {
  if (performance.now() - lastFrame > 200) {
    lastFrame = performance.now()
    frame()
  }
}, 250)

// A small read-only handle for the browser test and the curious.
window.canvasDemo = {
  clientId,
  room,
  serverUrl,
  get online() {
    return state.online
  },
  get synced() {
    return state.synced
  },
  notes() {
    return [...views.entries()].map(([id, v]) => ({ id, ...v.model })).sort((a, b) => (a.id < b.id ? -1 : 1))
  },
}
document.body.dataset.ready = 'true'
