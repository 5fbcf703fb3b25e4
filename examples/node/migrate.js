#!/usr/bin/env node
// A REINIT-aware precopy migration of one VFIO device to another, QEMU 11.1
// style, over the vfio.v1 gRPC API, written from the proto files alone:
// proto/vfio/v1/vfio.proto, proto/fwemu/api/v1/scenario.proto (digests) and
// google/rpc/{status,error_details}.proto (errors).  README.md beside this file.
//
//   node examples/node/migrate.js [--driver HOST:PORT] [--scenario HOST:PORT] [--json] SRC DST
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// grpc-js names an IP target as the TLS server name, which Node warns about
// (DEP0123, RFC 6066); the certificate is still checked against that IP, as
// the Python client checks it.  Every other warning is printed as usual.
process.removeAllListeners('warning');
process.on('warning', (w) => {
  if (w.code !== 'DEP0123') process.stderr.write(`${w.name}: ${w.message}\n`);
});

const ROOT = path.resolve(__dirname, '..', '..');
const INCLUDE = [path.join(ROOT, 'proto'), path.join(ROOT, 'third_party', 'googleapis')];
const MiB = 1 << 20;
const BUFFER_CAP = MiB; // QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE

const USAGE = `usage: node migrate.js [options] SOURCE DESTINATION

Migrate the VFIO device SOURCE to DESTINATION (PCI names, e.g. 0000:81:00.1) the
way QEMU 11.1 does: precopy with the switchover-ack re-armed on every
VFIO_PRECOPY_INFO_REINIT, stop-copy, then compare the firmware digests.

options:
  --driver HOST:PORT     the vfio-driver service (default $VFIO_DRIVER, else 127.0.0.1:50052)
  --scenario HOST:PORT   the firmware's Scenario service, for digests (default
                         $VFIO_SCENARIO, else the driver's address)
  --json                 print one JSON document on stdout at the end
  --no-verify            do not compare digests (no Scenario service)
  --max-dirty BYTES      switch over once dirty_bytes is at most this (default 1048576)
  --max-rounds N         precopy rounds before switching over whatever dirty_bytes is
                         (default 100); no switchover-ack after 2N rounds fails
  --interval-ms MS       pause between precopy rounds (default 20)
  --call-timeout S       deadline of each unary call in seconds (default 60)
  -h, --help             this text

TLS: VFIO_TLS_CA (the server's CA), VFIO_TLS_CERT and VFIO_TLS_KEY (a client
certificate, for mutual TLS); none of them: plaintext.
Exit status: 0 migrated and digests equal, 1 failed or refused, 2 usage.`;

class UsageError extends Error {}

