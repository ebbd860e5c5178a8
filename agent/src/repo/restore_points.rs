//! The restore point index: one small JSON object per restore point found in archived WAL
//! (`layout::restore_point_key`). `pgpitr-archive` writes a WAL file's restore points before
//! the WAL file itself, so every archived WAL file's restore points are indexed; the planner
//! reads them to choose the backup for `--target-name`, and `pgpitr list` shows them.

use super::{json_objects, layout, RepoError};
use crate::pg::RestorePointRecord;
use crate::storage::{PutMode, Storage, StorageError};

/// Stores `points`. Idempotent: an index object that exists already is left as it is.
///
/// # Errors
/// Storage errors.
pub async fn record(storage: &dyn Storage, points: &[RestorePointRecord]) -> Result<(), RepoError> {
    for p in points {
        let key = layout::restore_point_key(p.timeline, p.lsn);
        let body = serde_json::to_vec_pretty(p).expect("a restore point serializes");
        match storage.put(&key, body.into(), PutMode::Create).await {
            Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Every indexed restore point, in (timeline, LSN) order.
///
/// # Errors
/// Storage errors; [`RepoError::Corrupt`] for an object that is not a restore point or does not
/// match its key.
pub async fn load(storage: &dyn Storage) -> Result<Vec<RestorePointRecord>, RepoError> {
    let keys: Vec<String> = storage
        .list(layout::RESTORE_POINTS_ROOT)
        .await?
        .into_iter()
        .filter(|o| layout::parse_restore_point_key(&o.key).is_some())
        .map(|o| o.key)
        .collect();
    let mut out = Vec::new();
    for (key, p) in json_objects::load::<RestorePointRecord>(storage, keys).await? {
        if layout::parse_restore_point_key(&key) != Some((p.timeline, p.lsn)) {
            return Err(RepoError::Corrupt {
                message: format!(
                    "it describes a restore point at {} on timeline {}",
                    p.lsn, p.timeline
                ),
                key,
            });
        }
        out.push(p);
    }
    out.sort_by_key(|p| (p.timeline, p.lsn));
    Ok(out)
}

/// Deletes the index objects of `points`.
///
/// # Errors
/// Storage errors.
pub async fn remove(storage: &dyn Storage, points: &[RestorePointRecord]) -> Result<(), RepoError> {
    for p in points {
        match storage
            .delete(&layout::restore_point_key(p.timeline, p.lsn))
            .await
        {
            Ok(()) | Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
