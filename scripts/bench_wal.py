#!/usr/bin/env python3
"""WAL archiving benchmark: pgpitr-archive / pgpitr-restore vs pgBackRest archive-push / archive-get
on real 16 MiB WAL segments from an OLTP run (pgbench after a checkpoint, so with full-page images),
all in one run on this machine. Prints a Markdown report. Run through scripts/bench."""
import glob, os, shutil, statistics, subprocess, sys, tempfile, time

PG = "/usr/lib/postgresql/15/bin"
TARGET = sys.argv[1]          # directory with pgpitr, pgpitr-archive, pgpitr-restore (release)
SEGMENTS = int(os.environ.get("BENCH_SEGMENTS", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def as_pg(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def timed(cmd, env=None, cwd=None):
    """Wall seconds and peak RSS (KiB) of one command. RSS comes from GNU time's %M: a forked
    child inherits its parent's RSS high-water mark until exec, so rusage read from this Python
    process would report at least Python's own size."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd, env=env, cwd=cwd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{cmd} failed: {p.stderr.decode()}")
        return dt, int(rss.read().split()[-1])


def settle():
    """Flushes dirty pages (the fake pg_wal copies, earlier outputs) so that their writeback does
    not land in the next measured series, whichever tool it measures."""
    run(["sync"])
    time.sleep(1)


def recovery_call(pgdata, cmd, env):
    """One restore_command call as the startup process makes it: PostgreSQL removes the previous
    pg_wal/RECOVERYXLOG before every call (RestoreArchivedFile in xlogarchive.c), so the call
    never renames over a file (which ext4 answers by flushing the new one)."""
    try:
        os.unlink(f"{pgdata}/pg_wal/RECOVERYXLOG")
    except FileNotFoundError:
        pass
    return timed(cmd, env, pgdata)


def restore_checked(pgdata, cmd, env, wal, name):
    """recovery_call, then a check that pg_wal/RECOVERYXLOG holds the segment byte for byte
    (outside the timing)."""
    result = recovery_call(pgdata, cmd, env)
    with open(f"{pgdata}/pg_wal/RECOVERYXLOG", "rb") as got, open(f"{wal}/{name}", "rb") as want:
        assert got.read() == want.read(), f"{cmd[0]} restored {name} wrong"
    return result


def archiver_call(pgdata, name, cmd, env):
    """One archive_command call as the archiver makes it: after a success, PostgreSQL renames
    pg_wal/archive_status/<name>.ready to .done (pgarch_archiveDone in pgarch.c), so the next
    call no longer sees that segment waiting."""
    result = timed(cmd, env, pgdata)
    status = f"{pgdata}/pg_wal/archive_status/{name}"
    os.rename(f"{status}.ready", f"{status}.done")
    return result


def warm_memory():
    """Touches most of the machine's free memory once. On a virtual machine, a guest page used
    for the first time since boot is backed by the host on that first touch, which costs far
    more than the copy itself: a fresh VM then charges every tool tens of milliseconds of
    system time per 16 MiB written into new page-cache pages (a long-running server has long
    touched its memory). Measured here: 50-80 ms per pgpitr-restore call before, 15-25 ms after."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    size = max(0, min(info["MemAvailable"] - (2 << 30), 16 << 30))
    buf = bytearray(size)
    for i in range(0, size, 4096):
        buf[i] = 1
    del buf


def make_wal(root):
    """A PG 15 cluster, pgbench -s 20, CHECKPOINT, then pgbench until SEGMENTS segments are archived
    (by cp) into root/wal. Returns (pgdata, socket dir, port, wal dir, segment names, conn args).
    With BENCH_CACHE=DIR the cluster and its segments are kept in DIR and reused by later runs
    (generating them takes minutes on these machines)."""
    cache = os.environ.get("BENCH_CACHE")
    if cache:
        root = cache
    data, sock, wal = f"{root}/data", f"{root}/sock", f"{root}/wal"
    port = "5499"
    conn = ["-h", sock, "-p", port, "-U", "postgres"]
    if cache and os.path.exists(f"{root}/names"):
        names = open(f"{root}/names").read().split()
        if len(names) >= SEGMENTS:
            run(as_pg([f"{PG}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w", "start"]))
            return data, sock, port, wal, names[:SEGMENTS], conn
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    for d in (sock, wal):
        os.makedirs(d)
    shutil.chown(root, "postgres") if os.geteuid() == 0 else None
    run(["chown", "-R", "postgres", root]) if os.geteuid() == 0 else None
    run(as_pg([f"{PG}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]))
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{sock}'\nlisten_addresses = ''\n"
                f"archive_mode = on\narchive_command = 'cp %p {wal}/%f'\nmax_wal_size = '4GB'\n"
                f"checkpoint_timeout = '1h'\nshared_buffers = '256MB'\nsynchronous_commit = off\n")
    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w", "start"]))
    run([f"{PG}/pgbench", "-i", "-s", "20", "-q"] + conn + ["postgres"])
    run([f"{PG}/psql", "-X"] + conn + ["-c", "CHECKPOINT", "postgres"])
    start = run([f"{PG}/psql", "-XAt"] + conn + ["-c", "SELECT pg_walfile_name(pg_current_wal_lsn())", "postgres"]).strip()
    while True:
        run([f"{PG}/pgbench", "-n", "-T", "5", "-c", "4"] + conn + ["postgres"])
        done = sorted(n for n in os.listdir(wal) if len(n) == 24 and n > start)
        if len(done) >= SEGMENTS:
            break
    names = sorted(done)[:SEGMENTS]
    if cache:
        open(f"{root}/names", "w").write("\n".join(names))
    return data, sock, port, wal, names, conn


def fake_pgdata(root, wal, names, ready):
    d = tempfile.mkdtemp(dir=root)
    os.makedirs(f"{d}/pg_wal/archive_status")
    for n in names:
        shutil.copy(f"{wal}/{n}", f"{d}/pg_wal/{n}")
        if ready:
            open(f"{d}/pg_wal/archive_status/{n}.ready", "w").close()
    return d


def restore_pgdata(root, data):
    """A data directory for restore calls: pg_wal, and the cluster's global/pg_control, which
    pgpitr-restore checks the repository against."""
    out = tempfile.mkdtemp(dir=root)
    os.makedirs(f"{out}/pg_wal")
    os.makedirs(f"{out}/global")
    shutil.copy(f"{data}/global/pg_control", f"{out}/global/pg_control")
    return out


def start_garage(root):
    """A single-node Garage on loopback with one bucket; returns (env for pgpitr, process) or None."""
    garage = os.environ.get("GARAGE_BIN") or os.path.expanduser("~/.cache/pgpitr/garage/bin/garage")
    if not os.path.exists(garage):
        return None
    import socket
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rpc, s3, admin = port(), port(), port()
    d = f"{root}/garage"
    os.makedirs(d)
    cfg = f"{d}/garage.toml"
    with open(cfg, "w") as f:
        f.write(f'metadata_dir = "{d}/meta"\ndata_dir = "{d}/data"\ndb_engine = "sqlite"\nreplication_factor = 1\n'
                f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\nrpc_secret = "{"cd" * 32}"\n'
                f'[s3_api]\ns3_region = "garage"\napi_bind_addr = "127.0.0.1:{s3}"\nroot_domain = ".s3.localhost"\n'
                f'[admin]\napi_bind_addr = "127.0.0.1:{admin}"\n')
    proc = subprocess.Popen([garage, "-c", cfg, "server"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, RUST_LOG="warn"))
    cli = [garage, "-c", cfg]
    for _ in range(100):
        r = subprocess.run(cli + ["node", "id", "-q"], capture_output=True, text=True)
        if r.returncode == 0:
            break
        time.sleep(0.2)
    node = r.stdout.strip().split("@")[0]
    key, secret = "GK" + "0" * 24, "1" * 64
    for args in (["layout", "assign", "-z", "dc1", "-c", "10G", node], ["layout", "apply", "--version", "1"],
                 ["key", "import", "--yes", "-n", "bench", key, secret], ["bucket", "create", "bench"],
                 ["bucket", "allow", "--read", "--write", "--owner", "bench", "--key", "bench"]):
        # A node that has just answered `node id` may not take layout changes yet.
        for _ in range(50):
            r = subprocess.run(cli + args, capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"garage {' '.join(args)} failed: {r.stderr}")
    env = dict(PGPITR_S3_ENDPOINT=f"http://127.0.0.1:{s3}", PGPITR_S3_REGION="garage", PGPITR_S3_FORCE_PATH_STYLE="true",
               AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_EC2_METADATA_DISABLED="true")
    return env, proc


def wait_refill_done(lock):
    """Waits until no background refill runs: none holds its flock, and none has just been
    started (one may not have taken the lock yet)."""
    import fcntl
    while True:
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
        if subprocess.run(["pgrep", "-f", "pgpitr-restore --refill"], capture_output=True).returncode != 0:
            return
        time.sleep(0.05)


def summary(times):
    return statistics.median(times) * 1000, statistics.mean(times) * 1000


def main():
    root = tempfile.mkdtemp(prefix="pgpitr-bench-", dir="/tmp")
    os.chmod(root, 0o755)
    data, sock, port, wal, names, conn = make_wal(root)
    warm_memory()
    # Quiet the cluster (pgBackRest needs it running): autovacuum after pgbench would otherwise
    # compete with every measured call for the two cores and the disk.
    for sql in ("ALTER SYSTEM SET autovacuum = off", "SELECT pg_reload_conf()", "VACUUM", "CHECKPOINT"):
        run([f"{PG}/psql", "-X"] + conn + ["-c", sql, "postgres"])
    run(["sync"])
    raw = sum(os.path.getsize(f"{wal}/{n}") for n in names)
    # label -> (times, peak RSS) of every call, over all rounds, in the order first recorded.
    results = {}

    def record(label, times, rss):
        t, r = results.setdefault(label, ([], []))
        t.extend(times)
        r.extend(rss)

    def record_one(label, result):
        record(label, [result[0]], [result[1]])

    garage = start_garage(root)
    passphrase = f"{root}/passphrase"
    with open(passphrase, "w") as f:
        f.write("benchmark passphrase\n")
    os.chmod(passphrase, 0o600)
    LIMIT = "the machine's limit: cp + fsync (dd conv=fsync), one segment per call"
    for rnd in range(ROUNDS):
        # --- the synchronous commands, one segment at a time through each of them in turn, so
        # that whatever else the machine does at a moment (its disk is shared) falls on all of
        # them alike: the machine's own limit (dd conv=fsync: cp + fsync in one process, as a
        # WAL command at best does), pgpitr into a plain and into an encrypted repository (no
        # batching, no prefetch; the first encrypted call stretches the passphrase, later calls
        # find it in the spool), and pgBackRest 2.45 with lz4 ---
        lim = f"{root}/limit-{rnd}"
        os.makedirs(lim)
        envs = {}
        for kind in ("plain", "encrypted"):
            repo = f"{root}/pgpitr-repo-{kind}-{rnd}"
            os.makedirs(repo)
            env = dict(os.environ, PGPITR_REPO=repo, PGPITR_ARCHIVE_BATCH="0", PGPITR_RESTORE_PREFETCH="0")
            env.pop("PGPITR_CONFIG", None)
            if kind == "encrypted":
                env["PGPITR_ENCRYPTION_PASSPHRASE_FILE"] = passphrase
                run([f"{TARGET}/pgpitr", "key", "create"], env=env)
            envs[kind] = (repo, env, fake_pgdata(root, wal, names, ready=False))
        br = f"{root}/pgbr-{rnd}"
        os.makedirs(f"{br}/repo")
        conf = f"{br}/pgbackrest.conf"
        with open(conf, "w") as f:
            f.write(f"[global]\nrepo1-path={br}/repo\ncompress-type=lz4\nlog-level-console=warn\nlog-level-file=off\n"
                    f"lock-path={br}/lock\nspool-path={br}/spool\narchive-async=n\n\n"
                    f"[bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\npg1-user=postgres\n")
        run(["chown", "-R", "postgres", br]) if os.geteuid() == 0 else None
        base = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
        run(as_pg(base + ["stanza-create"]))
        settle()
        for n in names:
            record_one(LIMIT, timed(["dd", f"if={wal}/{n}", f"of={lim}/{n}", "bs=1M", "conv=fsync", "status=none"]))
            for kind, label in (("plain", "pgpitr-archive, one segment per call"),
                                ("encrypted", "pgpitr-archive, encrypted repository, one segment per call")):
                _, env, d = envs[kind]
                record_one(label, timed([f"{TARGET}/pgpitr-archive", f"pg_wal/{n}", n], env, d))
            record_one("pgBackRest archive-push (lz4)", timed(as_pg(base + ["archive-push", f"{wal}/{n}"])))
        shutil.rmtree(lim)
        repo = envs["plain"][0]
        stored = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(repo) for f in fs)
        outs = {kind: restore_pgdata(root, data) for kind in ("plain", "encrypted", "pgbackrest")}
        run(["chown", "-R", "postgres", outs["pgbackrest"]]) if os.geteuid() == 0 else None
        settle()
        for n in names:
            for kind, label in (("plain", "pgpitr-restore, one segment per call"),
                                ("encrypted", "pgpitr-restore, encrypted repository, one segment per call")):
                out = outs[kind]
                record_one(label, restore_checked(
                    out, [f"{TARGET}/pgpitr-restore", n, "pg_wal/RECOVERYXLOG"], envs[kind][1], wal, n))
            out = outs["pgbackrest"]
            record_one("pgBackRest archive-get", restore_checked(
                out, as_pg(base + ["archive-get", n, f"{out}/pg_wal/RECOVERYXLOG"]), None, wal, n))

        # --- pgpitr with batching / prefetch, called as PostgreSQL calls it ---
        repo = f"{root}/pgpitr-repo-b{rnd}"
        os.makedirs(repo)
        env = dict(os.environ, PGPITR_REPO=repo)
        env.pop("PGPITR_CONFIG", None)
        d = fake_pgdata(root, wal, names, ready=True)
        settle()
        t, r = zip(*[archiver_call(d, n, [f"{TARGET}/pgpitr-archive", f"pg_wal/{n}", n], env)
                     for n in names])
        record("pgpitr-archive, batching (16 ahead, 3 parallel)", t, r)
        out = restore_pgdata(root, data)
        settle()
        t, r = zip(*[recovery_call(out, [f"{TARGET}/pgpitr-restore", n, "pg_wal/RECOVERYXLOG"], env)
                     for n in names])
        record("pgpitr-restore, prefetch (8 ahead)", t, r)
        # The detached refill those calls start is not their child: measure it on its own (the
        # same command they run), filling an empty spool with 8 segments.
        for lock in glob.glob(f"{out}/pg_wal/pgpitr_spool/restore/*.lock"):
            wait_refill_done(lock)
        shutil.rmtree(f"{out}/pg_wal/pgpitr_spool")
        settle()
        t, r = timed([f"{TARGET}/pgpitr-restore", "--refill", names[0], "pg_wal/RECOVERYXLOG"], env, out)
        record("background refill of the prefetch (8 segments), per segment", [t / 8], [r])

        # --- pgpitr on S3 (Garage on loopback), synchronous ---
        if garage:
            env = dict(os.environ, **garage[0], PGPITR_REPO=f"s3://bench/r{rnd}", PGPITR_ARCHIVE_BATCH="0",
                       PGPITR_RESTORE_PREFETCH="0")
            env.pop("PGPITR_CONFIG", None)
            d = fake_pgdata(root, wal, names, ready=False)
            settle()
            t, r = zip(*[timed([f"{TARGET}/pgpitr-archive", f"pg_wal/{n}", n], env, d) for n in names])
            record("pgpitr-archive to S3 (Garage), one segment per call", t, r)
            out = restore_pgdata(root, data)
            settle()
            t, r = zip(*[restore_checked(out, [f"{TARGET}/pgpitr-restore", n, "pg_wal/RECOVERYXLOG"], env, wal, n)
                         for n in names])
            record("pgpitr-restore from S3 (Garage), one segment per call", t, r)


    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-m", "immediate", "stop"]))
    if garage:
        garage[1].kill()
    cpu = run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    print(f"### WAL archiving ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu})\n")
    print(f"{len(names)} real 16 MiB segments from pgbench (scale 20, 4 clients, after a CHECKPOINT), "
          f"{raw / 2**20:.0f} MiB plain, {stored / 2**20:.0f} MiB stored by pgpitr "
          f"({stored / raw:.2f}); local repository on the same disk; {ROUNDS} rounds, each segment once per round; "
          f"the synchronous commands take each segment in turn (dd, pgpitr plain, pgpitr encrypted, pgBackRest), "
          f"so that the machine's moments fall on all of them alike; medians and means are over every call of "
          f"every round; every figure is per call, process start included.\n")
    print("| command | median ms/segment | mean ms/segment | segments/s (1/mean) | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    medians = {}
    for label, (times, rss) in results.items():
        med, mean = summary(times)
        medians[label] = med
        print(f"| {label} | {med:.1f} | {mean:.1f} | {1000 / mean:.0f} | {max(rss) / 1024:.1f} |")
    limit = medians[LIMIT]
    print("\n| median ratio | to pgBackRest (target ≤ 0.5) | to cp + fsync |")
    print("|---|---:|---:|")
    for ours, theirs in (("pgpitr-archive, one segment per call", "pgBackRest archive-push (lz4)"),
                         ("pgpitr-restore, one segment per call", "pgBackRest archive-get"),
                         ("pgpitr-archive, encrypted repository, one segment per call",
                          "pgBackRest archive-push (lz4)"),
                         ("pgpitr-restore, encrypted repository, one segment per call",
                          "pgBackRest archive-get")):
        print(f"| {ours} | {medians[ours] / medians[theirs]:.2f} | {medians[ours] / limit:.2f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
