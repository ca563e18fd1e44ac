// The npm packages, for the scripts in this folder: loaded from --node-modules DIR, else from the
// first $NODE_PATH entry that holds @woven-ecs/canvas-store, else from node/node_modules of this
// repository.
import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { delimiter, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** `require`, resolving packages as a file inside that folder would. */
export function requireFromNodeModules(option) {
  const here = dirname(fileURLToPath(import.meta.url))
  const candidates = [
    option,
    ...(process.env.NODE_PATH ?? '').split(delimiter),
    join(here, '..', '..', 'node', 'node_modules'),
  ]
  for (const dir of candidates) {
    if (dir && existsSync(join(dir, '@woven-ecs', 'canvas-store', 'package.json'))) {
      return createRequire(join(dir, 'resolve-from-here.js'))
    }
  }
  throw new Error(`@woven-ecs/canvas-store not found in any of ${JSON.stringify(candidates)}`)
}
