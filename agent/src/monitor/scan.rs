//! The one I/O step of `status` and `metrics`: read what [`Facts::derive`] needs. One listing of
//! the whole repository gives every object's key, size and storage time (so `pgpitr-archive` and
//! `backup` leave nothing extra for monitoring); the backups' manifests are then read in
//! parallel, with the timeline histories and the run records beside them.

use std::time::Instant;

use jiff::Timestamp;

use super::facts::{archived, Facts, Inputs};
use crate::recovery::source::load_histories;
use crate::recovery::BackupSummary;
use crate::repo::manifest::BackupManifest;
use crate::repo::runs::{last_runs, DrillRun, VerifyRun};
use crate::repo::{json_objects, layout, RepoError, RepoIdentity};
use crate::storage::Storage;

/// Scans the repository now.
///
/// # Errors
/// Storage errors (the repository is unreachable), a repository without `repo.json`, corrupt
/// manifests or run records.
pub async fn scan(storage: &dyn Storage) -> Result<Facts, RepoError> {
    let scanned_at = Timestamp::now();
    let started = Instant::now();
    let identity = RepoIdentity::load(storage).await?;
    let objects = storage.list("").await?;
    let manifest_keys: Vec<String> = objects
        .iter()
        .filter(|o| layout::parse_backup_manifest_key(&o.key).is_some())
        .map(|o| o.key.clone())
        .collect();
    let wal = archived(&objects);
    let manifests = async {
        // Summaries only: the file lists of many backups need not stay in memory.
        let loaded = json_objects::load::<BackupManifest>(storage, manifest_keys).await?;
        Ok::<_, RepoError>(
            loaded
                .iter()
                .map(|(_, m)| BackupSummary::from(m))
                .collect::<Vec<_>>(),
        )
    };
    let (backups, histories, verify, drill) = futures::try_join!(
        manifests,
        load_histories(storage, &wal),
        last_runs::<VerifyRun>(storage),
        last_runs::<DrillRun>(storage),
    )?;
    let inputs = Inputs {
        objects,
        backups,
        histories,
        wal_segment_size: identity.wal_segment_size,
        verify: Some(verify),
        drill: Some(drill),
    };
    let mut facts = Facts::derive(&inputs, scanned_at, 0.0);
    facts.scan_seconds = started.elapsed().as_secs_f64();
    Ok(facts)
}
