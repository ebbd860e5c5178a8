//! What `pgpitr copy` sends to one copy: a pure function of what the repository and the copy
//! hold and of the copy's retention policy.
//!
//! Rules:
//! - the backups are those the copy's policy keeps ([`crate::retention::decide`]) among the
//!   repository's and the copy's backups together, so that a backup the copy keeps longer than
//!   the repository does is judged as the copy's own `expire` will judge it; with no policy at
//!   all, every backup. Those the copy lacks are sent;
//! - the WAL is every file of the repository that no kept backup needs to lose
//!   ([`crate::retention::expirable_wal`] over the kept backups), `.history` files always,
//!   oldest position first; with no backup at all, every WAL file;
//! - a pack goes with a backup that references it, unless the copy holds both the pack and its
//!   index;
//! - a restore point goes when its WAL file is in the copy or being sent;
//! - a WAL file name stored in the copy with other content than in the repository (not a
//!   `.partial` file, of which several contents may coexist) is a conflict: never sent, since a
//!   second content would make the name ambiguous in the copy.

use std::collections::{BTreeSet, HashSet};

use crate::pg::{RestorePointRecord, WalFileName};
use crate::recovery::source::{partition_by_wal, RepoState};
use crate::repo::layout;
use crate::repo::manifest::{BackupId, BackupManifest};
use crate::repo::wal::ArchivedWal;
use crate::retention::{self, PolicyError, RetentionPolicy};

/// One backup to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupToSend {
    pub id: BackupId,
    /// Every pack its manifest references, sorted.
    pub packs: Vec<String>,
}

/// What to send, in the order it must arrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub restore_points: Vec<RestorePointRecord>,
    /// `.history` files, by timeline.
    pub histories: Vec<ArchivedWal>,
    /// Segments, `.partial` and `.backup` files, by position (segment number), then name.
    pub wal: Vec<ArchivedWal>,
    /// Packs whose pack or index the copy lacks (ids, sorted).
    pub packs: Vec<String>,
    /// Oldest first.
    pub backups: Vec<BackupToSend>,
    /// Backups of the repository the copy's policy keeps and the copy holds already.
    pub present: Vec<BackupId>,
    /// Backups of the repository the copy's policy does not keep.
    pub not_kept: Vec<BackupId>,
    /// WAL files stored in the copy with other content.
    pub conflicts: Vec<WalFileName>,
    /// Objects the copy already holds among those the kept backups need.
    pub skipped: u64,
}