function parseArgs(argv) {
  const o = {
    driver: process.env.VFIO_DRIVER || '127.0.0.1:50052',
    scenario: process.env.VFIO_SCENARIO || '',
    json: false,
    verify: true,
    maxDirty: MiB,
    maxRounds: 100,
    intervalMs: 20,
    callTimeoutS: 60,
  };
  const positional = [];
  const number = (name, value, min) => {
    const n = Number(value);
    if (value === undefined || !Number.isFinite(n) || n < min) {
      throw new UsageError(`${name} needs a number of at least ${min}`);
    }
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? a.split(/=(.*)/s) : [a, undefined];
    const value = () => (inline !== undefined ? inline : argv[++i]);
    switch (flag) {
      case '-h':
      case '--help':
        o.help = true;
        break;
      case '--driver':
        o.driver = value();
        break;
      case '--scenario':
        o.scenario = value();
        break;
      case '--json':
        o.json = true;
        break;
      case '--no-verify':
        o.verify = false;
        break;
      case '--max-dirty':
        o.maxDirty = number(flag, value(), 0);
        break;
      case '--max-rounds':
        o.maxRounds = Math.floor(number(flag, value(), 1));
        break;
      case '--interval-ms':
        o.intervalMs = number(flag, value(), 0);
        break;
      case '--call-timeout':
        o.callTimeoutS = number(flag, value(), 0.001);
        break;
      default:
        if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown option ${a}`);
        positional.push(a);
    }
  }
  if (o.help) return o;
  if (!o.driver) throw new UsageError('--driver needs HOST:PORT');
  if (positional.length !== 2) throw new UsageError('SOURCE and DESTINATION are required');
  [o.source, o.destination] = positional;
  if (o.source === o.destination) {
    throw new UsageError('SOURCE and DESTINATION are the same device');
  }
  o.scenario = o.scenario || o.driver;
  return o;
}

// --- the API, from the proto files ---------------------------------------------------

const LOAD = {
  keepCase: true, // field names as in the proto: data_fd, initial_bytes
  longs: Number, // byte counts (uint64) as numbers: exact below 2^53
  enums: Number,
  defaults: true,
  oneofs: true,
  includeDirs: INCLUDE,
};
const defs = protoLoader.loadSync(['vfio/v1/vfio.proto', 'fwemu/api/v1/scenario.proto'], LOAD);
const api = grpc.loadPackageDefinition(defs);

// An enum of the proto by value name without its prefix (S.PRE_COPY is 6), and name(n).
function enumOf(name, prefix) {
  const values = {};
  const names = {};
  for (const v of defs[`vfio.v1.${name}`].type.value) {
    const short = v.name.startsWith(prefix) ? v.name.slice(prefix.length) : v.name;
    values[short] = v.number;
    names[v.number] = short;
  }
  return { ...values, name: (n) => names[n] ?? String(n) };
}
const S = enumOf('DeviceMigState', 'DEVICE_MIG_STATE_');
const PRECOPY_INFO_FLAG_REINIT = enumOf('PrecopyInfoFlag', 'PRECOPY_INFO_FLAG_').REINIT;
const PRECOPY_INFO_ARGSZ = 24; // struct vfio_precopy_info

// google.rpc.Status and ErrorInfo: no RPC returns them, so they are decoded
// with the protobuf runtime proto-loader itself runs on.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => {
  for (const dir of INCLUDE) {
    const p = path.join(dir, target);
    if (fs.existsSync(p)) return p;
  }
  return target;
};
rpcRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
const ErrorInfo = rpcRoot.lookupType('google.rpc.ErrorInfo');

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

// A failed call: the kernel errno from the grpc-status-details-bin trailer.
class RpcError extends Error {
  constructor(what, err) {
    const e = { errnoName: '', errno: null, reason: '', domain: '', metadata: {} };
    e.detail = err.details || err.message;
    const bins = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
    if (bins.length) {
      try {
        const st = RpcStatus.decode(bins[0]);
        e.detail = st.message || e.detail;
        for (const any of st.details) {
          if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
            const info = ErrorInfo.decode(any.value);
            e.reason = info.reason;
            e.domain = info.domain;
            e.metadata = { ...info.metadata };
          }
        }
      } catch (decodeError) {
        e.detail += ` (undecodable status details: ${decodeError.message})`;
      }
    }
    if (e.domain === 'vfio.kernel' || e.metadata.errno !== undefined) {
      e.errnoName = e.reason;
      e.errno = e.metadata.errno !== undefined ? Number(e.metadata.errno) : null;
    }
    const code = STATUS_NAMES[err.code] ?? String(err.code);
    const why = e.errnoName ? `${e.errnoName} (errno ${e.errno})` : e.reason || code;
    super(`${what}: ${why}: ${e.detail}`);
    Object.assign(this, e, { code, grpcCode: err.code, what });
  }
}

class MigrationError extends Error {}

// --- the client ----------------------------------------------------------------------

function credentials() {
  const { VFIO_TLS_CA: ca, VFIO_TLS_CERT: cert, VFIO_TLS_KEY: key } = process.env;
  if (!ca && !cert && !key) return grpc.credentials.createInsecure();
  if (!cert !== !key) throw new UsageError('VFIO_TLS_CERT and VFIO_TLS_KEY go together');
  const read = (file, what) => {
    try {
      return fs.readFileSync(file);
    } catch (e) {
      throw new UsageError(`cannot read the TLS ${what} ${file}: ${e.message}`);
    }
  };
  return grpc.credentials.createSsl(
    ca ? read(ca, 'CA') : null,
    key ? read(key, 'key') : null,
    cert ? read(cert, 'certificate') : null,
  );
}

class Client {
  constructor(opts) {
    this.opts = opts;
    this.id = `node-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
    const creds = credentials();
    this.vfio = new api.vfio.v1.Vfio(opts.driver, creds);
    this.scenario = opts.verify ? new api.fwemu.api.v1.Scenario(opts.scenario, creds) : null;
    this.open = new Set(); // every fd we opened and have not closed
    this.streams = new Set(); // stream calls in flight (cancelled on a signal)
    this.session = null;
  }

  md() {
    const m = new grpc.Metadata();
    m.set('x-vfio-client', this.id);
    return m;
  }

  call(stub, method, request) {
    const deadline = Date.now() + this.opts.callTimeoutS * 1000;
    return new Promise((resolve, reject) => {
      stub[method](request, this.md(), { deadline }, (err, response) =>
        err ? reject(new RpcError(method, err)) : resolve(response),
      );
    });
  }

  vcall(method, request) {
    return this.call(this.vfio, method, request);
  }

  // The client's lifetime: while this stream is open the driver keeps our
  // fds; if the process dies, they close as a process's do at exit.
  startSession() {
    return new Promise((resolve, reject) => {
      const s = this.vfio.Session({}, this.md());
      this.session = s;
      let first = true;
      s.on('data', (ev) => {
        if (first) {
          first = false;
          resolve(ev.client);
        }
      });
      s.on('error', (err) => {
        if (first) {
          first = false;
          reject(new RpcError('Session', err));
        }
      });
      s.on('end', () => {});
    });
  }

  async openDevice(name) {
    const { fd } = await this.vcall('OpenDevice', { name });
    this.open.add(fd);
    return fd;
  }

  async closeFd(fd) {
    if (fd === null || fd === undefined || !this.open.has(fd)) return;
    this.open.delete(fd);
    try {
      await this.vcall('CloseFd', { fd });
    } catch (e) {
      if (e.errnoName !== 'EBADF') throw e; // already closed by the driver's side
    }
  }

  feature(fd, op, feature, value = {}) {
    return this.vcall('DeviceFeature', { fd, typed: { [op]: true, [feature]: value } });
  }

  async migrationFlags(fd) {
    const r = await this.feature(fd, 'get', 'migration');
    return r.typed.migration;
  }

  async getState(fd) {
    const r = await this.feature(fd, 'get', 'mig_device_state');
    return r.typed.mig_device_state.device_state;
  }

  // MIG_DEVICE_STATE SET: the data fd it opened, else null.
  async setState(fd, state) {
    const r = await this.feature(fd, 'set', 'mig_device_state', { device_state: state });
    const dataFd = r.typed.mig_device_state.data_fd;
    if (dataFd >= 0) {
      this.open.add(dataFd);
      return dataFd;
    }
    return null;
  }

  async reset(fd) {
    await this.vcall('DeviceReset', { fd });
  }

  async precopyInfo(fd) {
    return this.vcall('PrecopyInfo', { fd, argsz: PRECOPY_INFO_ARGSZ, flags: 0 });
  }

  // ReadStream from `src` into one Write call on `dst`, until the read
  // stream ends: OK at the end of the data (null), or with ENOMSG in
  // PRE_COPY once what is there was read ('ENOMSG').  The Write call is
  // ended and answered before this returns, so everything read is written.
  async transfer(src, dst, chunkSize, { precopy }) {
    let bytes = 0;
    let writer = null;
    let writeError = null;
    let writeFailed;
    const failed = new Promise((resolve) => {
      writeFailed = resolve;
    });
    const request = { fd: src, chunk_size: chunkSize, nonblock: false, limit: 0 };
    const reader = this.vfio.ReadStream(request, this.md());
    this.streams.add(reader);
    const openWriter = () => {
      const w = { done: null, call: null };
      w.done = new Promise((resolve, reject) => {
        w.call = this.vfio.Write(this.md(), (err, res) => {
          this.streams.delete(w.call);
          if (err) {
            writeError = new RpcError('Write', err);
            reader.cancel(); // nothing more can be written: stop reading
            reader.resume();
            writeFailed();
            reject(writeError);
          } else resolve(res);
        });
      });
      w.done.catch(() => {}); // awaited below
      this.streams.add(w.call);
      return w;
    };
    // Both the end of the data (every message delivered, 'end') and the
    // status ('status': it may come while messages are still buffered).
    const ended = new Promise((resolve) => reader.on('end', resolve));
    const status = new Promise((resolve) => reader.on('status', resolve));
    reader.on('error', () => {}); // the status says it
    reader.on('data', (msg) => {
      if (!msg.data.length || writeError) return;
      if (writer === null) writer = openWriter();
      bytes += msg.data.length;
      if (!writer.call.write({ fd: dst, data: msg.data })) {
        reader.pause();
        writer.call.once('drain', () => reader.resume());
      }
    });
    const st = await status;
    await Promise.race([ended, failed]);
    this.streams.delete(reader);
    if (writer !== null) {
      writer.call.end();
      const res = await writer.done; // throws the write's errno
      if (Number(res.written) !== bytes) {
        throw new MigrationError(`Write took ${res.written} of ${bytes} bytes`);
      }
    }
    if (writeError) throw writeError;
    if (st.code === grpc.status.OK) return { bytes, errno: null };
    const err = new RpcError('ReadStream', st);
    if (precopy && err.errnoName === 'ENOMSG') return { bytes, errno: 'ENOMSG' };
    throw err;
  }

  async digest(vhcaId) {
    const r = await this.call(this.scenario, 'GetDigest', { vhca_id: vhcaId });
    return r.digest;
  }

  cancelStreams() {
    for (const s of this.streams) s.cancel();
  }

  close() {
    if (this.session) this.session.cancel();
    this.session = null;
    grpc.closeClient(this.vfio);
    if (this.scenario) grpc.closeClient(this.scenario);
  }
}

// --- the migration ---------------------------------------------------------------------

class Migration {
  constructor(client, opts, log) {
    this.c = client;
    this.o = opts;
    this.log = log;
    this.interrupted = false;
    this.wakeup = null; // ends the pause between rounds early (a signal)
    this.src = { name: opts.source, side: 'source', fd: null, dataFd: null, vhca: null };
    this.dst = { name: opts.destination, side: 'destination', fd: null, dataFd: null, vhca: null };
    this.touched = false; // a state change was asked for
    this.report = {
      result: 'failed',
      source: opts.source,
      destination: opts.destination,
      client: client.id,
      migration_flags: null,
      precopy_info_v2: false,
      rounds: 0,
      reinits: 0,
      late_reinits: 0,
      acks: 0,
      precopy_bytes: 0,
      stop_copy_bytes: 0,
      source_digest: '',
      destination_digest: '',
      digests_equal: false,
      errno: null,
      errno_name: '',
      error: '',
      elapsed_s: 0,
    };
  }

  check() {
    if (this.interrupted) throw new MigrationError('interrupted');
  }

  interrupt() {
    this.interrupted = true;
    this.c.cancelStreams();
    if (this.wakeup) this.wakeup();
  }

  async pause(ms) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wakeup = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wakeup = null;
  }

  // QEMU's vfio_migration_set_state: `state`, else `recovery`, else (none,
  // or it failed too) close this side's data fd and reset the device.
  async setState(dev, state, recovery) {
    this.check();
    this.touched = true;
    try {
      const fd = await this.c.setState(dev.fd, state);
      this.log(`${dev.side}: -> ${S.name(state)}${fd !== null ? ` (data fd ${fd})` : ''}`);
      return fd;
    } catch (e) {
      let why = `${dev.side}: -> ${S.name(state)} failed: ${e.message}`;
      if (recovery !== null) {
        try {
          await this.c.setState(dev.fd, recovery);
          throw Object.assign(new MigrationError(`${why}; recovered to ${S.name(recovery)}`), { cause: e });
        } catch (e2) {
          if (e2 instanceof MigrationError) throw e2;
          why += `; recovery ${S.name(recovery)} failed: ${e2.message}`;
        }
      }
      await this.closeDataFd(dev); // no transfer cut under a holder
      await this.c.reset(dev.fd);
      throw Object.assign(new MigrationError(`${why}; device reset`), { cause: e });
    }
  }

  async closeDataFd(dev) {
    const fd = dev.dataFd;
    dev.dataFd = null;
    await this.c.closeFd(fd);
  }

  async run() {
    const t0 = Date.now();
    try {
      await this.migrate();
      this.report.result = 'completed';
    } catch (e) {
      this.fail(e);
      if (this.touched) await this.abort();
    } finally {
      this.report.elapsed_s = (Date.now() - t0) / 1000;
    }
    return this.report;
  }

  fail(e) {
    const r = this.report;
    const rpc = e instanceof RpcError ? e : e.cause instanceof RpcError ? e.cause : null;
    r.error = e.message;
    if (rpc) {
      r.errno = rpc.errno;
      r.errno_name = rpc.errnoName || rpc.code;
    }
  }

  async migrate() {
    const { c } = this;
    const devices = new Map((await c.vcall('ListDevices', {})).devices.map((d) => [d.name, d]));
    this.src.fd = await c.openDevice(this.src.name);
    this.dst.fd = await c.openDevice(this.dst.name);
    for (const dev of [this.src, this.dst]) dev.vhca = devices.get(dev.name)?.vhca_id ?? null;

    // Discovery (QEMU vfio_migration_init): no STOP_COPY, no migration.
    let flags;
    let dstFlags;
    try {
      flags = await c.migrationFlags(this.src.fd);
      dstFlags = await c.migrationFlags(this.dst.fd);
    } catch (e) {
      this.report.result = 'refused';
      throw Object.assign(new MigrationError(`not migratable (GET MIGRATION: ${e.message})`), { cause: e });
    }
    this.report.migration_flags = flags.flags;
    if (!flags.stop_copy || !dstFlags.stop_copy) {
      this.report.result = 'refused';
      throw new MigrationError('not migratable: no VFIO_MIGRATION_STOP_COPY');
    }
    this.log(
      `source migration flags ${flags.flags} ` +
        `(stop_copy ${flags.stop_copy}, p2p ${flags.p2p}, pre_copy ${flags.pre_copy})`,
    );
    if (this.o.verify) {
      if (this.src.vhca === null || this.dst.vhca === null) {
        this.report.result = 'refused';
        throw new MigrationError('cannot verify: ListDevices does not list both devices');
      }
      try {
        await c.digest(this.src.vhca);
        await c.digest(this.dst.vhca);
      } catch (e) {
        this.report.result = 'refused';
        const why = `cannot verify: no Scenario service at ${this.o.scenario}? (${e.message})`;
        throw Object.assign(new MigrationError(`${why}; --no-verify skips it`), { cause: e });
      }
    }
    let v2 = false;
    if (flags.pre_copy) {
      try {
        await c.feature(this.src.fd, 'set', 'mig_precopy_info_v2');
        v2 = true;
      } catch (e) {
        this.log(`MIG_PRECOPY_INFOv2 opt-in failed (${e.message}): precopy info v1, no REINIT`);
      }
    }
    this.report.precopy_info_v2 = v2;
    const size = (await c.feature(this.src.fd, 'get', 'mig_data_size')).typed.mig_data_size.stop_copy_length;
    const chunk = Math.max(1, Math.min(BUFFER_CAP, size));
    const running = (await c.getState(this.src.fd)) === S.RUNNING;

    // Setup: the destination RESUMING, the source PRE_COPY (or, without
    // precopy, nothing until the switchover).
    this.dst.dataFd = await this.setState(this.dst, S.RESUMING, null);
    if (this.dst.dataFd === null) throw new MigrationError('RESUMING gave no data fd');
    const precopy = flags.pre_copy && running;
    if (precopy) {
      this.src.dataFd = await this.setState(this.src, S.PRE_COPY, S.RUNNING);
      if (this.src.dataFd === null) throw new MigrationError('PRE_COPY gave no data fd');
      await this.precopy(v2, chunk);
    }

    // Switchover: the VM stops (P2P first, as QEMU quiesces every device),
    // then STOP_COPY; PRE_COPY(_P2P) -> STOP_COPY keeps the saving fd.
    if (flags.p2p) await this.setState(this.src, precopy ? S.PRE_COPY_P2P : S.RUNNING_P2P, S.RUNNING);
    if (!precopy) await this.setState(this.src, S.STOP, S.RUNNING);
    const fd = await this.setState(this.src, S.STOP_COPY, S.STOP);
    if (fd !== null) this.src.dataFd = fd;
    if (this.src.dataFd === null) throw new MigrationError('STOP_COPY has no data fd');
    this.check();
    const { bytes } = await c.transfer(this.src.dataFd, this.dst.dataFd, chunk, { precopy: false });
    this.report.stop_copy_bytes = bytes;
    this.log(`stop-copy: ${bytes} bytes`);
    // load_cleanup closes the resuming fd; RESUMING -> STOP loads the image.
    await this.closeDataFd(this.dst);
    await this.setState(this.dst, S.STOP, null);
    if (this.o.verify) await this.verify();
    if (flags.p2p) await this.setState(this.dst, S.RUNNING_P2P, null);
    await this.setState(this.dst, S.RUNNING, null);
    // save_cleanup, outside the downtime.
    await this.setState(this.src, S.STOP, null);
    await this.closeDataFd(this.src);
  }

  // The precopy rounds, each: read what is there and write it to the
  // destination (save_live_iterate), then PRECOPY_INFO (the readiness check).
  async precopy(v2, chunk) {
    const { c, report } = this;
    let ackPending = true; // the switchover-ack, requested at setup
    let initialDataSent = false;
    let initial = 0;
    let dirty = 0;
    const rearm = (info, when) => {
      report.reinits += 1;
      initial = info.initial_bytes;
      dirty = 0;
      initialDataSent = false;
      ackPending = true;
      this.log(`REINIT (${when}): initial_bytes ${info.initial_bytes}; switchover-ack re-armed`);
    };
    const take = (info, when) => {
      if (v2 && info.flags & PRECOPY_INFO_FLAG_REINIT) {
        rearm(info, when);
        return true;
      }
      initial = info.initial_bytes;
      dirty = info.dirty_bytes;
      return false;
    };
    take(await c.precopyInfo(this.src.dataFd), 'first PRECOPY_INFO');
    for (let round = 1; ; round++) {
      this.check();
      report.rounds = round;
      const ackedBefore = !ackPending; // an ack given this round counts from the next
      const { bytes, errno } = await c.transfer(this.src.dataFd, this.dst.dataFd, chunk, { precopy: true });
      report.precopy_bytes += bytes;
      const fromInitial = Math.min(bytes, initial);
      initial -= fromInitial;
      dirty = Math.max(0, dirty - (bytes - fromInitial));
      if (errno === 'ENOMSG') initial = dirty = 0; // empty for now
      if (initial === 0 && !initialDataSent) {
        // INIT_DATA_SENT; the destination has written all of it (the Write
        // call was answered), so it approves at once.
        initialDataSent = true;
        ackPending = false;
        report.acks += 1;
      }
      if (!take(await c.precopyInfo(this.src.dataFd), `round ${round}`)) {
        const converged = dirty <= this.o.maxDirty || round >= this.o.maxRounds;
        if (ackedBefore && !ackPending && initial === 0 && converged) {
          // The switchover decision; then one last PRECOPY_INFO (QEMU 11.1's
          // final save_query_pending): a REINIT there must not be missed.
          const last = await c.precopyInfo(this.src.dataFd);
          if (take(last, 'after the switchover decision')) {
            report.late_reinits += 1;
          } else if (last.initial_bytes === 0) {
            this.log(`switchover after ${round} rounds (dirty ${last.dirty_bytes} bytes)`);
            return;
          }
        }
      }
      if (round >= 2 * this.o.maxRounds) {
        throw new MigrationError(`no switchover-ack after ${round} precopy rounds`);
      }
      await this.pause(this.o.intervalMs);
    }
  }

  async verify() {
    const r = this.report;
    r.source_digest = await this.c.digest(this.src.vhca);
    r.destination_digest = await this.c.digest(this.dst.vhca);
    r.digests_equal = Boolean(r.source_digest) && r.source_digest === r.destination_digest;
    if (!r.digests_equal) {
      throw new MigrationError(
        `verification failed: destination digest ${r.destination_digest || '(none)'} ` +
          `!= source digest ${r.source_digest || '(none)'}`,
      );
    }
  }

  // A failed migration: data fds closed, the source back to RUNNING (reset
  // if it cannot go), the destination reset (which aborts RESUMING).
  async abort() {
    const { c } = this;
    c.cancelStreams();
    for (const dev of [this.src, this.dst]) {
      try {
        await this.closeDataFd(dev);
      } catch (e) {
        this.log(`abort: closing the ${dev.side}'s data fd: ${e.message}`);
      }
    }
    const state = async (dev) => {
      try {
        return await c.getState(dev.fd);
      } catch {
        return S.ERROR;
      }
    };
    if (this.src.fd !== null && (await state(this.src)) !== S.RUNNING) {
      try {
        await c.setState(this.src.fd, S.RUNNING);
        this.log('abort: source -> RUNNING');
      } catch (e) {
        this.log(`abort: source -> RUNNING failed (${e.message}): reset`);
        await c.reset(this.src.fd).catch((e2) => this.log(`abort: source reset failed: ${e2.message}`));
      }
    }
    if (this.dst.fd !== null && (await state(this.dst)) !== S.RUNNING) {
      await c
        .reset(this.dst.fd)
        .then(() => this.log('abort: destination reset'))
        .catch((e) => this.log(`abort: destination reset failed: ${e.message}`));
    }
  }
}

