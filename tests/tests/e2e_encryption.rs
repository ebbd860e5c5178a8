//! End to end: an encrypted repository on real PostgreSQL 15, local and on Garage (S3).
//!
//! - `pgpitr init --encrypt` (local) or `pgpitr key create` (Garage) makes the key; a cluster
//!   archives through `pgpitr-archive`, `pgpitr backup` takes a base backup, marker rows carry
//!   random canary values; a point-in-time restore to a moment between two markers gives
//!   exactly the markers before it.
//! - Every stored byte is scanned: no canary value, no table name, and neither the SHA-256 of a
//!   WAL file that holds them (in hex or raw) nor its hex in any object name. The same scan finds
//!   the canary in that WAL file as `pgpitr-restore` delivers it, so the scan can see.
//! - Misuse (local): no passphrase, a wrong one, a plaintext push into the encrypted repository
//!   and an encrypted push into a plaintext one are refused with nothing written; a tampered
//!   WAL object makes `pgpitr-restore` exit 202 and `verify` name it; rotation (add a
//!   passphrase, remove the old one, restore with the new one, the old one refused); the last
//!   slot cannot be removed.

use std::path::Path;
use std::process::Command;

use pgpitr_tests::cli::{
    archiving_cluster, conninfo, local_repo, passphrase_file, pgpitr, pgpitr_ok, repo_env, text,
    with_passphrase, Env,
};
use pgpitr_tests::garage::Garage;
use pgpitr_tests::pg::Cluster;
use pgpitr_tests::{bin, files_under, give_to_pg_user, temp_dir, PG_USER};
use sha2::{Digest, Sha256};

const TABLE: &str = "canary_ledger_q7";

/// What the workload wrote: canary values, a target time and the markers before it, and the
/// WAL segment that holds the canaries.
struct Workload {
    canaries: Vec<String>,
    target: String,
    expected: String,
    canary_segment: String,
}

/// A backup, then marker rows 1..=4 each with a random canary value, a WAL switch after each.
fn workload(env: &Env, c: &Cluster) -> Workload {
    c.psql(&format!(
        "CREATE TABLE {TABLE} (id int PRIMARY KEY, t timestamptz NOT NULL, canary text NOT NULL)"
    ));
    let mut benv = env.clone();
    benv.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    pgpitr_ok(&benv, &["backup", "--checkpoint", "fast"]);
    let mut canary_segment = String::new();
    for id in 1..=4 {
        c.psql(&format!(
            "INSERT INTO {TABLE} VALUES ({id}, clock_timestamp(), 'cnry' || md5(random()::text) || md5(random()::text))"
        ));
        if id == 2 {
            canary_segment = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
        }
        c.psql("SELECT pg_sleep(0.05)");
        c.psql("SELECT pg_switch_wal()");
    }
    c.wait_archive_idle();
    let canaries = c
        .psql(&format!(
            "SELECT string_agg(canary, ',' ORDER BY id) FROM {TABLE}"
        ))
        .split(',')
        .map(str::to_string)
        .collect();
    let target = c.psql(&format!(
        "SELECT to_char((a.t + (b.t - a.t) / 2) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' \
         FROM {TABLE} a JOIN {TABLE} b ON b.id = a.id + 1 WHERE a.id = 2"
    ));
    Workload {
        canaries,
        target,
        expected: "1,2".into(),
        canary_segment,
    }
}

/// A point-in-time restore to `w.target`, started: exactly the markers before it.
fn restore_and_check(env: &Env, w: &Workload) {
    let root = temp_dir("enc-restore");
    let data = root.path().join("data");
    pgpitr_ok(
        env,
        &[
            "restore",
            "--target-time",
            &w.target,
            "--pgdata",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
            "--owner",
            PG_USER,
        ],
    );
    let mut r = Cluster::adopt(15, root, data);
    // The restored server's restore_command reads the repository with the passphrase file
    // named in pgpitr-restore.toml: no PGPITR_* variable, only S3 credentials.
    r.env = env
        .iter()
        .filter(|(k, _)| !k.starts_with("PGPITR_"))
        .cloned()
        .collect();
    r.start();
    assert!(
        r.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "recovery did not finish:\n{}",
        r.log()
    );
    assert_eq!(
        r.psql(&format!(
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM {TABLE}"
        )),
        w.expected
    );
}

/// `segment` as `pgpitr-restore` delivers it (plain), fetched into a scratch directory that
/// looks like the cluster's data directory.
fn fetch_plain(env: &Env, c: &Cluster, segment: &str) -> Vec<u8> {
    let out = run_restore_command(env, c, segment);
    assert!(out.0 == Some(0), "pgpitr-restore {segment}: {}", out.1);
    out.2
}

