//! Chaos: `kill -9` of every writer at random moments (issue 16, item 1), with the same
//! invariants checked after each kill:
//!
//! - the next run of the killed command succeeds, with no manual step in between;
//! - `pgpitr verify` passes;
//! - every WAL file PostgreSQL has marked `.done` restores byte-identical;
//! - every listed backup restores (every chunk of it is fetched and checked);
//! - a killed `pgpitr restore` leaves a directory that PostgreSQL cannot start from (no
//!   `global/pg_control`) and that the next restore refuses, or one whose every file is whole.
//!
//! Writers: `pgpitr-archive` one file at a time and batching (on a local repository, an
//! encrypted local one and Garage), `pgpitr-restore` and its background refill, `pgpitr backup`, `pgpitr expire`,
//! `pgpitr restore` and `pgpitr drill` (against a real PostgreSQL 15). Kill moments are uniform over the
//! writer's own run time, measured first. The suite runs a small seeded sample; the seed is
//! printed (`CHAOS_SEED` replays a run) and `CHAOS_KILLS` sets the number of
//! kills per writer: `scripts/chaos` runs hundreds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgpitr_tests::chaos::{kills, run_killing, run_timed, Ending, Rng, Scale, Tally};
use pgpitr_tests::cli::{
    archiving_cluster, conninfo, local_repo, passphrase_file, pgpitr, pgpitr_cmd, pgpitr_ok,
    repo_env, text, with_passphrase, Env,
};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::wal::FakeDataDir;
use pgpitr_tests::{bin, files_under, temp_dir, PG_USER};

const SYSID: u64 = 7_400_000_000_000_000_077;
const SEG: u32 = 16 << 20;
/// Segments written and marked `.ready` ahead of the one archived, for batching calls to push.
const AHEAD: u64 = 6;

/// A data directory as far as the archive and restore commands look at it: `global/pg_control`
/// and `pg_wal/archive_status`, with synthetic segments that can be regenerated for comparison.
struct WalDir {
    fake: FakeDataDir,
    env: Env,
}

impl WalDir {
    fn new(env: Env) -> WalDir {
        WalDir {
            fake: FakeDataDir::new("chaos-wal", SYSID, SEG),
            env,
        }
    }

    fn name(&self, segno: u64) -> String {
        self.fake.segment_name(segno)
    }

    fn content(&self, segno: u64) -> Vec<u8> {
        self.fake.segment_bytes(segno, segno * 7919)
    }

    fn write_ready(&self, segno: u64) {
        let (name, _) = self.fake.write_segment(segno, segno * 7919);
        self.fake.mark_ready(&name);
    }

    /// What PostgreSQL does once archive_command succeeded and the segment is recycled later.
    fn done(&self, segno: u64) {
        let name = self.name(segno);
        self.fake.mark_done(&name);
        std::fs::remove_file(self.fake.status_file(&name, "done")).unwrap();
        std::fs::remove_file(self.fake.pgdata.join("pg_wal").join(&name)).unwrap();
    }

    fn cmd(&self, program: &str, args: &[&str], batch: u32) -> Command {
        let mut c = Command::new(bin(program));
        c.args(args)
            .current_dir(&self.fake.pgdata)
            .env_remove("PGPITR_CONFIG")
            .envs(self.env.iter().cloned())
            .env("PGPITR_ARCHIVE_BATCH", batch.to_string());
        c
    }

    fn archive(&self, segno: u64, batch: u32) -> Command {
        let name = self.name(segno);
        self.cmd("pgpitr-archive", &[&format!("pg_wal/{name}"), &name], batch)
    }

    fn restore(&self, segno: u64) -> Command {
        self.cmd(
            "pgpitr-restore",
            &[&self.name(segno), "pg_wal/RECOVERYXLOG"],
            1,
        )
    }

    fn refill_after(&self, segno: u64) -> Command {
        self.cmd(
            "pgpitr-restore",
            &["--refill", &self.name(segno), "pg_wal/RECOVERYXLOG"],
            1,
        )
    }

    fn restored(&self) -> PathBuf {
        self.fake.pgdata.join("pg_wal/RECOVERYXLOG")
    }
}

