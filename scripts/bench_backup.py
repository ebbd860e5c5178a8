#!/usr/bin/env python3
"""Base backup and restore benchmark, one run on this machine: `pgpitr backup` vs
`pg_basebackup -Ft --compress=client-lz4 --checkpoint=fast` and pgBackRest full (lz4, process-max 2);
`pgpitr restore` vs pgBackRest restore (process-max 2). Prints Markdown. Run through scripts/bench."""
import os, shutil, subprocess, sys, tempfile, time

PG = "/usr/lib/postgresql/15/bin"
TARGET = sys.argv[1]
SCALE = int(os.environ.get("BENCH_SCALE", "140"))  # pgbench scale 140 is about 2.1 GB


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def as_pg(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def timed(cmd, env=None):
    """Wall seconds and peak RSS (MiB, GNU time %M) of one command."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{cmd} failed: {p.stderr.decode()[-2000:]}")
        return dt, int(rss.read().split()[-1]) / 1024


def du(path):
    return int(run(["du", "-sb", path]).split()[0])


def main():
    root = tempfile.mkdtemp(prefix="pgpitr-bench-backup-", dir="/tmp")
    os.chmod(root, 0o755)
    data, sock, repo, br = f"{root}/data", f"{root}/sock", f"{root}/repo", f"{root}/pgbr"
    for d in (sock, repo, f"{br}/repo", f"{root}/bin"):
        os.makedirs(d)
    for b in ("pgpitr", "pgpitr-archive", "pgpitr-restore"):
        shutil.copy(f"{TARGET}/{b}", f"{root}/bin/{b}")
    if os.geteuid() == 0:
        run(["chown", "-R", "postgres", root])
    port = "5498"
    run(as_pg([f"{PG}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-k"]))
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{sock}'\nlisten_addresses = ''\n"
                f"archive_mode = on\narchive_command = 'PGPITR_REPO={repo} {root}/bin/pgpitr-archive %p %f'\n"
                f"max_wal_size = '8GB'\nshared_buffers = '256MB'\nmax_wal_senders = 10\n")
    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w", "start"]))
    conn = ["-h", sock, "-p", port, "-U", "postgres"]
    run([f"{PG}/pgbench", "-i", "-s", str(SCALE), "-q"] + conn + ["postgres"])
    run([f"{PG}/psql", "-X"] + conn + ["-c", "CHECKPOINT", "postgres"])
    size = int(run([f"{PG}/psql", "-XAt"] + conn + ["-c", "SELECT sum(pg_database_size(oid)) FROM pg_database", "postgres"]))
    env = dict(os.environ, PGPITR_REPO=repo, PGPITR_CONNINFO=f"host={sock} port={port} user=postgres")
    env.pop("PGPITR_CONFIG", None)
    rows = []

    t, rss = timed(as_pg(["env", f"PGPITR_REPO={repo}", f"PGPITR_CONNINFO=host={sock} port={port} user=postgres",
                          f"{root}/bin/pgpitr", "backup", "--checkpoint", "fast"]), env)
    rows.append(("pgpitr backup (first, full)", t, rss, du(repo)))
    t2, rss2 = timed(as_pg(["env", f"PGPITR_REPO={repo}", f"PGPITR_CONNINFO=host={sock} port={port} user=postgres",
                            f"{root}/bin/pgpitr", "backup", "--checkpoint", "fast"]), env)
    rows.append(("pgpitr backup (second, unchanged cluster)", t2, rss2, du(repo)))

    out = f"{root}/basebackup"
    t, rss = timed(as_pg([f"{PG}/pg_basebackup", "-D", out, "-Ft", "--compress=client-lz4", "--checkpoint=fast",
                          "-X", "none"] + conn))
    rows.append(("pg_basebackup -Ft --compress=client-lz4", t, rss, du(out)))

    conf = f"{br}/pgbackrest.conf"
    with open(conf, "w") as f:
        f.write(f"[global]\nrepo1-path={br}/repo\ncompress-type=lz4\nprocess-max=2\nlog-level-console=warn\n"
                f"log-level-file=off\nlock-path={br}/lock\nspool-path={br}/spool\nstart-fast=y\narchive-check=n\n"
                f"repo1-retention-full=10\n\n[bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\npg1-user=postgres\n")
    if os.geteuid() == 0:
        run(["chown", "-R", "postgres", br])
    base = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
    run(as_pg(base + ["stanza-create"]))
    t, rss = timed(as_pg(base + ["backup", "--type=full"]))
    rows.append(("pgBackRest backup --type=full (lz4, process-max 2)", t, rss, du(f"{br}/repo")))

    # Restores: pgpitr restore of the latest backup vs pgBackRest restore.
    dst = f"{root}/restore-pgpitr"
    t, rss = timed(as_pg(["env", f"PGPITR_REPO={repo}", f"{root}/bin/pgpitr", "restore", "--target", "immediate",
                          "--pgdata", dst]))
    restored = du(dst)
    rows.append(("pgpitr restore --target immediate", t, rss, restored))
    dst2 = f"{root}/restore-pgbr"
    t, rss = timed(as_pg(base + ["restore", f"--pg1-path={dst2}", "--type=immediate", "--process-max=2"]))
    rows.append(("pgBackRest restore (process-max 2)", t, rss, du(dst2)))

    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-m", "immediate", "stop"]))
    cpu = run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    print(f"### Base backup and restore ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu})\n")
    print(f"pgbench scale {SCALE}: {size / 1e9:.2f} GB of databases, in page cache; repositories on the same disk. "
          f"Restore rates are data-directory bytes written per second.\n")
    print("| operation | seconds | MB/s | peak RSS MiB | bytes on disk afterwards (MB) |")
    print("|---|---:|---:|---:|---:|")
    for label, t, rss, disk in rows:
        mbps = (restored if "restore" in label else size) / 1e6 / t
        print(f"| {label} | {t:.1f} | {mbps:.0f} | {rss:.0f} | {disk / 1e6:.0f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