/// Runs `pgpitr-restore <segment> <dest>` in a scratch directory holding a copy of `c`'s
/// `global/pg_control`; exit code, output, and the file delivered.
fn run_restore_command(env: &Env, c: &Cluster, segment: &str) -> (Option<i32>, String, Vec<u8>) {
    let scratch = temp_dir("enc-fetch");
    std::fs::create_dir_all(scratch.path().join("global")).unwrap();
    std::fs::create_dir_all(scratch.path().join("pg_wal")).unwrap();
    std::fs::copy(
        c.data.join("global/pg_control"),
        scratch.path().join("global/pg_control"),
    )
    .unwrap();
    let dest = format!("pg_wal/{segment}");
    let out = Command::new(bin("pgpitr-restore"))
        .args([segment, &dest])
        .current_dir(scratch.path())
        .env_remove("PGPITR_CONFIG")
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let got = std::fs::read(scratch.path().join(&dest)).unwrap_or_default();
    (out.status.code(), text(&out), got)
}

/// Asserts that no stored object (name, bytes) holds a canary, the table's name, or the
/// SHA-256 of `plain_wal`; and that `plain_wal` itself holds a canary (the scan can see).
fn assert_nothing_readable(objects: &[(String, Vec<u8>)], w: &Workload, plain_wal: &[u8]) {
    let sha = Sha256::digest(plain_wal);
    let sha_hex = hex::encode(sha);
    let found_in_plain = w
        .canaries
        .iter()
        .filter(|c| contains(plain_wal, c.as_bytes()))
        .count();
    assert!(
        found_in_plain > 0,
        "the scan finds no canary even in plain WAL"
    );
    let mut needles: Vec<Vec<u8>> = w.canaries.iter().map(|c| c.as_bytes().to_vec()).collect();
    needles.push(TABLE.as_bytes().to_vec());
    needles.push(sha_hex.as_bytes().to_vec());
    needles.push(sha.to_vec());
    assert!(objects.len() >= 8, "only {} objects", objects.len());
    let mut bytes = 0;
    for (key, body) in objects {
        assert!(
            !key.contains(&sha_hex),
            "{key} names the WAL file's SHA-256"
        );
        for n in &needles {
            assert!(
                !contains(body, n),
                "{key} holds {:?} in the clear",
                String::from_utf8_lossy(n)
            );
        }
        bytes += body.len();
    }
    eprintln!("scanned {} objects, {bytes} bytes", objects.len());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn local_objects(repo: &Path) -> Vec<(String, Vec<u8>)> {
    files_under(repo)
        .into_iter()
        .map(|p| {
            let key = p.strip_prefix(repo).unwrap().display().to_string();
            (key, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn object_count(repo: &Path) -> usize {
    files_under(repo).len()
}

#[test]
fn encrypted_local_repository_end_to_end_with_misuse_and_rotation() {
    let (_keep, repo) = local_repo();
    let secrets = temp_dir("enc-secrets");
    give_to_pg_user(secrets.path());
    let old = passphrase_file(secrets.path(), "old", "correct horse battery staple");
    let cfg = secrets.path().join("pgpitr.toml");
    // init --encrypt writes the configuration and creates the key with the existing file.
    let out = pgpitr_ok(
        &Vec::new(),
        &[
            "init",
            "--output",
            cfg.to_str().unwrap(),
            "--repo",
            repo.to_str().unwrap(),
            "--encrypt",
            "--passphrase-file",
            old.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("created the key of encrypted repository"),
        "{out}"
    );
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.contains("encryption_passphrase_file"), "{written}");
    assert!(!written.contains("correct horse"), "{written}");
    let plain_env = repo_env(&repo);
    let env = with_passphrase(&plain_env, &old);
    let c = archiving_cluster(env.clone(), "");
    let w = workload(&env, &c);

    // Nothing in the clear.
    let plain_wal = fetch_plain(&env, &c, &w.canary_segment);
    assert_nothing_readable(&local_objects(&repo), &w, &plain_wal);
    let repo_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("repo.json")).unwrap()).unwrap();
    assert_eq!(
        repo_json["encryption"]["cipher"], "aes256gcm-hkdf-stream-64k",
        "{repo_json}"
    );

    // No passphrase, a wrong one: refused, nothing written.
    let out = pgpitr(&plain_env, &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is encrypted"), "{}", text(&out));
    let wrong = passphrase_file(secrets.path(), "wrong", "incorrect horse");
    let out = pgpitr(&with_passphrase(&plain_env, &wrong), &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("opens none of the 1 key slot"),
        "{}",
        text(&out)
    );
    let (code, out, _) = run_restore_command(&plain_env, &c, &w.canary_segment);
    assert_eq!(code, Some(200), "{out}");
    // A plaintext push into the encrypted repository: pgpitr-archive refuses (exit 2).
    // A record first: a switch out of an empty segment archives nothing.
    c.psql("CREATE TABLE after_workload (id int)");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);
    let before = object_count(&repo);
    let out = pgpitr_tests::as_pg_user(bin("pgpitr-archive"))
        .args([&format!("pg_wal/{seg}"), &seg])
        .current_dir(&c.data)
        .env_remove("PGPITR_CONFIG")
        .envs(plain_env.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("is encrypted"), "{}", text(&out));
    assert_eq!(object_count(&repo), before);
    // An encrypted push into a plaintext repository: refused too.
    let (_keep2, plain_repo) = local_repo();
    let out = pgpitr_tests::as_pg_user(bin("pgpitr-archive"))
        .args([&format!("pg_wal/{seg}"), &seg])
        .current_dir(&c.data)
        .env_remove("PGPITR_CONFIG")
        .envs(repo_env(&plain_repo))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let plain_count = object_count(&plain_repo);
    let out = pgpitr(&with_passphrase(&repo_env(&plain_repo), &old), &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is not encrypted"), "{}", text(&out));
    assert_eq!(object_count(&plain_repo), plain_count);

    // `check` says what it found, and names the setting when the passphrase is missing.
    for (e, ok, want) in [
        (&env, true, "encrypted repository"),
        (
            &plain_env,
            false,
            "is encrypted: set `encryption_passphrase_file`",
        ),
    ] {
        let out = pgpitr(e, &["check", "--json"]);
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let check = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "encryption")
            .unwrap_or_else(|| panic!("no encryption check: {checks}"))
            .clone();
        assert_eq!(check["ok"], ok, "{check}");
        assert!(check["detail"].as_str().unwrap().contains(want), "{check}");
    }

    // Rotation: add a passphrase, switch to it, remove the old one.
    let new = passphrase_file(secrets.path(), "new", "a wholly new passphrase");
    let out = pgpitr_ok(
        &env,
        &["key", "add", "--new-passphrase-file", new.to_str().unwrap()],
    );
    assert!(out.starts_with("added key slot"), "{out}");
    let slots: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&env, &["key", "list", "--json"])).unwrap();
    let slots = slots.as_array().unwrap().clone();
    assert_eq!(slots.len(), 2);
    let old_slot = slots.iter().find(|s| s["configured"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = pgpitr(&env, &["key", "remove", &old_slot]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the configured slot: {}",
        text(&out)
    );
    let new_env = with_passphrase(&plain_env, &new);
    pgpitr_ok(&new_env, &["key", "remove", &old_slot]);
    let out = pgpitr(&env, &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("opens none"), "{}", text(&out));
    let slots: serde_json::Value =
        serde_json::from_str(&pgpitr_ok(&new_env, &["key", "list", "--json"])).unwrap();
    let last = slots[0]["id"].as_str().unwrap().to_string();
    assert_eq!(slots.as_array().unwrap().len(), 1);
    let out = pgpitr(&new_env, &["key", "remove", &last]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("last"), "{}", text(&out));
    // The restore with the new passphrase.
    restore_and_check(&new_env, &w);

    // Another segment's object put in place of one (WAL objects carry their key in their last
    // segment only): pgpitr-restore exits 202.
    let wal = files_under(&repo.join("wal"));
    let key = wal
        .iter()
        .find(|p| p.to_string_lossy().contains(&w.canary_segment))
        .unwrap()
        .clone();
    let original = std::fs::read(&key).unwrap();
    let other = wal
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".lz4") && **p != key)
        .unwrap();
    std::fs::copy(other, &key).unwrap();
    let (code, out, _) = run_restore_command(&new_env, &c, &w.canary_segment);
    assert_eq!(code, Some(202), "{out}");
    assert!(out.contains("failed authentication"), "{out}");
    std::fs::write(&key, &original).unwrap();

    // A tampered WAL object: pgpitr-restore exits 202, verify names it.
    let mut bytes = original;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&key, &bytes).unwrap();
    let (code, out, _) = run_restore_command(&new_env, &c, &w.canary_segment);
    assert_eq!(code, Some(202), "{out}");
    assert!(out.contains("failed authentication"), "{out}");
    let out = pgpitr(&new_env, &["verify"]);
    assert!(!out.status.success(), "{}", text(&out));
    let name = key.strip_prefix(&repo).unwrap().display().to_string();
    assert!(
        text(&out).contains(&name),
        "verify does not name {name}: {}",
        text(&out)
    );
}

#[test]
fn encrypted_repository_on_garage_end_to_end() {
    let garage = Garage::shared();
    let bucket = garage.bucket();
    let secrets = temp_dir("enc-secrets");
    give_to_pg_user(secrets.path());
    let file = passphrase_file(secrets.path(), "passphrase", "garage passphrase");
    let env = with_passphrase(&garage.env(&bucket, "enc"), &file);
    let out = pgpitr_ok(&env, &["key", "create"]);
    assert!(out.contains("created the key"), "{out}");
    let c = archiving_cluster(env.clone(), "");
    let w = workload(&env, &c);
    restore_and_check(&env, &w);
    let plain_wal = fetch_plain(&env, &c, &w.canary_segment);
    let objects = pgpitr_tests::runtime().block_on(async {
        let client = garage.client();
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(&bucket)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            for o in page.contents() {
                let key = o.key().unwrap().to_string();
                let body = client
                    .get_object()
                    .bucket(&bucket)
                    .key(&key)
                    .send()
                    .await
                    .unwrap()
                    .body
                    .collect()
                    .await
                    .unwrap()
                    .into_bytes()
                    .to_vec();
                out.push((key, body));
            }
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        out
    });
    assert_nothing_readable(&objects, &w, &plain_wal);
}
