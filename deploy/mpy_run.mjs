// Run a Python file under real MicroPython (the WebAssembly port, run by node).
//
//   node deploy/mpy_run.mjs [--module [DEST=]PATH ...] SCRIPT.py
//
// --module copies PATH onto MicroPython's filesystem under /lib (on sys.path), as /lib/DEST
// when DEST is given (e.g. --module umqtt/simple.py=firmware/lib/umqtt/simple.py), else as
// /lib/<basename of PATH>, so the script can `import` it. SCRIPT may be "-" for stdin.
// The heap grows on demand (the port's split heap), so this does not show whether code fits
// in an ESP8266's ~40 KiB: check that with gc.mem_alloc() in the script if it matters.
//
// MicroPython's stdout and stderr are passed through. Exit status: 0, or the code given to
// sys.exit(), or 1 after any other Python exception (its traceback is printed on stderr),
// or 2 for a usage error. The npm package is resolved from .cache/node (made by
// `deploy/test-servers.sh install`), or from MPY_NODE_PREFIX when that is set.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const PACKAGE = "@micropython/micropython-webassembly-pyscript";
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const NODE_PREFIX = process.env.MPY_NODE_PREFIX || join(ROOT, ".cache", "node");
const MODULE_DIR = "/lib";
const EXIT_EXCEPTION = 1;
const EXIT_USAGE = 2;

function fail(message) {
  process.stderr.write(`mpy_run: ${message}\n`);
  process.exit(EXIT_USAGE);
}

function usage(message) {
  process.stderr.write("usage: node deploy/mpy_run.mjs [--module [DEST=]PATH ...] SCRIPT.py\n");
  fail(message);
}

function parseArgs(argv) {
  const modules = [];
  let script;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--module") {
      const value = argv[++i];
      if (value === undefined) usage("--module needs a value");
      const eq = value.indexOf("=");
      const path = eq < 0 ? value : value.slice(eq + 1);
      const dest = eq < 0 ? path.split("/").pop() : value.slice(0, eq);
      modules.push({ dest, path });
    } else if (arg.startsWith("--")) {
      usage(`unknown option ${arg}`);
    } else if (script === undefined) {
      script = arg;
    } else {
      usage(`unexpected argument ${arg}`);
    }
  }
  if (script === undefined) usage("no script given");
  return { modules, script };
}

function readSource(path) {
  try {
    return readFileSync(path === "-" ? 0 : path, "utf8");
  } catch (err) {
    fail(`cannot read ${path}: ${err.message}`);
  }
}

async function loadPackage() {
  let entry;
  try {
    entry = createRequire(join(NODE_PREFIX, "package.json")).resolve(PACKAGE);
  } catch {
    fail(`${PACKAGE} not found under ${NODE_PREFIX}: run \`deploy/test-servers.sh install\``);
  }
  return import(pathToFileURL(entry).href);
}

// Bytes are collected and written per line, so output without a final newline is not lost
// (the package's own line buffering drops an unterminated last line).
function byteSink(stream) {
  let pending = [];
  const flush = () => {
    if (pending.length) stream.write(Buffer.from(pending));
    pending = [];
  };
  const write = (bytes) => {
    for (const b of bytes) {
      pending.push(b);
      if (b === 10 || pending.length >= 4096) flush();
    }
  };
  return { write, flush };
}

function mkdirs(FS, dir) {
  let path = "";
  for (const part of dir.split("/").filter(Boolean)) {
    path += `/${part}`;
    try {
      FS.mkdir(path);
    } catch {
      // already there
    }
  }
}

// MicroPython reports sys.exit(n) as a SystemExit exception; its traceback ends "SystemExit: n".
function exitCodeOf(error) {
  if (error.type !== "SystemExit") return null;
  const match = /SystemExit(?::\s*(.*))?\s*$/.exec(error.message.trimEnd());
  const arg = match && match[1] !== undefined ? match[1].trim() : "";
  if (arg === "" || arg === "None") return 0;
  if (/^-?\d+$/.test(arg)) return Number(arg) & 0xff;
  process.stderr.write(`${arg}\n`);
  return EXIT_EXCEPTION;
}

async function main() {
  const { modules, script } = parseArgs(process.argv.slice(2));
  const source = readSource(script);
  const { loadMicroPython } = await loadPackage();
  const stdout = byteSink(process.stdout);
  const stderr = byteSink(process.stderr);
  const mp = await loadMicroPython({
    linebuffer: false,
    stdout: stdout.write,
    stderr: stderr.write,
  });
  for (const { dest, path } of modules) {
    const target = `${MODULE_DIR}/${dest}`;
    mkdirs(mp.FS, dirname(target));
    mp.FS.writeFile(target, readSource(path));
  }
  let code = 0;
  try {
    mp.runPython(source);
  } catch (error) {
    if (error.name !== "PythonError") throw error;
    code = exitCodeOf(error);
    if (code === null) {
      stdout.flush();
      stderr.write(Buffer.from(error.message));
      code = EXIT_EXCEPTION;
    }
  } finally {
    stdout.flush();
    stderr.flush();
  }
  process.exitCode = code;
}

await main();