/// What to send from `source` to a copy holding `target` (its state) and the object keys
/// `target_keys` (every key under `packs/` and `backups/` at least).
///
/// # Errors
/// None with `policy` `None`; [`PolicyError`] only as [`crate::retention::decide`] returns it.
pub fn select(
    source: &RepoState,
    target: &RepoState,
    target_keys: &HashSet<String>,
    policy: Option<&RetentionPolicy>,
    now: jiff::Timestamp,
) -> Result<Selection, PolicyError> {
    let seg_size = source.identity.wal_segment_size;
    let in_source: HashSet<&BackupId> = source.manifests.iter().map(|m| &m.id).collect();
    let in_target: HashSet<&BackupId> = target.manifests.iter().map(|m| &m.id).collect();
    // Both sides' backups and WAL, the repository's version first.
    let mut all: Vec<BackupManifest> = source.manifests.clone();
    all.extend(
        target
            .manifests
            .iter()
            .filter(|m| !in_source.contains(&m.id))
            .cloned(),
    );
    all.sort_by(|a, b| a.id.cmp(&b.id));
    let source_keys: HashSet<&str> = source.wal.iter().map(|w| w.key.as_str()).collect();
    let mut wal: Vec<ArchivedWal> = source.wal.clone();
    wal.extend(
        target
            .wal
            .iter()
            .filter(|w| !source_keys.contains(w.key.as_str()))
            .cloned(),
    );
    let kept: HashSet<BackupId> = match policy {
        None => all.iter().map(|m| m.id.clone()).collect(),
        Some(policy) => {
            let (facts, _) = retention::backup_facts(&all, &wal, &source.histories, seg_size);
            retention::decide(&facts, policy, now)?
                .into_iter()
                .filter(|v| v.keep)
                .map(|v| v.id)
                .collect()
        }
    };
    let kept_manifests: Vec<&BackupManifest> =
        all.iter().filter(|m| kept.contains(&m.id)).collect();
    let kept_summaries: Vec<_> = kept_manifests
        .iter()
        .map(|m| crate::recovery::plan::BackupSummary::from(*m))
        .collect();
    let keep_wal_within = policy.and_then(|p| p.keep_wal_within);
    let (expirable, _) = retention::expirable_under(
        &kept_summaries,
        &wal,
        &source.histories,
        seg_size,
        keep_wal_within,
        now,
    );
    let expirable: HashSet<String> = expirable.into_iter().map(|w| w.key).collect();

    let mut out = Selection::default();
    let target_wal: HashSet<&str> = target.wal.iter().map(|w| w.key.as_str()).collect();
    for w in &source.wal {
        if expirable.contains(&w.key) {
            continue;
        }
        if target_wal.contains(w.key.as_str()) {
            out.skipped += 1;
            continue;
        }
        let other = !matches!(w.name, WalFileName::Partial(_))
            && target
                .wal
                .iter()
                .any(|t| t.name == w.name && t.content_id != w.content_id);
        if other {
            out.conflicts.push(w.name);
        } else if matches!(w.name, WalFileName::History(_)) {
            out.histories.push(w.clone());
        } else {
            out.wal.push(w.clone());
        }
    }
    out.wal.sort_by_key(|w| {
        (
            w.name.segment().map(|s| s.segno(seg_size)).unwrap_or(0),
            w.name,
        )
    });

    let mut packs: BTreeSet<String> = BTreeSet::new();
    for m in &source.manifests {
        if !kept.contains(&m.id) {
            out.not_kept.push(m.id.clone());
            continue;
        }
        if in_target.contains(&m.id) {
            out.present.push(m.id.clone());
            continue;
        }
        let referenced: BTreeSet<String> = m
            .files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .map(|c| c.pack.clone())
            .collect();
        packs.extend(referenced.iter().cloned());
        out.backups.push(BackupToSend {
            id: m.id.clone(),
            packs: referenced.into_iter().collect(),
        });
    }
    for id in packs {
        let held = target_keys.contains(&layout::pack_key(&id))
            && target_keys.contains(&layout::pack_index_key(&id));
        if held {
            out.skipped += 2;
        } else {
            out.packs.push(id);
        }
    }

    // Restore points whose WAL the copy will hold.
    let mut copy_wal: Vec<ArchivedWal> = target.wal.clone();
    copy_wal.extend(out.wal.iter().cloned());
    let (held, _) = partition_by_wal(&source.restore_points, &copy_wal, seg_size);
    let have: HashSet<(crate::pg::TimelineId, crate::pg::Lsn)> = target
        .restore_points
        .iter()
        .map(|p| (p.timeline, p.lsn))
        .collect();
    out.restore_points = held
        .into_iter()
        .filter(|p| !have.contains(&(p.timeline, p.lsn)))
        .cloned()
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{Lsn, TimelineId, WalSegSize};
    use crate::recovery::plan::tests::file as archived;
    use crate::repo::manifest::{ChunkRef, FileEntry, FileKind, MANIFEST_VERSION};
    use crate::repo::RepoIdentity;

    const SEG: u64 = 16 << 20;

    fn pack(n: u8) -> String {
        format!("{n:02x}").repeat(16)
    }

    /// A backup on timeline 1 from segment `start` to `stop`, `days` after the epoch, whose
    /// one file lives in `packs`.
    fn backup(id: &str, start: u64, stop: u64, days: i64, packs: &[u8]) -> BackupManifest {
        let t = jiff::Timestamp::from_second(days * 86_400).unwrap();
        BackupManifest {
            manifest_version: MANIFEST_VERSION,
            id: BackupId::parse(id).unwrap(),
            label: String::new(),
            keep: false,
            start_lsn: Lsn(start * SEG + 40),
            start_timeline: TimelineId(1),
            stop_lsn: Lsn(stop * SEG + 100),
            stop_timeline: TimelineId(1),
            start_time: t,
            stop_time: t,
            stop_next_xid: None,
            system_identifier: 42,
            pg_version_num: 150000,
            wal_segment_size: WalSegSize::DEFAULT,
            tablespaces: Vec::new(),
            files: vec![FileEntry {
                path: "base/1/1".into(),
                size: packs.len() as u64,
                mode: 0o600,
                mtime: 0,
                sha256: None,
                crc32c: None,
                kind: FileKind::File,
                link_target: None,
                chunks: packs
                    .iter()
                    .map(|&p| ChunkRef {
                        sha256: "ab".repeat(32),
                        pack: pack(p),
                        offset: 0,
                        length: 1,
                        plain_length: 1,
                        crc32c: None,
                    })
                    .collect(),
            }],
            size_bytes: packs.len() as u64,
            new_bytes: 0,
            incremental_from: None,
        }
    }

    fn segments(from: u64, to: u64) -> Vec<ArchivedWal> {
        (from..=to)
            .map(|n| archived(&format!("00000001{:08X}{:08X}", n >> 8, n & 0xff)))
            .collect()
    }

    fn state(manifests: Vec<BackupManifest>, wal: Vec<ArchivedWal>) -> RepoState {
        RepoState {
            identity: RepoIdentity::new(42, 15, WalSegSize::DEFAULT),
            manifests,
            wal,
            histories: Vec::new(),
            restore_points: Vec::new(),
        }
    }

    fn names(wal: &[ArchivedWal]) -> Vec<String> {
        wal.iter().map(|w| w.name.to_string()).collect()
    }

    fn ids(v: &[BackupId]) -> Vec<&str> {
        v.iter().map(|i| i.0.as_str()).collect()
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(100 * 86_400).unwrap()
    }

    #[test]
    fn an_empty_copy_gets_everything_in_order() {
        let source = state(
            vec![
                backup("20260101T000000Z", 2, 3, 1, &[1, 2]),
                backup("20260102T000000Z", 5, 5, 2, &[2, 3]),
            ],
            segments(2, 7),
        );
        let sel = select(
            &source,
            &state(vec![], vec![]),
            &HashSet::new(),
            None,
            now(),
        )
        .unwrap();
        assert_eq!(names(&sel.wal), names(&segments(2, 7)));
        assert_eq!(sel.packs, [pack(1), pack(2), pack(3)]);
        assert_eq!(
            sel.backups
                .iter()
                .map(|b| b.id.0.as_str())
                .collect::<Vec<_>>(),
            ["20260101T000000Z", "20260102T000000Z"]
        );
        assert_eq!(sel.backups[1].packs, [pack(2), pack(3)]);
        assert_eq!(sel.skipped, 0);
    }

    #[test]
    fn what_the_copy_holds_is_not_sent_again() {
        let b1 = backup("20260101T000000Z", 2, 3, 1, &[1]);
        let b2 = backup("20260102T000000Z", 5, 5, 2, &[1, 2]);
        let source = state(vec![b1.clone(), b2], segments(2, 7));
        // A run killed after WAL 2..=5, pack 1 and its index, and backup 1.
        let target = state(vec![b1], segments(2, 5));
        let keys: HashSet<String> = [layout::pack_key(&pack(1)), layout::pack_index_key(&pack(1))]
            .into_iter()
            .collect();
        let sel = select(&source, &target, &keys, None, now()).unwrap();
        assert_eq!(names(&sel.wal), names(&segments(6, 7)));
        assert_eq!(sel.packs, [pack(2)]);
        assert_eq!(ids(&sel.present), ["20260101T000000Z"]);
        assert_eq!(sel.backups.len(), 1);
        assert_eq!(sel.skipped, 4 + 2);
        // A pack without its index in the copy is sent again (the index is the pack's
        // commit point).
        let keys: HashSet<String> = [layout::pack_key(&pack(1))].into_iter().collect();
        let sel = select(&source, &state(vec![], vec![]), &keys, None, now()).unwrap();
        assert_eq!(sel.packs, [pack(1), pack(2)]);
    }

    #[test]
    fn only_what_the_copys_policy_keeps() {
        let source = state(
            vec![
                backup("20260101T000000Z", 2, 2, 1, &[1]),
                backup("20260102T000000Z", 4, 4, 2, &[2]),
                backup("20260103T000000Z", 6, 6, 3, &[3]),
            ],
            segments(2, 8),
        );
        let policy = RetentionPolicy {
            keep_last: Some(2),
            ..Default::default()
        };
        let sel = select(
            &source,
            &state(vec![], vec![]),
            &HashSet::new(),
            Some(&policy),
            now(),
        )
        .unwrap();
        assert_eq!(ids(&sel.not_kept), ["20260101T000000Z"]);
        assert_eq!(sel.packs, [pack(2), pack(3)]);
        // WAL from the oldest kept backup's start on.
        assert_eq!(names(&sel.wal), names(&segments(4, 8)));
    }

    #[test]
    fn a_backup_only_the_copy_holds_counts_for_its_policy() {
        // The repository expired January's backup; the copy holds it and keeps one backup a
        // month for two months: February's newest is sent, not its older one, and the WAL
        // the copy's January backup needs from the repository is.
        let january = backup("19700102T000000Z", 2, 2, 1, &[1]);
        let source = state(
            vec![
                backup("19700210T000000Z", 4, 4, 40, &[2]),
                backup("19700215T000000Z", 6, 6, 45, &[3]),
            ],
            segments(4, 8),
        );
        let target = state(vec![january], segments(2, 3));
        let policy = RetentionPolicy {
            keep_monthly: Some(2),
            ..Default::default()
        };
        let sel = select(&source, &target, &HashSet::new(), Some(&policy), now()).unwrap();
        assert_eq!(ids(&sel.not_kept), ["19700210T000000Z"]);
        assert_eq!(sel.packs, [pack(3)]);
        assert_eq!(names(&sel.wal), names(&segments(4, 8)));
    }

    #[test]
    fn other_content_under_a_name_is_a_conflict_not_a_second_version() {
        let source = state(vec![], segments(2, 3));
        let mut theirs = segments(3, 3);
        theirs[0].content_id = "cd".repeat(32);
        theirs[0].key = layout::wal_object_key(theirs[0].name, &theirs[0].content_id);
        let sel = select(
            &source,
            &state(vec![], theirs),
            &HashSet::new(),
            None,
            now(),
        )
        .unwrap();
        assert_eq!(names(&sel.wal), ["000000010000000000000002"]);
        assert_eq!(
            sel.conflicts
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["000000010000000000000003"]
        );
    }

    #[test]
    fn histories_go_first_and_restore_points_follow_their_wal() {
        let mut wal = segments(2, 3);
        wal.push(archived("00000002.history"));
        let mut source = state(vec![], wal);
        let point = |n: &str, lsn: u64| RestorePointRecord {
            name: n.into(),
            lsn: Lsn(lsn),
            timeline: TimelineId(1),
            time: jiff::Timestamp::UNIX_EPOCH,
        };
        source.restore_points = vec![point("in_3", 3 * SEG + 8), point("gone_1", SEG + 8)];
        let sel = select(
            &source,
            &state(vec![], vec![]),
            &HashSet::new(),
            None,
            now(),
        )
        .unwrap();
        assert_eq!(names(&sel.histories), ["00000002.history"]);
        assert_eq!(names(&sel.wal), names(&segments(2, 3)));
        assert_eq!(sel.restore_points.len(), 1);
        assert_eq!(sel.restore_points[0].name, "in_3");
    }
}
