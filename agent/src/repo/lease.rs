//! Leases: how a restore tells `expire` what it still reads (issue 15, item 6).
//!
//! `pgpitr restore` writes `leases/<token>.lease` before it reads anything from the repository.
//! At first the lease is **unscoped**: the restore has not chosen its backup yet, and `expire`
//! deletes nothing while an unscoped lease is active. Once the plan is made the restore
//! **narrows** it to the chosen backup and the WAL from that backup's start LSN onward, valid
//! for `--recovery-lease` (default 7 days) after that write, so that the recovery PostgreSQL
//! then runs through `pgpitr-restore` (restore_command) is protected too. A restore that fails
//! removes its lease; `pgpitr unlock --leases` removes every lease.
//!
//! `expire` keeps a leased backup (and so its packs) and every WAL file from the lease's start
//! segment onward, on every timeline; it lists the leases again before each batch of deletions
//! and stops when one appeared that it did not plan with.
//!
//! A lease lasts `valid_for_secs` after the storage's time of its last write (S3 Last-Modified,
//! a local file's mtime), compared with the storage's "now" (`repo::lock::storage_now`): the
//! restore's and expire's clocks are never compared. An unreadable lease holds everything for
//! [`UNSCOPED_FOR`] after its last write.
//!
//! Limit: an `expire` that listed the leases just before a restore wrote its lease may finish
//! the batch it is deleting (at most `--delete-batch` objects) before it sees the lease; the
//! restore then fails on the missing object (checksums and manifests are verified), never
//! restores silently wrong data. Run it again.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout;
use super::lock::{hostname, new_token};
use super::manifest::BackupId;
use crate::pg::{Lsn, TimelineId, WalSegSize};
use crate::storage::{DynStorage, PutMode, Storage, StorageError};

/// How long an unscoped lease (a restore still choosing its backup) holds everything after its
/// last write. A restore narrows it within seconds; one that died leaves it to lapse.
pub const UNSCOPED_FOR: Duration = Duration::from_secs(60 * 60);

/// What a lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub token: String,
    /// `restore`.
    pub command: String,
    pub host: String,
    pub pid: u32,
    /// The data directory being restored, for messages.
    pub pgdata: String,
    /// The holder's clock when it wrote the lease; shown, never compared.
    pub written: jiff::Timestamp,
    /// How long the lease holds after the storage's time of its last write, in seconds.
    pub valid_for_secs: u64,
    /// What it holds; `None` (unscoped): everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<LeaseScope>,
}

/// The backup a restore chose and where its WAL begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseScope {
    pub backup: BackupId,
    pub start_timeline: TimelineId,
    pub start_lsn: Lsn,
}

/// One lease object found in `leases/`.
#[derive(Debug, Clone)]
pub struct FoundLease {
    pub key: String,
    /// `Err` with the reason when the object cannot be read or decoded.
    pub info: Result<LeaseInfo, String>,
    /// The storage's time of its last write; `None` when the backend cannot tell.
    pub written: Option<jiff::Timestamp>,
}

impl FoundLease {
    /// When it lapses (storage time; the holder's clock when the backend cannot tell).
    pub fn until(&self) -> Option<jiff::Timestamp> {
        let (written, secs) = match &self.info {
            Ok(i) => (self.written.unwrap_or(i.written), i.valid_for_secs),
            Err(_) => (self.written?, UNSCOPED_FOR.as_secs()),
        };
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        Some(
            written
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .unwrap_or(jiff::Timestamp::MAX),
        )
    }

    /// Whether it still holds at `now` (storage time). An unreadable lease of unknown age
    /// holds.
    pub fn is_active(&self, now: jiff::Timestamp) -> bool {
        self.until().is_none_or(|u| u > now)
    }

    /// The scope, `None` for an unscoped or unreadable lease.
    pub fn scope(&self) -> Option<&LeaseScope> {
        self.info.as_ref().ok()?.scope.as_ref()
    }

    /// `leases/x.lease (restore, pid 12 on host db1 into /srv/pg, until …): backup B and WAL from
    /// 0/2000028 on timeline 1`.
    pub fn describe(&self) -> String {
        let until = self
            .until()
            .map(|u| u.round(jiff::Unit::Second).unwrap_or(u).to_string())
            .unwrap_or_else(|| "?".into());
        let who = match &self.info {
            Ok(i) => format!(
                "{}, pid {} on host {} into {}, until {until}",
                i.command, i.pid, i.host, i.pgdata
            ),
            Err(e) => format!("unreadable ({e}), until {until}"),
        };
        let what = match self.scope() {
            Some(s) => format!(
                "backup {} and WAL from {} on timeline {}",
                s.backup, s.start_lsn, s.start_timeline
            ),
            None => "everything (the restore has not chosen its backup yet)".into(),
        };
        format!("{} ({who}): {what}", self.key)
    }
}

