//! The point-in-time restore story shared by the per-major and the standby tests: marker rows
//! committed one transaction each and stamped with `clock_timestamp()`, a time target halfway
//! between two of them, the exact markers a restored server must hold, and `pg_amcheck` (or
//! amcheck's B-tree check on PostgreSQL 13, whose amcheck has no heap check) as the judge of
//! what it holds.

use std::path::Path;
use std::process::Command;

use crate::cli::{conninfo, pgpitr_ok, Env};
use crate::pg::{client_bin, Cluster};
use crate::{run_ok, PG_USER};

/// Creates table `marker` and procedure `markers(n)`, which commits `n` marker rows one
/// transaction each, 40 ms apart (so that a time between two commits exists, with room for a
/// busy machine to delay a commit after its stamp).
pub fn create_markers(c: &Cluster) {
    c.psql("CREATE TABLE marker (id serial PRIMARY KEY, t timestamptz NOT NULL)");
    c.psql(
        "CREATE PROCEDURE markers(n int) LANGUAGE plpgsql AS $$ BEGIN \
           FOR i IN 1..n LOOP \
             INSERT INTO marker(t) VALUES (clock_timestamp()); COMMIT; \
             PERFORM pg_sleep(0.04); \
           END LOOP; END $$",
    );
}

/// Commits `n` more markers.
pub fn add_markers(c: &Cluster, n: u32) {
    c.psql(&format!("CALL markers({n})"));
}

/// The `nth` marker id (1-based, in id order): ids jump after a restore (a sequence logs values
/// ahead), so tests name markers by position.
pub fn nth_marker(c: &Cluster, nth: u32) -> i64 {
    c.psql(&format!(
        "SELECT id FROM marker ORDER BY id OFFSET {} LIMIT 1",
        nth - 1
    ))
    .parse()
    .unwrap_or_else(|_| panic!("no marker number {nth}"))
}

/// A time halfway between marker `id` and the next one, as PostgreSQL prints timestamptz in
/// UTC, and the markers committed at or before it (`1,2,3,…`).
pub fn target_after_marker(c: &Cluster, id: i64) -> (String, String) {
    let target = c.psql(&format!(
        "SELECT to_char((a.t + (b.t - a.t) / 2) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00' \
         FROM marker a JOIN marker b ON b.id = (SELECT min(id) FROM marker WHERE id > a.id) \
         WHERE a.id = {id}"
    ));
    assert!(!target.is_empty(), "no marker {id} with a successor");
    (target.clone(), marker_ids(c, Some(&target)))
}

/// The marker ids (`1,2,3,…`), all or those with `t <= until`.
pub fn marker_ids(c: &Cluster, until: Option<&str>) -> String {
    let filter = until
        .map(|u| format!("WHERE t <= '{u}'::timestamptz"))
        .unwrap_or_default();
    c.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker {filter}"
    ))
}

/// Switches to a new segment and waits until everything written so far is archived. A WAL
/// record is written first: at a segment's very start (just after `archive_timeout` switched)
/// `pg_switch_wal()` switches nothing, and that segment would never be archived.
pub fn archive_everything(c: &Cluster) {
    c.psql("SELECT pg_logical_emit_message(false, 'pgpitr-test', 'switch')");
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    c.psql("SELECT pg_switch_wal()");
    c.wait_archived(&seg);
}

/// Waits until a restored server has ended recovery.
pub fn wait_promoted(c: &Cluster) {
    assert!(
        c.wait_for("SELECT pg_is_in_recovery()", "f", 300),
        "the restored server did not finish recovery:\n{}",
        c.log()
    );
}

/// The timeline `c` writes on now.
pub fn timeline(c: &Cluster) -> u32 {
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    u32::from_str_radix(&seg[..8], 16).unwrap()
}

/// PostgreSQL's own check of `c`: `pg_amcheck` (heap and B-tree, every database, amcheck
/// installed on the way) from 14 on; on 13, whose amcheck has no heap check (`pg_amcheck`
/// refuses it), `bt_index_check(heapallindexed)` on every B-tree index of `postgres`, which also
/// proves that every heap tuple is indexed.
pub fn amcheck(c: &Cluster) {
    if c.major >= 14 {
        run_ok(
            Command::new(client_bin("pg_amcheck"))
                .args(["-U", "postgres", "-h"])
                .arg(&c.socket_dir)
                .args(["-p", &c.port.to_string()])
                .args(["--install-missing", "--heapallindexed", "--all"]),
        );
    } else {
        c.psql("CREATE EXTENSION IF NOT EXISTS amcheck");
        let checked = c.psql(
            "SELECT count(bt_index_check(i.indexrelid, true)) FROM pg_index i \
             JOIN pg_class r ON r.oid = i.indexrelid JOIN pg_am a ON a.oid = r.relam \
             WHERE a.amname = 'btree' AND r.relpersistence <> 't'",
        );
        assert!(checked.parse::<u32>().unwrap() > 0, "no index checked");
    }
}

/// `pgpitr backup --checkpoint fast` of `c` into the repository of `env`; the backup id.
pub fn backup(env: &Env, c: &Cluster) -> String {
    let mut env = env.clone();
    env.push(("PGPITR_CONNINFO".into(), conninfo(c)));
    pgpitr_ok(&env, &["backup", "--checkpoint", "fast", "--label", "e2e"])
        .trim()
        .to_string()
}

/// `pgpitr restore <target> --pgdata <data> --target-action promote --owner postgres <extra>`,
/// which must succeed; its standard output.
pub fn restore_promoting(env: &Env, target: &[&str], data: &Path, extra: &[&str]) -> String {
    let mut args = vec!["restore"];
    args.extend_from_slice(target);
    args.extend(["--pgdata", data.to_str().unwrap()]);
    args.extend(["--target-action", "promote", "--owner", PG_USER]);
    args.extend_from_slice(extra);
    pgpitr_ok(env, &args)
}

/// Restores `target` into a new directory and starts it (with `server_env`, e.g. the repository
/// for `--archive-mode preserve`); returns the promoted server.
pub fn restore_and_start(
    major: u32,
    env: &Env,
    target: &[&str],
    extra: &[&str],
    server_env: &Env,
) -> (Cluster, String) {
    let root = crate::temp_dir("restore");
    let data = root.path().join("data");
    let report = restore_promoting(env, target, &data, extra);
    let mut c = Cluster::adopt(major, root, data);
    c.env = server_env.clone();
    c.start();
    wait_promoted(&c);
    (c, report)
}
