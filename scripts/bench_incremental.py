#!/usr/bin/env python3
"""Incremental backup benchmark (PostgreSQL 17+), one run on this machine: a full `pgpitr backup`
of a pgbench database (about 2 GB at the default scale), then about 1% of pgbench_accounts
updated (one contiguous range of rows), then `pgpitr backup --incremental` and a full
`pgpitr backup` of the same state. Reports wall time, the bytes the server read (the `rchar`
of the walsender that served the backup, which the postmaster's /proc/<pid>/io accumulates when it
reaps it; autovacuum is off so that no other child exits meanwhile), the tar bytes the server sent
(from pgpitr's own count) and the bytes each backup added to the repository. Prints Markdown. Run
through scripts/bench; needs PG17_SERVER_BIN (or PG18_SERVER_BIN with BENCH_PG=18), as
`scripts/test --setup-only` prints, and PostgreSQL 15's client tools."""
import json, os, re, shutil, subprocess, sys, tempfile, time

from bench_wal import settle, warm_memory

CLIENT = "/usr/lib/postgresql/15/bin"
TARGET = sys.argv[1]
MAJOR = os.environ.get("BENCH_PG", "17")
SCALE = int(os.environ.get("BENCH_SCALE", "140"))  # pgbench scale 140 is about 2.1 GB
CHANGED = float(os.environ.get("BENCH_CHANGED", "0.01"))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def as_pg(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def psql(conn, sql):
    return run([f"{CLIENT}/psql", "-XAt"] + conn + ["-c", sql, "postgres"]).strip()


def wait_archived(conn):
    # A record first: right after a switch, pg_switch_wal() switches nothing and the segment
    # waited for would never be archived.
    psql(conn, "SELECT pg_logical_emit_message(false, 'pgpitr-bench', 'switch')")
    last = psql(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    psql(conn, "SELECT pg_switch_wal()")
    deadline = time.time() + 1800
    while psql(conn, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last:
        if time.time() > deadline:
            raise SystemExit("WAL archiving did not catch up")
        time.sleep(0.2)


UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def postmaster(data):
    with open(f"{data}/postmaster.pid") as f:
        return f.readline().strip()


def children_rchar(data):
    """Bytes read through read()-like calls by the postmaster and the children it has reaped
    (Linux adds a reaped child's I/O counters to its parent's /proc/<pid>/io)."""
    with open(f"/proc/{postmaster(data)}/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar:"))


def walsenders(data):
    """The postmaster's live walsender children (read from /proc, so that no new backend of our
    own is started and reaped while we wait)."""
    pid = postmaster(data)
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    found = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"walsender" in f.read():
                    found.append(k)
        except FileNotFoundError:
            pass
    return found


def backup(root, data, repo, sock, port, conn, extra):
    """One measured `pgpitr backup`: (seconds, bytes the server read, bytes received from the
    server, backup id)."""
    wait_archived(conn)
    settle()
    read0 = children_rchar(data)
    cmd = as_pg(["env", f"PGPITR_REPO={repo}", f"PGPITR_CONNINFO=host={sock} port={port} user=postgres",
                 f"{root}/bin/pgpitr", "backup", "--checkpoint", "fast"] + extra)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr[-2000:]}")
    m = re.search(r"\(([\d.]+) (\w+) received from the server", p.stderr)
    if not m:
        raise SystemExit(f"no byte count in: {p.stderr[-2000:]}")
    # The walsender exits when pgpitr disconnects; wait until the postmaster has reaped it.
    deadline = time.time() + 30
    while walsenders(data):
        if time.time() > deadline:
            raise SystemExit("the walsender of the backup did not exit")
        time.sleep(0.1)
    read = children_rchar(data) - read0
    return dt, read, float(m.group(1)) * UNITS[m.group(2)], p.stdout.strip()


def main():
    server = os.environ.get(f"PG{MAJOR}_SERVER_BIN")
    if not server:
        raise SystemExit(f"PG{MAJOR}_SERVER_BIN is not set: source <(scripts/test --setup-only | grep export)")
    warm_memory()
    root = tempfile.mkdtemp(prefix="pgpitr-bench-incr-", dir="/tmp")
    os.chmod(root, 0o755)
    data, sock, repo = f"{root}/data", f"{root}/sock", f"{root}/repo"
    for d in (sock, repo, f"{root}/bin"):
        os.makedirs(d)
    for b in ("pgpitr", "pgpitr-archive", "pgpitr-restore"):
        shutil.copy(f"{TARGET}/{b}", f"{root}/bin/{b}")
    if os.geteuid() == 0:
        run(["chown", "-R", "postgres", root])
    port = "5496"
    try:
        run(as_pg([f"{server}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-k"]))
        with open(f"{data}/postgresql.conf", "a") as f:
            f.write(f"\nport = {port}\nunix_socket_directories = '{sock}'\nlisten_addresses = ''\n"
                    f"archive_mode = on\narchive_command = 'PGPITR_REPO={repo} {root}/bin/pgpitr-archive %p %f'\n"
                    f"max_wal_size = '8GB'\nshared_buffers = '256MB'\nmax_wal_senders = 10\nsummarize_wal = on\nautovacuum = off\n")
        run(as_pg([f"{server}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w", "start"]))
        conn = ["-h", sock, "-p", port, "-U", "postgres"]
        run([f"{CLIENT}/pgbench", "-i", "-s", str(SCALE), "-q"] + conn + ["postgres"])
        psql(conn, "CHECKPOINT")
        size = int(psql(conn, "SELECT sum(pg_database_size(oid)) FROM pg_database"))
        version = psql(conn, "SHOW server_version")

        t_base, read_base, sent_base, base_id = backup(root, data, repo, sock, port, conn, [])
        rows = SCALE * 100_000
        changed = int(rows * CHANGED)
        start = rows // 3
        psql(conn, f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {start} AND aid <= {start + changed}")
        psql(conn, "CHECKPOINT")
        t_incr, read_incr, sent_incr, incr_id = backup(root, data, repo, sock, port, conn, ["--incremental"])
        t_full, read_full, sent_full, full_id = backup(root, data, repo, sock, port, conn, [])
        listing = json.loads(run(as_pg(["env", f"PGPITR_REPO={repo}", f"{root}/bin/pgpitr", "list", "--json"])))
        new = {b["id"]: b["new_bytes"] for b in listing["backups"]}
        parents = {b["id"]: b.get("incremental_from") for b in listing["backups"]}
        if parents.get(incr_id) != base_id:
            raise SystemExit(f"the incremental backup {incr_id} is not built on {base_id}: {parents}")
        run(as_pg([f"{server}/pg_ctl", "-D", data, "-m", "fast", "stop"]))
    finally:
        subprocess.run(as_pg([f"{server}/pg_ctl", "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    cpu = run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    print(f"### Incremental backup ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu})\n")
    print(f"PostgreSQL {version}, `summarize_wal = on`, pgbench scale {SCALE}: {size / 1e9:.2f} GB of "
          f"databases, in page cache; the repository on the same disk. After the first full backup, "
          f"{changed:,} rows of pgbench_accounts ({CHANGED:.0%}, one contiguous range) updated, then "
          f"the incremental backup (against the first) and a full backup of the same state. "
          f"\"Read\" counts the bytes the walsender read (its `rchar`, page cache included); "
          f"\"sent\" the tar bytes the server streamed (pgpitr's count); \"stored\" what the "
          f"backup added to the repository (compressed).\n")
    print("| backup | seconds | read by the server (MB) | sent by the server (MB) | stored (MB) |")
    print("|---|---:|---:|---:|---:|")
    for label, t, read, sent, bid in (
            ("first full backup (empty repository)", t_base, read_base, sent_base, base_id),
            ("`--incremental` after the change", t_incr, read_incr, sent_incr, incr_id),
            ("full backup after the change", t_full, read_full, sent_full, full_id)):
        print(f"| {label} | {t:.1f} | {read / 1e6:.0f} | {sent / 1e6:.0f} | {new[bid] / 1e6:.1f} |")
    print()
    print(f"- incremental / full after the change: time {t_incr / t_full:.2f}×, "
          f"bytes read {read_incr / read_full:.3f}×, bytes sent {sent_incr / sent_full:.3f}×")


if __name__ == "__main__":
    main()