/// What the active leases hold back from `expire`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseHold {
    /// An unscoped lease is active: nothing may be deleted.
    pub everything: bool,
    /// Backups to keep, whatever the retention policy says.
    pub backups: BTreeSet<BackupId>,
    /// WAL from this position on (any timeline) is kept: the lowest start of a leased backup.
    pub wal_from: Option<Lsn>,
    /// The active leases, described ([`FoundLease::describe`]).
    pub leases: Vec<String>,
}

impl LeaseHold {
    /// Whether a WAL file of segment number `segno` is held.
    pub fn holds_wal(&self, segno: u64, seg_size: WalSegSize) -> bool {
        self.everything || self.wal_from.is_some_and(|l| segno >= l.segno(seg_size))
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

/// What `leases` hold at `now` (storage time). Lapsed leases hold nothing.
pub fn hold(leases: &[FoundLease], now: jiff::Timestamp) -> LeaseHold {
    let mut out = LeaseHold::default();
    for l in leases.iter().filter(|l| l.is_active(now)) {
        out.leases.push(l.describe());
        match l.scope() {
            None => out.everything = true,
            Some(s) => {
                out.backups.insert(s.backup.clone());
                out.wal_from = Some(out.wal_from.map_or(s.start_lsn, |w| w.min(s.start_lsn)));
            }
        }
    }
    out
}

/// Every lease object, by key.
///
/// # Errors
/// Storage errors (a lease removed between list and read is skipped).
pub async fn list(storage: &dyn Storage) -> Result<Vec<FoundLease>, StorageError> {
    let mut out = Vec::new();
    for o in storage.list(layout::LEASES_ROOT).await? {
        if layout::parse_lease_key(&o.key).is_none() {
            continue;
        }
        let info = match storage.get(&o.key).await {
            Ok(body) => serde_json::from_slice::<LeaseInfo>(&body).map_err(|e| e.to_string()),
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let written = storage.modified(&o.key).await?;
        out.push(FoundLease {
            key: o.key,
            info,
            written,
        });
    }
    Ok(out)
}

/// The key of a lease in `leases/` that is not in `known`, if any: a restore that began after
/// `known` was listed.
///
/// # Errors
/// Storage errors.
pub async fn new_lease(
    storage: &dyn Storage,
    known: &HashSet<String>,
) -> Result<Option<String>, StorageError> {
    Ok(storage
        .list(layout::LEASES_ROOT)
        .await?
        .into_iter()
        .map(|o| o.key)
        .find(|k| layout::parse_lease_key(k).is_some() && !known.contains(k)))
}

/// Removes every lease (`pgpitr unlock --leases`) and returns what it removed.
///
/// # Errors
/// Storage errors.
pub async fn remove_all(storage: &dyn Storage) -> Result<Vec<FoundLease>, StorageError> {
    let found = list(storage).await?;
    for l in &found {
        storage.delete(&l.key).await?;
    }
    Ok(found)
}

/// A lease this process holds (see the module docs).
#[derive(Debug)]
pub struct Lease {
    storage: DynStorage,
    key: String,
    info: LeaseInfo,
}

impl Lease {
    /// Writes an unscoped lease for a restore into `pgdata`, before anything is read.
    ///
    /// # Errors
    /// Storage errors (the restore must not go on without it).
    pub async fn take(storage: DynStorage, pgdata: &Path) -> Result<Lease, StorageError> {
        let now = jiff::Timestamp::now();
        let info = LeaseInfo {
            token: new_token(now),
            command: "restore".into(),
            host: hostname(),
            pid: std::process::id(),
            pgdata: pgdata.display().to_string(),
            written: now,
            valid_for_secs: UNSCOPED_FOR.as_secs(),
            scope: None,
        };
        let lease = Lease {
            key: layout::lease_key(&info.token),
            storage,
            info,
        };
        lease.write().await?;
        Ok(lease)
    }

    /// Narrows the lease to `scope`, valid for `valid_for` from now (storage time).
    ///
    /// # Errors
    /// Storage errors.
    pub async fn narrow(
        &mut self,
        scope: LeaseScope,
        valid_for: Duration,
    ) -> Result<(), StorageError> {
        self.info.scope = Some(scope);
        self.info.valid_for_secs = valid_for.as_secs();
        self.info.written = jiff::Timestamp::now();
        self.write().await
    }

    async fn write(&self) -> Result<(), StorageError> {
        let body = serde_json::to_vec_pretty(&self.info).expect("serialisable");
        self.storage
            .put(&self.key, Bytes::from(body), PutMode::Overwrite)
            .await
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn info(&self) -> &LeaseInfo {
        &self.info
    }

    /// Removes the lease (a failure is logged: it then lapses by itself).
    pub async fn remove(self) {
        if let Err(e) = self.storage.delete(&self.key).await {
            tracing::warn!(
                "cannot remove the lease {}: {e}; it lapses by itself, or remove it with \
                 `pgpitr unlock --leases`",
                self.key
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;
    use std::sync::Arc;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn found(
        token: &str,
        written: &str,
        valid_for_secs: u64,
        scope: Option<(&str, u64)>,
    ) -> FoundLease {
        FoundLease {
            key: layout::lease_key(token),
            info: Ok(LeaseInfo {
                token: token.into(),
                command: "restore".into(),
                host: "h".into(),
                pid: 1,
                pgdata: "/srv/pg".into(),
                // The holder's clock is a year off: only the storage's time counts.
                written: ts("2027-12-01T00:00:00Z"),
                valid_for_secs,
                scope: scope.map(|(id, lsn)| LeaseScope {
                    backup: BackupId(id.into()),
                    start_timeline: TimelineId(1),
                    start_lsn: Lsn(lsn),
                }),
            }),
            written: Some(ts(written)),
        }
    }

    const SEG: u64 = 16 * 1024 * 1024;

    #[test]
    fn no_lease_holds_nothing() {
        let h = hold(&[], ts("2026-11-23T10:00:00Z"));
        assert!(h.is_empty() && !h.everything && h.backups.is_empty());
        assert!(!h.holds_wal(0, WalSegSize::DEFAULT));
    }

    #[test]
    fn an_unscoped_lease_holds_everything_until_it_lapses() {
        let seg = WalSegSize::DEFAULT;
        let l = found("1-1-a", "2026-11-23T10:00:00Z", 3600, None);
        let h = hold(std::slice::from_ref(&l), ts("2026-11-23T10:30:00Z"));
        assert!(h.everything && h.holds_wal(0, seg));
        assert!(h.leases[0].contains("everything"), "{:?}", h.leases);
        let h = hold(&[l], ts("2026-11-23T11:00:01Z"));
        assert!(h.is_empty() && !h.everything);
    }

    #[test]
    fn a_scoped_lease_holds_its_backup_and_the_wal_from_its_start() {
        let seg = WalSegSize::DEFAULT;
        let now = ts("2026-11-23T10:30:00Z");
        let a = found(
            "1-1-a",
            "2026-11-23T10:00:00Z",
            7 * 86400,
            Some(("B2", 5 * SEG + 40)),
        );
        let b = found(
            "1-1-b",
            "2026-11-23T10:00:00Z",
            7 * 86400,
            Some(("B1", 3 * SEG + 40)),
        );
        let lapsed = found("1-1-c", "2026-11-01T10:00:00Z", 86400, Some(("B0", SEG)));
        let h = hold(&[a.clone(), lapsed.clone()], now);
        assert!(!h.everything);
        assert_eq!(
            h.backups.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
            ["B2"]
        );
        assert!(!h.holds_wal(4, seg) && h.holds_wal(5, seg) && h.holds_wal(900, seg));
        // Two leases: both backups, WAL from the lower start.
        let h = hold(&[a, b, lapsed], now);
        assert_eq!(h.backups.len(), 2);
        assert!(!h.holds_wal(2, seg) && h.holds_wal(3, seg));
        assert_eq!(h.leases.len(), 2);
    }

    #[test]
    fn an_unreadable_lease_holds_everything_for_a_while() {
        let l = FoundLease {
            key: layout::lease_key("1-1-x"),
            info: Err("garbage".into()),
            written: Some(ts("2026-11-23T10:00:00Z")),
        };
        assert!(hold(std::slice::from_ref(&l), ts("2026-11-23T10:59:00Z")).everything);
        assert!(!hold(&[l], ts("2026-11-23T11:01:00Z")).everything);
    }

    #[tokio::test]
    async fn a_restore_takes_narrows_and_removes_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let mut lease = Lease::take(storage.clone(), Path::new("/srv/pg"))
            .await
            .unwrap();
        let now = crate::repo::lock::storage_now(storage.as_ref())
            .await
            .unwrap();
        let h = hold(&list(storage.as_ref()).await.unwrap(), now);
        assert!(h.everything);
        let known: HashSet<String> = HashSet::new();
        assert_eq!(
            new_lease(storage.as_ref(), &known)
                .await
                .unwrap()
                .as_deref(),
            Some(lease.key())
        );
        let scope = LeaseScope {
            backup: BackupId("B1".into()),
            start_timeline: TimelineId(1),
            start_lsn: Lsn(SEG),
        };
        lease
            .narrow(scope, Duration::from_secs(86400))
            .await
            .unwrap();
        let found = list(storage.as_ref()).await.unwrap();
        let h = hold(&found, now);
        assert!(!h.everything && h.backups.len() == 1 && h.wal_from == Some(Lsn(SEG)));
        let known: HashSet<String> = found.iter().map(|l| l.key.clone()).collect();
        assert_eq!(new_lease(storage.as_ref(), &known).await.unwrap(), None);
        lease.remove().await;
        assert!(list(storage.as_ref()).await.unwrap().is_empty());
        // Readable by what wrote it, and `unlock --leases` removes all.
        Lease::take(storage.clone(), Path::new("/a")).await.unwrap();
        assert_eq!(remove_all(storage.as_ref()).await.unwrap().len(), 1);
        assert!(list(storage.as_ref()).await.unwrap().is_empty());
    }
}
