// The demo page in headless Chromium against `canvas-store-trio serve --demo`.
//
//   node --test demo/browser.test.mjs        (tests/test_demo_browser.py runs this)
//
// The script starts the server itself, because one step stops it and starts it again
// on the same port and data folder. Settings, all optional, come from the environment:
//   DEMO_SERVER_COMMAND  JSON argv; "{port}" and "{dataDir}" are filled in
//                        (default: .venv/bin/python -m canvas_store_trio serve --demo ...)
//   DEMO_PORT            port to serve on (default: a free one)
//   DEMO_DATA_DIR        the server's --data-dir (default: a new temporary folder)
//   DEMO_ROOM            room name (default: a fresh one)
//   DEMO_SCREENSHOT      where to save a screenshot of the end state (default: none;
//                        docs/demo.png is made with DEMO_SCREENSHOT=docs/demo.png)
//   CHROMIUM             the browser (default: /usr/bin/chromium); nothing is downloaded
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const { chromium } = createRequire(join(root, 'node', 'package.json'))('playwright-core')

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]
const VIEWPORT = { viewport: { width: 1000, height: 620 } }
const STEP_TIMEOUT = 60_000
const WAIT = 30_000 // longest single wait: a reconnect back-off reaches 10 s

const env = process.env
const ownDataDir = !env.DEMO_DATA_DIR
const dataDir = env.DEMO_DATA_DIR || mkdtempSync(join(tmpdir(), 'demo-browser-'))
// A fresh data folder can use the plain name; a given one gets a new room.
const room = env.DEMO_ROOM || (ownDataDir ? 'demo' : `browser-${Date.now().toString(36)}`)
const screenshotPath = env.DEMO_SCREENSHOT ? resolve(env.DEMO_SCREENSHOT) : ''
const commandTemplate = env.DEMO_SERVER_COMMAND
  ? JSON.parse(env.DEMO_SERVER_COMMAND)
  : [
      join(root, '.venv', 'bin', 'python'),
      '-m',
      'canvas_store_trio',
      'serve',
      '--demo',
      '--host',
      '127.0.0.1',
      '--port',
      '{port}',
      '--data-dir',
      '{dataDir}',
      '--save-throttle',
      '0.2',
    ]

function freePort() {
  return new Promise((resolvePort, reject) => {
    const probe = createServer()
    probe.on('error', reject)
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address()
      probe.close(() => resolvePort(port))
    })
  })
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** The server under test, as a child process we can stop and start again. */
class Server {
  constructor(argv) {
    this.argv = argv
    this.proc = null
    this.output = ''
  }

  async start(pageUrl) {
    assert.equal(this.proc, null, 'server already running')
    const proc = spawn(this.argv[0], this.argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] })
    this.proc = proc
    proc.exited = new Promise((r) => proc.on('exit', (code, signal) => r({ code, signal })))
    proc.stdout.on('data', (d) => (this.output += d))
    proc.stderr.on('data', (d) => (this.output += d))
    const deadline = Date.now() + 20_000
    for (;;) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        this.proc = null
        throw new Error(`server exited while starting:\n${this.argv.join(' ')}\n${this.output}`)
      }
      try {
        const res = await fetch(pageUrl)
        if (res.ok && (res.headers.get('content-type') ?? '').startsWith('text/html')) return
      } catch {}
      if (Date.now() > deadline) throw new Error(`server did not serve ${pageUrl} within 20 s:\n${this.output}`)
      await sleep(100)
    }
  }

  /** SIGTERM, which must shut down gracefully (sessions closed, rooms saved, exit 0). */
  async stop() {
    const proc = this.proc
    if (!proc) return
    proc.kill('SIGTERM')
    const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000)
    const { code, signal } = await proc.exited
    clearTimeout(timer)
    this.proc = null
    assert.equal(code, 0, `server did not exit cleanly on SIGTERM (code ${code}, signal ${signal}):\n${this.output}`)
  }

  kill() {
    this.proc?.kill('SIGKILL')
    this.proc = null
  }
}

