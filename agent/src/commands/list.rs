//! `pgpitr list`: the repository's backups (from `backups/*/manifest.json`, the committed ones
//! only), its archived WAL per timeline, and the recoverable window per timeline (computed by
//! [`crate::recovery::window`], with the planner's rules): the window, then, newest first, the
//! older stretches that are recoverable without a gap (isolated consistent ends of backups kept
//! outside a WAL window, `keep_wal_within`). `--json` prints one JSON document:
//! `{"backups": [...], "wal": [...], "windows": [...], "restore_points": [...]}`; restore points
//! are those whose WAL is still archived, the names `--target-name` can reach.

use serde::Serialize;

use crate::config::{Config, ConfigError};
use crate::pg::{Lsn, RestorePointRecord, TimelineId};
use crate::recovery::source::{load_histories, load_manifests, partition_by_wal};
use crate::recovery::{archived_wal_ranges, recoverable_windows, BackupSummary};
use crate::recovery::{RecoverableWindow, TimelineWal};
use crate::repo::manifest::BackupId;
use crate::repo::{layout, lease, restore_points, wal, RepoError, RepoIdentity};
use crate::storage::StorageError;

use super::backup::human_bytes;

#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<StorageError> for ListError {
    fn from(e: StorageError) -> Self {
        ListError::Repo(e.into())
    }
}

/// One backup as listed.
#[derive(Debug, Clone, Serialize)]
pub struct BackupLine {
    pub id: BackupId,
    pub label: String,
    pub keep: bool,
    pub start_time: jiff::Timestamp,
    pub stop_time: jiff::Timestamp,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_timeline: TimelineId,
    pub stop_timeline: TimelineId,
    /// `15.14`-style.
    pub pg_version: String,
    pub pg_version_num: u32,
    pub files: usize,
    pub size_bytes: u64,
    pub new_bytes: u64,
    /// The backup an incremental backup was taken against (it is complete without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<BackupId>,
}

/// Everything `list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub backups: Vec<BackupLine>,
    pub wal: Vec<TimelineWal>,
    pub windows: Vec<RecoverableWindow>,
    pub restore_points: Vec<RestorePointRecord>,
    /// Active leases of restores, which `expire` honours (see `repo::lease`), described.
    pub leases: Vec<String>,
}

/// Reads the listing.
///
/// # Errors
/// Configuration and storage errors, a repository without `repo.json`, unreadable manifests.
pub async fn run(config: &Config) -> Result<Listing, ListError> {
    let storage = config.storage().await?;
    let identity = RepoIdentity::load(storage.as_ref()).await?;
    let seg_size = identity.wal_segment_size;
    let manifests = load_manifests(storage.as_ref()).await?;
    let listing = wal::list(storage.as_ref(), layout::WAL_ROOT).await?;
    let histories = load_histories(storage.as_ref(), &listing).await?;
    let summaries: Vec<BackupSummary> = manifests.iter().map(BackupSummary::from).collect();
    let windows = recoverable_windows(&summaries, &listing, &histories, seg_size);
    let wal = archived_wal_ranges(&listing, seg_size);
    let indexed = restore_points::load(storage.as_ref()).await?;
    let (held, _) = partition_by_wal(&indexed, &listing, seg_size);
    let restore_points = held.into_iter().cloned().collect();
    let backups = manifests
        .iter()
        .map(|m| BackupLine {
            id: m.id.clone(),
            label: m.label.clone(),
            keep: m.keep,
            start_time: m.start_time,
            stop_time: m.stop_time,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            start_timeline: m.start_timeline,
            stop_timeline: m.stop_timeline,
            pg_version: pg_version(m.pg_version_num),
            pg_version_num: m.pg_version_num,
            files: m.files.len(),
            size_bytes: m.size_bytes,
            new_bytes: m.new_bytes,
            incremental_from: m.incremental_from.clone(),
        })
        .collect();
    // Read-only: judged by this host's clock (expire judges by the storage's).
    let leases = lease::hold(
        &lease::list(storage.as_ref()).await?,
        jiff::Timestamp::now(),
    )
    .leases;
    Ok(Listing {
        backups,
        wal,
        windows,
        restore_points,
        leases,
    })
}

/// `150014` → `15.14`.
fn pg_version(num: u32) -> String {
    format!("{}.{}", num / 10000, num % 10000)
}