/// Runs the command `make` builds `attempts` times, each killed at a moment `scale` picks, and
/// then, unless one of them ended by itself, once more to its end, as PostgreSQL or a timer
/// would call it again. Every run that ended by itself must have succeeded: the next run
/// after a kill needs no manual step.
fn kill_then_rerun(
    make: impl Fn() -> Command,
    attempts: u64,
    scale: &mut Scale,
    rng: &mut Rng,
    tally: &mut Tally,
) {
    let replay = rng.replay();
    for _ in 0..attempts {
        let mut cmd = make();
        let ending = run_killing(&mut cmd, scale.pick(rng));
        tally.note(&ending);
        if let Ending::Finished(out, took) = ending {
            assert!(out.status.success(), "{cmd:?} {replay}: {}", text(&out));
            scale.learn(took);
            return;
        }
    }
    let mut cmd = make();
    let (out, took) = run_timed(&mut cmd);
    assert!(
        out.status.success(),
        "{cmd:?}, the run after a kill, {replay}: {}",
        text(&out)
    );
    scale.learn(took);
}

/// Archives segments the way PostgreSQL calls `archive_command` (in order, retrying a failed
/// call), killing one or two attempts of each at random moments; then restores each with
/// killed calls and killed refills in between, comparing bytes.
fn archive_and_restore_commands_under_kill_9(env: Env, tag: &str) {
    let mut rng = Rng::from_env(tag);
    let note = rng.replay();
    let n = kills(8) as u64;
    let wal = WalDir::new(env.clone());
    for s in 1..=1 + AHEAD {
        wal.write_ready(s);
    }
    // The scale of kill moments: calls that nobody kills, learned as they go.
    let mut scale = Scale::measure(&mut wal.archive(1, 1));
    wal.done(1);

    let mut tally = Tally::default();
    for segno in 2..=n + 1 {
        wal.write_ready(segno + AHEAD);
        let batch = if rng.chance(50) { 1 } else { 16 };
        let attempts = 1 + rng.below(2);
        kill_then_rerun(
            || wal.archive(segno, batch),
            attempts,
            &mut scale,
            &mut rng,
            &mut tally,
        );
        wal.done(segno);
    }
    tally.report(&format!("pgpitr-archive ({tag})"));
    let out = pgpitr(&env, &["verify"]);
    assert!(out.status.success(), "verify {note}: {}", text(&out));

    // Restore every archived segment, killing calls and refills in between.
    let mut scale = Scale::measure(&mut wal.restore(1));
    let mut refill_scale = Scale::measure(&mut wal.refill_after(1));
    let (mut calls, mut refills) = (Tally::default(), Tally::default());
    for segno in 1..=n + 1 {
        let _ = std::fs::remove_file(wal.restored());
        if segno > 1 && rng.chance(40) {
            let ending = run_killing(
                &mut wal.refill_after(segno - 1),
                refill_scale.pick(&mut rng),
            );
            if let Ending::Finished(_, took) = &ending {
                refill_scale.learn(*took);
            }
            refills.note(&ending);
        }
        let attempts = rng.below(2);
        kill_then_rerun(
            || wal.restore(segno),
            attempts,
            &mut scale,
            &mut rng,
            &mut calls,
        );
        assert!(
            std::fs::read(wal.restored()).unwrap() == wal.content(segno),
            "segment {segno} restored with other bytes {note}"
        );
    }
    calls.report(&format!("pgpitr-restore ({tag})"));
    refills.report(&format!("pgpitr-restore --refill ({tag})"));
    wait_for_refills(&wal);
}

