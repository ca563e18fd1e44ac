// Builds the demo page into the Python package: src/canvas_store_trio/_demo/
//
//   node demo/build.mjs [--outdir DIR]
//
// Packages come from node/node_modules (run `npm ci` in node/ first). The output
// (index.html, app.js and the licence notices of the bundled packages) is what
// `canvas-store-trio serve --demo` serves.
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const here = dirname(fileURLToPath(import.meta.url))
const root = resolve(here, '..')
const nodeDir = join(root, 'node')
const nodeModules = join(nodeDir, 'node_modules')

const { values } = parseArgs({
  options: { outdir: { type: 'string', default: join(root, 'src', 'canvas_store_trio', '_demo') } },
})
const outdir = resolve(values.outdir)

// This script lives outside node/, so load esbuild from there explicitly.
let esbuild
try {
  esbuild = createRequire(join(nodeDir, 'package.json'))('esbuild')
} catch {
  console.error(`esbuild not found under ${nodeModules}; run \`npm ci\` in ${nodeDir} first.`)
  process.exit(1)
}

// Start from an empty folder so no stale asset is ever packaged or served.
rmSync(outdir, { recursive: true, force: true })
mkdirSync(outdir, { recursive: true })

const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: [join(here, 'main.js')],
  outfile: join(outdir, 'app.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: ['es2022'],
  minify: true,
  legalComments: 'none', // full licence texts go to THIRD_PARTY_LICENSES.txt instead
  nodePaths: [nodeModules],
  metafile: true,
  logLevel: 'warning',
})

copyFileSync(join(here, 'index.html'), join(outdir, 'index.html'))

// Licence notices for every npm package that ended up in the bundle.
const packages = new Map()
for (const input of Object.keys(result.metafile.inputs)) {
  const parts = resolve(root, input).split(sep)
  const at = parts.lastIndexOf('node_modules')
  if (at < 0) continue
  const nameParts = parts[at + 1].startsWith('@') ? parts.slice(at + 1, at + 3) : parts.slice(at + 1, at + 2)
  const pkgDir = parts.slice(0, at + 1 + nameParts.length).join(sep)
  packages.set(nameParts.join('/'), pkgDir)
}
const notices = []
for (const [name, dir] of [...packages].sort()) {
  const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'))
  const licenceFile = readdirSync(dir).find((f) => /^(licen[cs]e|copying)(\.|$)/i.test(f))
  const text = licenceFile ? readFileSync(join(dir, licenceFile), 'utf8').trim() : `License: ${pkg.license}`
  notices.push(`${name} ${pkg.version} (${pkg.license})\n${'-'.repeat(60)}\n${text}\n`)
}
writeFileSync(
  join(outdir, 'THIRD_PARTY_LICENSES.txt'),
  `app.js bundles the following npm packages.\n\n${notices.join('\n\n')}`,
)

const size = result.metafile.outputs[relative(root, join(outdir, 'app.js')).split(sep).join('/')]?.bytes
console.log(
  `demo built in ${relative(process.cwd(), outdir) || '.'}: index.html, app.js${size ? ` (${Math.round(size / 1024)} KiB)` : ''}, ` +
    `THIRD_PARTY_LICENSES.txt [${[...packages.keys()].sort().join(', ')}]`,
)