fn time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// The text form of a listing.
pub fn render(l: &Listing) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if l.backups.is_empty() {
        s.push_str("no backups\n");
    } else {
        let _ = writeln!(
            s,
            "{:<16}  {:<19}  {:<19}  {:>12}  {:>12}  {:>3}  {:>6}  {:>10}  {:>10}  LABEL",
            "BACKUP",
            "START (UTC)",
            "STOP (UTC)",
            "START LSN",
            "STOP LSN",
            "TLI",
            "PG",
            "SIZE",
            "NEW"
        );
        for b in &l.backups {
            let _ = writeln!(
                s,
                "{:<16}  {:<19}  {:<19}  {:>12}  {:>12}  {:>3}  {:>6}  {:>10}  {:>10}  {}{}",
                b.id.0,
                time(b.start_time),
                time(b.stop_time),
                b.start_lsn.to_string(),
                b.stop_lsn.to_string(),
                b.stop_timeline.0,
                b.pg_version,
                human_bytes(b.size_bytes),
                human_bytes(b.new_bytes),
                b.label,
                match (&b.incremental_from, b.keep) {
                    (Some(p), true) => format!(" (incremental from {p}, keep)"),
                    (Some(p), false) => format!(" (incremental from {p})"),
                    (None, true) => " (keep)".to_string(),
                    (None, false) => String::new(),
                }
            );
        }
    }
    s.push_str("\narchived WAL:\n");
    if l.wal.is_empty() {
        s.push_str("  none\n");
    }
    for t in &l.wal {
        let _ = write!(
            s,
            "  timeline {}: {} .. {} ({} segments, {})",
            t.timeline.0,
            t.first,
            t.last,
            t.segments,
            human_bytes(t.bytes)
        );
        match t.gaps.len() {
            0 => s.push('\n'),
            n => {
                let g = &t.gaps[0];
                let _ = writeln!(
                    s,
                    "; {n} gap(s), first {} .. {} missing",
                    g.first_missing, g.last_missing
                );
            }
        }
    }
    s.push_str("\nrecoverable window:\n");
    let mut any = false;
    for w in &l.windows {
        // With more than one range, the newest is the window and the older ones follow.
        let earliest = w.continuous_from();
        match (earliest, &w.latest) {
            (Some(e), Some(latest)) => {
                any = true;
                let _ = writeln!(
                    s,
                    "  timeline {}: from {} UTC (end of backup {}, {}) to {} (end of archived WAL, segment {})",
                    w.timeline.0,
                    time(e.time),
                    e.backup,
                    e.lsn,
                    latest.end_lsn,
                    latest.last_segment
                );
            }
            (Some(e), None) => {
                any = true;
                let _ = writeln!(
                    s,
                    "  timeline {}: from {} UTC (end of backup {}, {})",
                    w.timeline.0,
                    time(e.time),
                    e.backup,
                    e.lsn
                );
            }
            _ => {}
        }
        for r in w.older_ranges().iter().rev() {
            if r.point {
                let _ = writeln!(
                    s,
                    "  timeline {}: before that, only at {} UTC (end of backup {}, {}): its consistent end (--backup {} --target immediate)",
                    w.timeline.0,
                    time(r.from.time),
                    r.from.backup,
                    r.from.lsn,
                    r.from.backup
                );
            } else {
                let _ = writeln!(
                    s,
                    "  timeline {}: before that, from {} to {}",
                    w.timeline.0,
                    r.describe_from(),
                    r.describe_to()
                );
            }
        }
        for i in &w.incomplete {
            let _ = writeln!(
                s,
                "  timeline {}: backup {} is not restorable yet: WAL segment {} is missing",
                w.timeline.0, i.backup, i.missing
            );
        }
    }
    if !any {
        s.push_str("  none: no backup with all of its WAL archived\n");
    }
    if !l.restore_points.is_empty() {
        s.push_str("\nrestore points:\n");
        for p in &l.restore_points {
            let _ = writeln!(
                s,
                "  {} UTC  timeline {}  {:>12}  {:?}",
                time(p.time),
                p.timeline,
                p.lsn.to_string(),
                p.name
            );
        }
    }
    if !l.leases.is_empty() {
        s.push_str(
            "
leases (expire keeps what they hold):
",
        );
        for l in &l.leases {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_empty_listing() {
        assert_eq!(pg_version(150014), "15.14");
        assert_eq!(pg_version(180000), "18.0");
        let text = render(&Listing {
            backups: Vec::new(),
            wal: Vec::new(),
            windows: Vec::new(),
            restore_points: Vec::new(),
            leases: Vec::new(),
        });
        assert!(text.contains("no backups"), "{text}");
        assert!(!text.contains("leases"), "{text}");
        assert!(text.contains("none: no backup"), "{text}");
        assert!(!text.contains("restore points"), "{text}");
    }

    #[test]
    fn restore_points_are_listed_with_their_names_quoted() {
        let text = render(&Listing {
            backups: Vec::new(),
            wal: Vec::new(),
            windows: Vec::new(),
            restore_points: vec![RestorePointRecord {
                name: "nightly 'x'".into(),
                lsn: Lsn(0x6000_40D8),
                timeline: TimelineId(2),
                time: "2026-11-23T19:57:47Z".parse().unwrap(),
            }],
            leases: vec!["leases/x.lease (restore …): backup B".into()],
        });
        assert!(
            text.contains("leases (expire keeps what they hold):\n  leases/x.lease"),
            "{text}"
        );
        assert!(
            text.contains("restore points:\n  2026-11-23 19:57:47 UTC  timeline 2    0/600040D8  \"nightly 'x'\"\n"),
            "{text}"
        );
    }
}
