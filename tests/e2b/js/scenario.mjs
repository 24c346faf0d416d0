// The unchanged JavaScript SDK (npm `e2b`) against agent-vm's gateway.
// Environment from `agent-vm e2b env`; prints one JSON object of observations.
import { Sandbox, CommandExitError } from 'e2b'

const out = {}
const sbx = await Sandbox.create({ metadata: { lang: 'js' }, envs: { FOO: 'bar' }, timeoutMs: 120_000 })
try {
  out.stdout = (await sbx.commands.run('echo hello $FOO')).stdout
  try {
    await sbx.commands.run('exit 4')
  } catch (err) {
    out.exit = err instanceof CommandExitError ? err.exitCode : String(err)
  }
  await sbx.files.write('notes/a.txt', 'from js')
  out.read = await sbx.files.read('notes/a.txt')
  out.list = (await sbx.files.list('notes')).map((e) => e.name)
  const bg = await sbx.commands.run('sleep 60', { background: true })
  out.listed = (await sbx.commands.list()).some((p) => p.pid === bg.pid)
  out.killed = await sbx.commands.kill(bg.pid)
  out.sandboxes = (await Sandbox.list({ query: { metadata: { lang: 'js' } } }).nextItems()).map(
    (s) => s.sandboxId,
  )
  out.id = sbx.sandboxId
} finally {
  await sbx.kill()
}
out.running = await sbx.isRunning()
console.log(JSON.stringify(out))
