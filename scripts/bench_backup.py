#!/usr/bin/env python3
"""Base backup and restore benchmark, one run on this machine: `pgpitr backup` vs
`pg_basebackup -Ft --compress=client-lz4 --checkpoint=fast` and pgBackRest full (lz4, process-max 2);
`pgpitr restore` vs pgBackRest restore (process-max 2); then recovery replay of about 1 GB of WAL
through `pgpitr-restore` vs the same WAL pre-staged in pg_wal. Prints Markdown. Run through
scripts/bench."""
import os, shutil, statistics, subprocess, sys, tempfile, time

from bench_wal import settle, warm_memory

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
    warm_memory()
    root = tempfile.mkdtemp(prefix="pgpitr-bench-backup-", dir="/tmp")
    os.chmod(root, 0o755)
    data, sock, repo, br = f"{root}/data", f"{root}/sock", f"{root}/repo", f"{root}/pgbr"
    for d in (sock, f"{br}/repo", f"{root}/bin"):
        os.makedirs(d)
    for b in ("pgpitr", "pgpitr-archive", "pgpitr-restore"):
        shutil.copy(f"{TARGET}/{b}", f"{root}/bin/{b}")
    # The archive_command: into whatever `repo` points at, with the passphrase when that
    # repository is encrypted (has key slots).
    passphrase = f"{root}/passphrase"
    with open(passphrase, "w") as f:
        f.write("benchmark passphrase\n")
    os.chmod(passphrase, 0o600)
    with open(f"{root}/bin/archive.sh", "w") as f:
        f.write(f"#!/bin/sh\nexport PGPITR_REPO={repo}\n"
                f"[ -d {repo}/keys ] && export PGPITR_ENCRYPTION_PASSPHRASE_FILE={passphrase}\n"
                f"exec {root}/bin/pgpitr-archive \"$@\"\n")
    os.chmod(f"{root}/bin/archive.sh", 0o755)
    if os.geteuid() == 0:
        run(["chown", "-R", "postgres", root])
    port = "5498"
    run(as_pg([f"{PG}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-k"]))
    # The archive goes through the symlink `repo`, which each round points at a new repository.
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"\nport = {port}\nunix_socket_directories = '{sock}'\nlisten_addresses = ''\n"
                f"archive_mode = on\narchive_command = '{root}/bin/archive.sh %p %f'\n"
                f"max_wal_size = '8GB'\nshared_buffers = '256MB'\nmax_wal_senders = 10\n")
    use_repo(root, "repo-load")
    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-l", f"{root}/log", "-w", "start"]))
    conn = ["-h", sock, "-p", port, "-U", "postgres"]
    run([f"{PG}/pgbench", "-i", "-s", str(SCALE), "-q"] + conn + ["postgres"])
    run([f"{PG}/psql", "-X"] + conn + ["-c", "CHECKPOINT", "postgres"])
    size = int(run([f"{PG}/psql", "-XAt"] + conn + ["-c", "SELECT sum(pg_database_size(oid)) FROM pg_database", "postgres"]))

    conf = f"{br}/pgbackrest.conf"
    with open(conf, "w") as f:
        f.write(f"[global]\nrepo1-path={br}/repo\ncompress-type=lz4\nprocess-max=2\nlog-level-console=warn\n"
                f"log-level-file=off\nlock-path={br}/lock\nspool-path={br}/spool\nstart-fast=y\narchive-check=n\n"
                f"repo1-retention-full=10\n\n[bench]\npg1-path={data}\npg1-port={port}\npg1-socket-path={sock}\npg1-user=postgres\n")
    if os.geteuid() == 0:
        run(["chown", "-R", "postgres", br])
    base = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
    run(as_pg(base + ["stanza-create"]))

    # Full backups in interleaved rounds, each tool after the same quiet: the machine's noise
    # moves one backup by 20 % and more. pgpitr backs up into a new repository each round (into
    # an earlier one it would store only the changes).
    rounds = int(os.environ.get("BENCH_BACKUP_ROUNDS", "3"))

    def pgpitr_backup(repo, encrypted=False):
        key = [f"PGPITR_ENCRYPTION_PASSPHRASE_FILE={passphrase}"] if encrypted else []
        return as_pg(["env", f"PGPITR_REPO={repo}", f"PGPITR_CONNINFO=host={sock} port={port} user=postgres"]
                     + key + [f"{root}/bin/pgpitr", "backup", "--checkpoint", "fast"])

    def encrypted_repo(name):
        """A new encrypted repository `root/name` with its key, then made the archive's."""
        target = f"{root}/{name}"
        os.makedirs(target)
        if os.geteuid() == 0:
            run(["chown", "postgres", target])
        run(as_pg(["env", f"PGPITR_REPO={target}", f"PGPITR_ENCRYPTION_PASSPHRASE_FILE={passphrase}",
                   f"{root}/bin/pgpitr", "key", "create"]))
        return use_repo(root, name)

    out = f"{root}/basebackup"
    times = {"pgpitr": [], "pg_basebackup": [], "pgBackRest": [], "pgpitr encrypted": []}
    rss = {k: 0.0 for k in times}
    for rnd in range(rounds):
        current = use_repo(root, f"repo-{rnd}")
        shutil.rmtree(out, ignore_errors=True)
        for tool, cmd in (("pgpitr", pgpitr_backup(current)),
                          ("pg_basebackup", as_pg([f"{PG}/pg_basebackup", "-D", out, "-Ft", "--compress=client-lz4",
                                                   "--checkpoint=fast", "-X", "none"] + conn)),
                          ("pgBackRest", as_pg(base + ["backup", "--type=full"]))):
            t, r = quiet_timed(conn, cmd)
            times[tool].append(t)
            rss[tool] = max(rss[tool], r)
        encrypted = encrypted_repo(f"repo-enc-{rnd}")
        t, r = quiet_timed(conn, pgpitr_backup(encrypted, encrypted=True))
        times["pgpitr encrypted"].append(t)
        rss["pgpitr encrypted"] = max(rss["pgpitr encrypted"], r)
    enc_packs = du(f"{encrypted}/packs")
    current = use_repo(root, f"repo-{rounds - 1}")
    packs = du(f"{current}/packs")
    t2, rss2 = quiet_timed(conn, pgpitr_backup(current))
    rows = [("pgpitr backup (full)", statistics.median(times["pgpitr"]), rss["pgpitr"], packs),
            ("pgpitr backup (second, unchanged cluster)", t2, rss2, du(f"{current}/packs") - packs),
            ("pg_basebackup -Ft --compress=client-lz4", statistics.median(times["pg_basebackup"]),
             rss["pg_basebackup"], du(out)),
            ("pgBackRest backup --type=full (lz4, process-max 2)", statistics.median(times["pgBackRest"]),
             rss["pgBackRest"], du(f"{br}/repo") / rounds)]
    rows.append(("pgpitr backup (full), encrypted repository", statistics.median(times["pgpitr encrypted"]),
                 rss["pgpitr encrypted"], enc_packs))
    repo = current

    # Restores: pgpitr restore of the latest backup vs pgBackRest restore.
    dst = f"{root}/restore-pgpitr"
    t, rss = timed(as_pg(["env", f"PGPITR_REPO={repo}", f"{root}/bin/pgpitr", "restore", "--target", "immediate",
                          "--pgdata", dst]))
    restored = du(dst)
    rows.append(("pgpitr restore --target immediate", t, rss, restored))
    dst2 = f"{root}/restore-pgbr"
    t, rss = timed(as_pg(base + ["restore", f"--pg1-path={dst2}", "--type=immediate", "--process-max=2"]))
    rows.append(("pgBackRest restore (process-max 2)", t, rss, du(dst2)))
    dst3 = f"{root}/restore-pgpitr-enc"
    t, rss = timed(as_pg(["env", f"PGPITR_REPO={encrypted}", f"PGPITR_ENCRYPTION_PASSPHRASE_FILE={passphrase}",
                          f"{root}/bin/pgpitr", "restore", "--target", "immediate", "--pgdata", dst3]))
    rows.append(("pgpitr restore --target immediate, encrypted repository", t, rss, du(dst3)))
    shutil.rmtree(dst3, ignore_errors=True)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(dst2, ignore_errors=True)
    replay = bench_replay(root, data, conn, repo)

    run(as_pg([f"{PG}/pg_ctl", "-D", data, "-m", "immediate", "stop"]))
    cpu = run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    print(f"### Base backup and restore ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu})\n")
    print(f"pgbench scale {SCALE}: {size / 1e9:.2f} GB of databases, in page cache; repositories on the same disk. "
          f"Restore rates are data-directory bytes written per second.\n")
    print(f"Backups: median of {rounds} interleaved rounds, each after the WAL archive has caught up and a "
          f"sync; pgpitr into a new repository each round. Bytes stored: the backup's packs (pgpitr; the "
          f"second backup: what it added), the tar files (pg_basebackup), one full backup (pgBackRest).\n")
    print("| operation | seconds | MB/s | peak RSS MiB | bytes stored (MB) |")
    print("|---|---:|---:|---:|---:|")
    for label, t, rss, disk in rows:
        mbps = (restored if "restore" in label else size) / 1e6 / t
        print(f"| {label} | {t:.1f} | {mbps:.0f} | {rss:.0f} | {disk / 1e6:.0f} |")
    print()
    for rnd in range(rounds):
        pgpitr, pgbb, pgbr = (times[k][rnd] for k in ("pgpitr", "pg_basebackup", "pgBackRest"))
        print(f"- backup round {rnd + 1}: pgpitr {pgpitr:.2f} s, pg_basebackup {pgbb:.2f} s "
              f"({pgpitr / pgbb:.2f}×), pgBackRest {pgbr:.2f} s")
    print(f"- pgpitr / pg_basebackup, medians: {rows[0][1] / rows[2][1]:.2f}×")
    enc = statistics.median(times["pgpitr encrypted"])
    print(f"- pgpitr into an encrypted repository / pg_basebackup, medians: {enc / rows[2][1]:.2f}× "
          f"(target ≤ 1.1); per round: " + ", ".join(f"{e:.2f} s" for e in times["pgpitr encrypted"]))
    print_replay(replay)
    shutil.rmtree(root, ignore_errors=True)


