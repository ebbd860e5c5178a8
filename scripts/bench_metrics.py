#!/usr/bin/env python3
"""Scan benchmark of `pgpitr metrics` and `pgpitr status`: builds a synthetic local repository
(objects written directly in the repository layout of docs/repository-format.md: repo.json,
BENCH_WAL WAL objects on timeline 1, BENCH_BACKUPS backups whose manifests list BENCH_FILES
files each) and times one `pgpitr metrics` and one `pgpitr status` on it, each the median of
BENCH_ROUNDS runs after one warm-up (page cache warm, as for a periodic scrape). The WAL objects
hold a few bytes: the scan lists them, never reads them. Prints a Markdown report.
Usage: scripts/bench_metrics.py TARGET_DIR   (the directory holding the pgpitr binary)"""
import json, os, statistics, subprocess, sys, tempfile, time

TARGET = sys.argv[1]
WAL = int(os.environ.get("BENCH_WAL", "100000"))
BACKUPS = int(os.environ.get("BENCH_BACKUPS", "50"))
FILES = int(os.environ.get("BENCH_FILES", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SEG = 16 * 1024 * 1024
PER_LOG = 0x1_0000_0000 // SEG


def segment(segno, tli=1):
    return f"{tli:08X}{segno // PER_LOG:08X}{segno % PER_LOG:08X}"


def lsn(x):
    return f"{x >> 32:X}/{x & 0xFFFFFFFF:X}"


def write(root, key, data):
    path = os.path.join(root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def build(root):
    write(root, "repo.json", json.dumps({"format_version": 1, "system_identifier": "7311245606442982531",
                                         "pg_major": 15, "wal_segment_size": SEG}).encode())
    sha = "ab" * 32
    for n in range(1, WAL + 1):
        name = segment(n)
        write(root, f"wal/{name[:16]}/{name}-{sha}.lz4", b"x" * 64)
    base = 1_790_000_000
    step = max(1, (WAL - 10) // BACKUPS)
    for i in range(BACKUPS):
        start_seg = 1 + i * step
        t0 = base + i * 86_400
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0))
        files = [{"path": f"base/5/{16384 + f}", "size": 8192, "mode": 384, "mtime": t0,
                  "sha256": sha, "crc32c": "5e0c71a2", "kind": "file",
                  "chunks": [{"sha256": sha, "pack": "3f0c9a0e5b1d4c2e8a7f6b5d4c3b2a19",
                              "offset": 8192 * f, "length": 900, "plain_length": 8192}]}
                 for f in range(FILES)]
        manifest = {"manifest_version": 2, "id": stamp, "label": "bench", "keep": False,
                    "start_lsn": lsn(start_seg * SEG + 0x28), "start_timeline": 1,
                    "stop_lsn": lsn(start_seg * SEG + 0x138), "stop_timeline": 1,
                    "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                    "stop_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 60)),
                    "stop_next_xid": None, "system_identifier": "7311245606442982531",
                    "pg_version_num": 150018, "wal_segment_size": SEG, "tablespaces": [],
                    "files": files, "size_bytes": 8192 * FILES, "new_bytes": 900 * FILES}
        write(root, f"backups/{stamp}/manifest.json", json.dumps(manifest).encode())


def timed(args, env):
    t0 = time.perf_counter()
    p = subprocess.run([os.path.join(TARGET, "pgpitr")] + args, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 1, 2):
        raise SystemExit(f"pgpitr {args} failed: {p.stderr}")
    return dt, p.stdout


def main():
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "repo")
        t0 = time.perf_counter()
        build(root)
        built = time.perf_counter() - t0
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGPITR_")}
        env["PGPITR_REPO"] = root
        rows = []
        for name, args in (("pgpitr metrics", ["metrics"]), ("pgpitr status", ["status", "--json"])):
            timed(args, env)
            runs = [timed(args, env) for _ in range(ROUNDS)]
            out = runs[-1][1]
            if name == "pgpitr metrics":
                assert "pgpitr_repository_up{" in out and f"pgpitr_backups{{" in out, out[:2000]
                scan = [l for l in out.splitlines() if l.startswith("pgpitr_scan_duration_seconds")]
            rows.append((name, statistics.median(r[0] for r in runs)))
        print(f"Scan of a local repository: {WAL} WAL objects, {BACKUPS} backups of {FILES} files"
              f" (built in {built:.0f} s); median of {ROUNDS} runs, page cache warm.\n")
        print("| command | wall time |\n|---|---|")
        for name, t in rows:
            print(f"| `{name}` | {t:.2f} s |")
        if scan:
            print(f"\nThe last run's own `{scan[0].split('}')[0]}}}`: {scan[0].split()[-1]} s.")


main()