/// Refills started by the calls outlive them; let them end before the directory goes.
fn wait_for_refills(wal: &WalDir) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let spool = wal.fake.pgdata.join("pg_wal/pgpitr_spool/restore");
    let locks: Vec<PathBuf> = std::fs::read_dir(&spool)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "lock"))
                .collect()
        })
        .unwrap_or_default();
    for lock in locks {
        while std::fs::File::open(&lock).unwrap().try_lock().is_err() {
            assert!(std::time::Instant::now() < deadline, "a refill never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn archive_and_restore_commands_survive_kill_9_on_local_directory() {
    let (_dir, repo) = local_repo();
    archive_and_restore_commands_under_kill_9(repo_env(&repo), "local");
}

/// The same on an encrypted repository, whose WAL objects are sealed and written segment by
/// segment while they are compressed (format 3), so that a kill leaves partly written ones.
#[test]
fn archive_and_restore_commands_survive_kill_9_on_an_encrypted_local_directory() {
    let (dir, repo) = local_repo();
    let passphrase = passphrase_file(dir.path(), "passphrase", "chaos passphrase");
    let env = with_passphrase(&repo_env(&repo), &passphrase);
    pgpitr_ok(&env, &["key", "create"]);
    archive_and_restore_commands_under_kill_9(env, "encrypted");
}

#[test]
fn archive_and_restore_commands_survive_kill_9_on_s3() {
    let g = Garage::shared();
    let bucket = g.bucket();
    archive_and_restore_commands_under_kill_9(g.env(&bucket, "chaos"), "s3");
}

/// The committed backups, oldest first.
fn backup_ids(env: &Env) -> Vec<String> {
    let out = pgpitr_ok(env, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ids: Vec<String> = v["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no backups array in {out}"))
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Every file under `dir` (relative paths) but the ones a restore writes after the backup's.
fn files_of(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_path_buf())
        .filter(|p| {
            !matches!(
                p.to_str().unwrap(),
                "postgresql.auto.conf" | "recovery.signal" | "pgpitr-restore.toml"
            )
        })
        .collect()
}

/// The invariants after a kill: verify passes, every `.done` WAL file still in `pg_wal`
/// restores byte-identical, and every listed backup restores (all its chunks checked).
fn check_invariants(env: &Env, c: &Cluster, note: &str) {
    c.wait_archive_idle();
    let out = pgpitr(env, &["verify"]);
    assert!(out.status.success(), "verify {note}: {}", text(&out));

    let scratch = temp_dir("chaos-check");
    let status = c.pg_wal().join("archive_status");
    let mut compared = 0;
    for e in std::fs::read_dir(&status).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(wal) = name.strip_suffix(".done") else {
            continue;
        };
        let Ok(original) = std::fs::read(c.pg_wal().join(wal)) else {
            continue; // recycled since
        };
        let dest = scratch.path().join(wal);
        let out = Command::new(bin("pgpitr-restore"))
            .args([wal, dest.to_str().unwrap()])
            .current_dir(c.path())
            .env_remove("PGPITR_CONFIG")
            .envs(env.iter().cloned())
            .env("PGPITR_RESTORE_PREFETCH", "0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restoring {wal} {note}: {}",
            text(&out)
        );
        assert!(
            std::fs::read(&dest).unwrap() == original,
            "{wal} restores with other bytes than PostgreSQL archived {note}"
        );
        compared += 1;
    }
    assert!(compared > 0, "no .done WAL file to compare {note}");

    for id in backup_ids(env) {
        let dir = scratch.path().join(format!("restore-{id}"));
        pgpitr_ok(
            env,
            &[
                "restore",
                "--backup",
                &id,
                "--target",
                "immediate",
                "--pgdata",
                dir.to_str().unwrap(),
            ],
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn backup_expire_and_restore_survive_kill_9() {
    let mut rng = Rng::from_env("backup-expire-restore");
    let note = rng.replay();
    let rounds = kills(3);
    let (_repo_dir, repo) = local_repo();
    let env = repo_env(&repo);
    let c = archiving_cluster(env.clone(), "");
    c.psql("CREATE TABLE t (i int)");
    c.psql("INSERT INTO t SELECT generate_series(1, 1000)");
    run_ok_pgbench(&c);

    let mut backup_env = env.clone();
    backup_env.push(("PGPITR_CONNINFO".into(), conninfo(&c)));
    let backup_args = ["backup", "--checkpoint", "fast"];
    let mut backup_scale = Scale::measure(&mut pgpitr_cmd(&backup_env, &backup_args));
    let expire_args = ["expire", "--keep-last", "2"];
    let restore_into = |dir: &Path| {
        pgpitr_cmd(
            &env,
            &[
                "restore",
                "--target",
                "immediate",
                "--pgdata",
                dir.to_str().unwrap(),
            ],
        )
    };
    let scratch = temp_dir("chaos-restore");
    let mut restore_scale = Scale::measure(&mut restore_into(&scratch.path().join("first")));
    let mut expire_scale = Scale::measure(&mut pgpitr_cmd(&env, &expire_args));

    let (mut backups, mut expires, mut restores, mut drills) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    let drill_scratch = scratch.path().join("drills");
    std::fs::create_dir(&drill_scratch).unwrap();
    pgpitr_tests::give_to_pg_user(&drill_scratch);
    let mut drill_scale = Scale::measure(&mut pgpitr_cmd(
        &env,
        &[
            "drill",
            "--target",
            "latest",
            "--scratch",
            drill_scratch.to_str().unwrap(),
        ],
    ));
    let mut rows = 1000;
    for round in 0..rounds {
        c.psql(&format!(
            "INSERT INTO t SELECT generate_series({}, {})",
            rows + 1,
            rows + 500
        ));
        rows += 500;

        // backup: killed, then the next one succeeds (the dead holder's lock is broken by it).
        let attempts = 1 + rng.below(2);
        kill_then_rerun(
            || pgpitr_cmd(&backup_env, &backup_args),
            attempts,
            &mut backup_scale,
            &mut rng,
            &mut backups,
        );
        check_invariants(&env, &c, &note);

        // expire (one backup to delete each round): killed, then the next one succeeds.
        kill_then_rerun(
            || pgpitr_cmd(&env, &expire_args),
            1,
            &mut expire_scale,
            &mut rng,
            &mut expires,
        );
        check_invariants(&env, &c, &note);

        // restore: a killed one leaves a directory that cannot pass for a complete one.
        let killed_dir = scratch.path().join(format!("killed-{round}"));
        let ending = run_killing(&mut restore_into(&killed_dir), restore_scale.pick(&mut rng));
        restores.note(&ending);
        let whole = scratch.path().join(format!("whole-{round}"));
        pgpitr_ok(
            &env,
            &[
                "restore",
                "--target",
                "immediate",
                "--pgdata",
                whole.to_str().unwrap(),
            ],
        );
        match ending {
            Ending::Finished(out, took) => {
                assert!(out.status.success(), "restore {note}: {}", text(&out));
                restore_scale.learn(took);
            }
            Ending::Killed if killed_dir.join("global/pg_control").exists() => {
                // Written last: everything else must be whole.
                let (got, want) = (files_of(&killed_dir), files_of(&whole));
                assert_eq!(
                    got, want,
                    "a killed restore with pg_control lacks files {note}"
                );
                for f in &want {
                    assert!(
                        std::fs::read(killed_dir.join(f)).unwrap()
                            == std::fs::read(whole.join(f)).unwrap(),
                        "{} differs in a killed restore that has pg_control {note}",
                        f.display()
                    );
                }
            }
            Ending::Killed => {
                let empty = std::fs::read_dir(&killed_dir).map_or(true, |mut d| d.next().is_none());
                let label = killed_dir.join("backup_label").exists();
                let again = pgpitr(
                    &env,
                    &[
                        "restore",
                        "--target",
                        "immediate",
                        "--pgdata",
                        killed_dir.to_str().unwrap(),
                    ],
                );
                let all = text(&again);
                if empty {
                    // Killed before it wrote anything: the next restore simply does the work.
                    assert!(again.status.success(), "restore {note}: {all}");
                } else {
                    let why = if label {
                        "interrupted restore"
                    } else {
                        "not empty"
                    };
                    assert!(
                        !again.status.success() && all.contains(why),
                        "a restore into a killed restore's directory must be refused ({why}) {note}: {all}"
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&killed_dir);
        std::fs::remove_dir_all(&whole).unwrap();

        // drill: killed (its scratch server, if it started one, lives on: nothing can clean up
        // after SIGKILL), then the next drill passes beside it and records its result.
        let drills_dir = scratch.path().join(format!("drills-{round}"));
        std::fs::create_dir(&drills_dir).unwrap();
        pgpitr_tests::give_to_pg_user(&drills_dir);
        let drill_args = [
            "drill",
            "--target",
            "latest",
            "--scratch",
            drills_dir.to_str().unwrap(),
        ];
        kill_then_rerun(
            || pgpitr_cmd(&env, &drill_args),
            1,
            &mut drill_scale,
            &mut rng,
            &mut drills,
        );
        stop_leftover_servers(&drills_dir);
        let _ = std::fs::remove_dir_all(&drills_dir);
        // A killed drill's lease keeps its backup for --recovery-lease (7 days) and every listed
        // backup is restored below: lift the leases so that a long run does not grow with them.
        pgpitr_ok(&env, &["unlock", "--leases"]);
        check_invariants(&env, &c, &note);
    }
    backups.report("pgpitr backup");
    expires.report("pgpitr expire");
    restores.report("pgpitr restore");
    drills.report("pgpitr drill");

    // The end of the story: the newest backup and all WAL recover every row.
    c.psql("SELECT pg_switch_wal()");
    c.wait_archive_idle();
    let root = temp_dir("chaos-final");
    let data = root.path().join("data");
    pgpitr_ok(
        &env,
        &[
            "restore",
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let mut restored = Cluster::adopt(15, root, data);
    restored.start();
    assert!(
        restored.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the final restore did not finish recovery:\n{}",
        restored.log()
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM t").trim(),
        rows.to_string(),
        "{note}"
    );
}

/// Stops the PostgreSQL servers that drills killed with SIGKILL left running in their scratch
/// directories under `dir` (`<dir>/pgpitr-drill-*/data`).
fn stop_leftover_servers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let data = e.path().join("data");
        if data.join("postmaster.pid").exists() {
            let _ = pgpitr_tests::as_pg_user(pgpitr_tests::pg::bin_dir(15).join("pg_ctl"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&data)
                .output();
        }
    }
}

/// Some bulk, so that a backup takes long enough to be killed in the middle of its files.
fn run_ok_pgbench(c: &Cluster) {
    pgpitr_tests::run_ok(c.pgbench().args(["-i", "-s", "3", "-q", "postgres"]));
}