// --- main --------------------------------------------------------------------------------

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`migrate.js: ${e.message}\n${USAGE}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const log = (line) => process.stderr.write(`migrate.js: ${line}\n`);
  let client;
  try {
    client = new Client(opts);
  } catch (e) {
    process.stderr.write(`migrate.js: ${e.message}\n`);
    return 2;
  }
  const m = new Migration(client, opts, log);
  let signals = 0;
  const onSignal = (sig) => {
    signals += 1;
    if (signals > 1) process.exit(130); // the Session's end closes our fds
    log(`${sig}: aborting`);
    m.interrupt();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  let report;
  try {
    await client.startSession();
    report = await m.run();
  } catch (e) {
    m.fail(e); // no Session: nothing was opened
    report = m.report;
  } finally {
    // Close every fd we opened, whatever happened, then the client.
    for (const fd of [...client.open].sort((a, b) => b - a)) {
      try {
        await client.closeFd(fd);
      } catch (e) {
        log(`CloseFd(${fd}): ${e.message}`);
      }
    }
    client.close();
  }
  const ok = report.result === 'completed';
  const digests =
    `  source digest      ${report.source_digest}\n` +
    `  destination digest ${report.destination_digest}\n`;
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } else if (ok) {
    process.stdout.write(
      `migrated ${report.source} -> ${report.destination}: ${report.precopy_bytes} bytes in precopy ` +
        `(${report.rounds} rounds), ${report.stop_copy_bytes} in stop-copy, ${report.reinits} REINIT\n` +
        (opts.verify ? digests : '  digests not compared (--no-verify)\n'),
    );
  } else {
    let errno = '';
    if (report.errno_name) {
      errno = ` [${report.errno_name}${report.errno !== null ? ` ${report.errno}` : ''}]`;
    }
    process.stderr.write(`migrate.js: ${report.result}${errno}: ${report.error}\n`);
    if (report.source_digest || report.destination_digest) process.stderr.write(digests);
  }
  return ok ? 0 : 1;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.stderr.write(`migrate.js: ${e.stack || e}\n`);
    process.exitCode = 1;
  },
);