def use_repo(root, name):
    """Points the symlink `root/repo`, the archive_command's repository, at `root/name` (created
    empty if new) and returns the latter's path."""
    target = f"{root}/{name}"
    os.makedirs(target, exist_ok=True)
    if os.geteuid() == 0:
        run(["chown", "postgres", target])
    os.symlink(target, f"{root}/repo.new")
    os.rename(f"{root}/repo.new", f"{root}/repo")
    return target


def wait_archived(conn):
    """Switches to a new WAL segment and waits until the archiver has archived the one before,
    so that no archive_command runs beside a measured backup."""
    last = psql(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    psql(conn, "SELECT pg_switch_wal()")
    deadline = time.time() + 1800
    while psql(conn, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last:
        if time.time() > deadline:
            raise SystemExit("WAL archiving did not catch up")
        time.sleep(0.2)


def quiet_timed(conn, cmd):
    """`timed(cmd)` once the WAL archive has caught up and dirty pages are flushed."""
    wait_archived(conn)
    settle()
    return timed(cmd)


def psql(conn, sql):
    return run([f"{PG}/psql", "-XAt"] + conn + ["-c", sql, "postgres"]).strip()


def next_segment(name):
    """The WAL segment after `name` (16 MiB segments: 256 per "log")."""
    tli, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    seg += 1
    if seg == 0x100:
        log, seg = log + 1, 0
    return f"{tli:08X}{log:08X}{seg:08X}"


def bench_replay(root, data, conn, repo):
    """Recovery replay of REPLAY_GB of WAL: fetched through pgpitr-restore (restore_command, with
    its prefetch) vs the same WAL already in pg_wal (restore_command = 'false'), both from the
    same base backup restored by pgpitr. Returns a dict for print_replay."""
    gb = float(os.environ.get("BENCH_REPLAY_GB", "1.1"))
    start_lsn = psql(conn, "SELECT pg_current_wal_lsn()")
    # OLTP-like WAL quickly: updates of row ranges spread over the table (full-page images after
    # the backup's checkpoint, heap and index records), until enough WAL is written.
    n, step = 0, 200_000
    while int(psql(conn, f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start_lsn}')")) < gb * 1e9:
        lo = (n * 7_919_993) % (SCALE * 100_000 - step)
        psql(conn, f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {lo} AND aid <= {lo + step}")
        n += 1
    end_lsn = psql(conn, "SELECT pg_current_wal_lsn()")
    wait_archived(conn)
    wal_bytes = int(psql(conn, f"SELECT pg_wal_lsn_diff('{end_lsn}', '{start_lsn}')"))
    # The source cluster's next checkpoint would write its dirty buffers during a measured round.
    psql(conn, "CHECKPOINT")
    results = {"wal_bytes": wal_bytes, "rounds": []}
    # The machine's own noise moves a replay by up to 20 %: every mode runs ROUNDS times,
    # interleaved, and the medians are compared.
    rounds = int(os.environ.get("BENCH_REPLAY_ROUNDS", "5"))
    for _ in range(rounds):
        results["rounds"].append({mode: replay_once(root, repo, conn, mode)
                                  for mode in ("restore_command", "pg_wal")})
    for mode in ("restore_command", "pg_wal"):
        results[mode] = statistics.median(r[mode] for r in results["rounds"])
    results["end_lsn"] = end_lsn
    return results


def replay_once(root, repo, conn, mode):
    """Restores the latest backup and times its recovery with the WAL from `mode`: through
    pgpitr-restore (`restore_command`) or pre-staged in pg_wal (`pg_wal`). Returns seconds from
    `pg_ctl start` to the end of recovery."""
    dst = f"{root}/replay-{mode}"
    run(as_pg(["env", f"PGPITR_REPO={repo}", f"{root}/bin/pgpitr", "restore", "--pgdata", dst]))
    if mode == "pg_wal":
        # The same WAL, fetched beforehand into pg_wal; the archive is then never asked.
        # From the backup's own start segment (backup_label: "START WAL LOCATION: … (file X)").
        label = open(f"{dst}/backup_label").read()
        name = label.split("(file ", 1)[1].split(")", 1)[0]
        while True:
            p = subprocess.run(as_pg(["env", f"PGPITR_REPO={repo}", "PGPITR_RESTORE_PREFETCH=0",
                                      f"{root}/bin/pgpitr-restore", name, f"pg_wal/{name}"]), cwd=dst)
            if p.returncode != 0:
                break
            name = next_segment(name)
        extra = "restore_command = 'false'\n"
    else:
        extra = ""
    with open(f"{dst}/postgresql.auto.conf", "a") as f:
        f.write(f"{extra}port = 5497\n")
    # Whatever was written before (the restore, the pre-staged WAL) reaches the disk first.
    settle()
    t0 = time.perf_counter()
    run(as_pg([f"{PG}/pg_ctl", "-D", dst, "-l", f"{root}/replay-{mode}.log", "-w", "-t", "3600", "start"]))
    rconn = ["-h", conn[1], "-p", "5497", "-U", "postgres"]
    while True:
        r = subprocess.run([f"{PG}/psql", "-XAt"] + rconn + ["-c", "SELECT pg_is_in_recovery()", "postgres"],
                           capture_output=True, text=True)
        if r.stdout.strip() == "f":
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    run(as_pg([f"{PG}/pg_ctl", "-D", dst, "-m", "fast", "stop"]))
    shutil.rmtree(dst, ignore_errors=True)
    return seconds



def print_replay(r):
    gb = r["wal_bytes"] / 1e9
    print(f"\n### Recovery replay ({gb:.2f} GB of WAL from range updates of pgbench_accounts)\n")
    print("The same base backup restored by pgpitr, then started with `pg_ctl start`; time from start "
          "until the server has left recovery (end of archive, promotion). Reached end LSN "
          f"{r['end_lsn']}. Median of {len(r['rounds'])} interleaved rounds; every round's seconds "
          "follow the table.\n")
    print("| WAL source | seconds | MB/s replayed | × pre-staged |")
    print("|---|---:|---:|---:|")
    for mode, label in (("restore_command", "`pgpitr-restore` as restore_command (refill 8 ahead; local repository)"),
                        ("pg_wal", "already in pg_wal (restore_command = 'false'): the limit")):
        print(f"| {label} | {r[mode]:.1f} | {r['wal_bytes'] / 1e6 / r[mode]:.0f} | {r[mode] / r['pg_wal']:.2f} |")
    print()
    for i, rnd in enumerate(r["rounds"], 1):
        print(f"- round {i}: restore_command {rnd['restore_command']:.2f} s, pg_wal {rnd['pg_wal']:.2f} s "
              f"({rnd['restore_command'] / rnd['pg_wal']:.2f}×)")


if __name__ == "__main__":
    main()