describe('demo page in Chromium', { timeout: 5 * 60_000 }, () => {
  let server
  let browser
  let pageUrl
  let a
  let b
  const pageErrors = []
  let broken = false

  /** Run one step; after a failure, later steps are skipped instead of failing noisily. */
  const step = (name, fn) =>
    it(name, { timeout: STEP_TIMEOUT }, async (t) => {
      if (broken) return t.skip('an earlier step failed')
      try {
        await fn(t)
      } catch (err) {
        broken = true
        if (server?.output) err.message += `\n--- server output ---\n${server.output.slice(-4000)}`
        throw err
      }
    })

  async function openPage(context, name) {
    const page = await context.newPage()
    page.setDefaultTimeout(WAIT)
    page.on('pageerror', (err) => pageErrors.push(`${name}: ${err.message}`))
    await page.goto(pageUrl)
    await waitOnline(page)
    return page
  }

  // Poll on a timer, not on animation frames, so a throttled page cannot stall a wait.
  const until = (page, fn, arg) => page.waitForFunction(fn, arg, { polling: 50 })
  const waitOnline = (page) => until(page, () => window.canvasDemo?.online && window.canvasDemo.synced)
  const waitOffline = (page) => until(page, () => window.canvasDemo && !window.canvasDemo.online)
  const notes = (page) => page.evaluate(() => window.canvasDemo.notes())

  /** Wait until the page shows exactly `expected` (as returned by notes()). */
  async function waitForNotes(page, expected) {
    const want = JSON.stringify(expected)
    try {
      await until(page, (w) => JSON.stringify(window.canvasDemo.notes()) === w, want)
    } catch (err) {
      assert.deepEqual(await notes(page), expected, `page never showed the expected notes (${err.message})`)
    }
  }

  /** Wait until every page shows the same notes and `check` holds for them; returns them. */
  async function converge(pages, check) {
    const deadline = Date.now() + WAIT
    let seen = []
    for (;;) {
      seen = await Promise.all(pages.map(notes))
      const first = JSON.stringify(seen[0])
      if (seen.every((n) => JSON.stringify(n) === first) && check(seen[0])) return seen[0]
      if (Date.now() > deadline) break
      await sleep(50)
    }
    for (const other of seen.slice(1)) assert.deepEqual(other, seen[0], 'the pages never agreed')
    assert.fail(`the pages agree, but not on what was expected: ${JSON.stringify(seen[0])}`)
  }

  /** Click "+ Add note" and type into the new note; returns its id. */
  async function addNote(page, text) {
    const before = new Set((await notes(page)).map((n) => n.id))
    await page.click('#add')
    const handle = await until(
      page,
      (known) => window.canvasDemo.notes().find((n) => !known.includes(n.id))?.id,
      [...before],
    )
    const id = await handle.jsonValue()
    await page.fill(`.note[data-id="${id}"] textarea`, text)
    await until(page, ([i, t]) => window.canvasDemo.notes().find((n) => n.id === i)?.text === t, [id, text])
    return id
  }

  /** Drag a note by its grip with real mouse events; returns the note afterwards. */
  async function dragNote(page, id, dx, dy) {
    const start = (await notes(page)).find((n) => n.id === id)
    const box = await page.locator(`.note[data-id="${id}"] .grip`).boundingBox()
    const x = box.x + 30
    const y = box.y + box.height / 2
    await page.mouse.move(x, y)
    await page.mouse.down()
    await page.mouse.move(x + dx, y + dy, { steps: 15 })
    await page.mouse.up()
    const moved = await until(
      page,
      ([i, x0, y0]) => {
        const n = window.canvasDemo.notes().find((m) => m.id === i)
        return n && Math.abs(n.x - x0) < 0.5 && Math.abs(n.y - y0) < 0.5 ? n : null
      },
      [id, start.x + dx, start.y + dy],
    )
    return moved.jsonValue()
  }

  before(async () => {
    const port = env.DEMO_PORT ? Number(env.DEMO_PORT) : await freePort()
    pageUrl = `http://127.0.0.1:${port}/?room=${encodeURIComponent(room)}`
    const argv = commandTemplate.map((arg) => arg.replaceAll('{port}', String(port)).replaceAll('{dataDir}', dataDir))
    server = new Server(argv)
    await server.start(pageUrl)
    browser = await chromium.launch({ executablePath: env.CHROMIUM || '/usr/bin/chromium', args: CHROMIUM_ARGS })
  })

  after(async () => {
    await browser?.close()
    if (server?.proc) {
      try {
        await server.stop()
      } catch {
        server.kill()
      }
    }
    if (ownDataDir) rmSync(dataDir, { recursive: true, force: true })
  })

  step('serves the page, its script and nothing else', async () => {
    const page = await fetch(pageUrl)
    assert.equal(page.status, 200)
    assert.match(page.headers.get('content-type'), /^text\/html/)
    const script = await fetch(new URL('/app.js', pageUrl))
    assert.equal(script.status, 200)
    assert.match(script.headers.get('content-type'), /^text\/javascript/)
    assert.equal((await fetch(new URL('/nope.js', pageUrl))).status, 404)
    assert.equal((await fetch(new URL('/%2e%2e/pyproject.toml', pageUrl))).status, 404)
    assert.equal((await fetch(pageUrl, { method: 'POST', body: 'x' })).status, 405)
  })

  step('two windows edit the same document live', async () => {
    // One browser context each, that is one window each. (Two tabs of one headless
    // window work too, but the hidden one gets throttled input and timers.)
    a = await openPage(await browser.newContext(VIEWPORT), 'A')
    b = await openPage(await browser.newContext(VIEWPORT), 'B')
    const first = await addNote(a, 'Drag me: every tab sees it move')
    await dragNote(a, first, 320, 150)
    await addNote(b, 'Typed in window B')
    await converge([a, b], (all) => all.length === 2 && all.some((n) => n.text === 'Typed in window B'))
    // Presence rides on ephemeral patches: A's pointer shows up in B.
    await a.mouse.move(600, 420, { steps: 5 })
    await b.waitForSelector('.cursor')
  })

  step('a reload gets the document back from the server', async () => {
    const expected = await notes(a)
    await b.reload()
    await waitOnline(b)
    await waitForNotes(b, expected)
  })

  step('edits made while the server is down arrive after it restarts', async () => {
    const [note] = (await notes(a)).filter((n) => n.text.startsWith('Drag me'))
    await server.stop()
    await Promise.all([waitOffline(a), waitOffline(b)])
    const beforeInB = await notes(b)

    await dragNote(a, note.id, -180, 170)
    await a.fill(`.note[data-id="${note.id}"] textarea`, 'Moved while the server was down')
    await addNote(a, 'Added offline, synced later')
    const offline = await notes(a)
    assert.equal(offline.length, 3)
    await sleep(300)
    assert.deepEqual(await notes(b), beforeInB, 'B changed while the server was down')

    await server.start(pageUrl)
    await Promise.all([waitOnline(a), waitOnline(b)])
    await waitForNotes(b, offline)
    await waitForNotes(a, offline)
  })

  step('a new browser loads the same document from the restarted server', async () => {
    const expected = await notes(a)
    const context = await browser.newContext(VIEWPORT)
    const c = await openPage(context, 'C')
    await waitForNotes(c, expected)
    await context.close()
  })

  step('the room is saved in the data folder', async () => {
    const file = join(dataDir, `${room}.json`)
    const deadline = Date.now() + 10_000
    let text = ''
    while (Date.now() < deadline) {
      text = existsSync(file) ? readFileSync(file, 'utf8') : ''
      if (text.includes('Added offline, synced later')) break
      await sleep(100)
    }
    const snapshot = JSON.parse(text || '{}')
    const live = Object.entries(snapshot.state ?? {}).filter(([k, v]) => k.endsWith('/note') && v._exists)
    assert.equal(live.length, 3, `expected 3 notes in ${file}`)
  })

  step('screenshot', async (t) => {
    if (!screenshotPath) return t.skip('DEMO_SCREENSHOT is not set')
    await a.mouse.move(430, 250, { steps: 5 })
    await b.waitForSelector('.cursor')
    await sleep(200)
    mkdirSync(dirname(screenshotPath), { recursive: true })
    await b.screenshot({ path: screenshotPath })
  })

  step('no uncaught errors in the pages', async () => {
    assert.deepEqual(pageErrors, [])
  })
})
