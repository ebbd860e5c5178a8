//! What `pgpitr verify` and `pgpitr drill` leave in the repository, so that `pgpitr status` and
//! `pgpitr metrics` can report the last result and its age with no daemon running: one small
//! JSON object per run, `runs/verify/<token>.json` and `runs/drill/<token>.json`. Tokens are
//! built like lock tokens (nanoseconds since the epoch first), so keys sort by time. Each
//! writer keeps the newest [`KEEP`] records of its kind and deletes older ones.

use bytes::Bytes;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{json_objects, layout, RepoError};
use crate::storage::{PutMode, Storage};

/// Records kept per kind.
pub const KEEP: usize = 20;

pub const RUNS_ROOT: &str = "runs/";

/// A kind of run recorded in the repository.
pub trait RunRecord: Serialize + DeserializeOwned {
    /// `verify` or `drill`: the directory under `runs/`.
    const KIND: &'static str;
    /// When the run ended.
    fn finished_at(&self) -> Timestamp;
    /// Whether it passed.
    fn ok(&self) -> bool;
}

/// The result of one `pgpitr verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyRun {
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// No problem found (warnings do not count).
    pub ok: bool,
    /// Problems found: damaged or missing objects, gaps in the WAL.
    pub problems: u64,
    /// Warnings: leftover staging objects and the like.
    pub warnings: u64,
    /// Backups checked.
    pub backups: u64,
    /// The host that ran it.
    pub host: String,
}

impl RunRecord for VerifyRun {
    const KIND: &'static str = "verify";
    fn finished_at(&self) -> Timestamp {
        self.finished_at
    }
    fn ok(&self) -> bool {
        self.ok
    }
}

/// The result of one `pgpitr drill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRun {
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// Every step passed.
    pub ok: bool,
    /// The step that failed (`restore`, `start`, `recovery`, `target`, `amcheck`, `check-sql`,
    /// …), when one did.
    pub failed_step: Option<String>,
    /// One line: what happened, or why the step failed.
    pub message: String,
    /// The backup restored, when one was chosen.
    pub backup_id: Option<String>,
    /// The target asked for, as given (`latest`, a time, an LSN).
    pub target: String,
    /// The point recovery reached (an LSN, and the time of the last replayed commit when
    /// known).
    pub reached: Option<String>,
    /// Seconds writing the data directory.
    pub restore_seconds: f64,
    /// Seconds from starting PostgreSQL to the end of recovery.
    pub recovery_seconds: f64,
    /// The recovery time objective measured: restore + recovery, in seconds.
    pub rto_seconds: f64,
    /// The host that ran it.
    pub host: String,
}

impl RunRecord for DrillRun {
    const KIND: &'static str = "drill";
    fn finished_at(&self) -> Timestamp {
        self.finished_at
    }
    fn ok(&self) -> bool {
        self.ok
    }
}

fn prefix<T: RunRecord>() -> String {
    format!("{RUNS_ROOT}{}/", T::KIND)
}

/// Stores `run` and deletes the records of its kind beyond the newest [`KEEP`]; returns its key.
///
/// # Errors
/// Storage errors of the write. Failing to delete old records is only logged.
pub async fn record<T: RunRecord>(storage: &dyn Storage, run: &T) -> Result<String, RepoError> {
    let token = super::lock::new_token(run.finished_at());
    let key = format!("{}{token}.json", prefix::<T>());
    let body = serde_json::to_vec_pretty(run).expect("run records serialise");
    storage
        .put(&key, Bytes::from(body), PutMode::Overwrite)
        .await?;
    let mut keys = record_keys::<T>(storage).await?;
    if keys.len() > KEEP {
        keys.truncate(keys.len() - KEEP);
        for old in keys {
            if let Err(e) = storage.delete(&old).await {
                tracing::warn!("could not delete the old run record {old}: {e}");
            }
        }
    }
    Ok(key)
}

/// The keys of the records of kind `T`, oldest first.
async fn record_keys<T: RunRecord>(storage: &dyn Storage) -> Result<Vec<String>, RepoError> {
    let mut keys: Vec<String> = storage
        .list(&prefix::<T>())
        .await?
        .into_iter()
        .map(|m| m.key)
        .filter(|k| {
            k.strip_prefix(&prefix::<T>())
                .and_then(|f| f.strip_suffix(".json"))
                .is_some_and(layout::is_lock_token)
        })
        .collect();
    keys.sort();
    Ok(keys)
}

/// The last run of kind `T` and the last one that passed (the same one when the last passed).
#[derive(Debug, Clone, PartialEq)]
pub struct LastRuns<T> {
    pub last: Option<T>,
    pub last_ok: Option<T>,
}

/// Reads the records of kind `T`.
///
/// # Errors
/// Storage errors; [`RepoError::Corrupt`] for a record that is not valid JSON of its kind.
pub async fn last_runs<T: RunRecord + Clone>(
    storage: &dyn Storage,
) -> Result<LastRuns<T>, RepoError> {
    let keys = record_keys::<T>(storage).await?;
    let mut runs: Vec<T> = json_objects::load::<T>(storage, keys)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    runs.sort_by_key(|r| r.finished_at());
    Ok(LastRuns {
        last: runs.last().cloned(),
        last_ok: runs.iter().rev().find(|r| r.ok()).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;

    fn verify_run(at: &str, ok: bool) -> VerifyRun {
        let t: Timestamp = at.parse().unwrap();
        VerifyRun {
            started_at: t,
            finished_at: t,
            ok,
            problems: u64::from(!ok),
            warnings: 0,
            backups: 1,
            host: "db1".into(),
        }
    }

    #[tokio::test]
    async fn the_last_run_and_the_last_success_are_found_and_old_records_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().to_path_buf());
        let none = last_runs::<VerifyRun>(&storage).await.unwrap();
        assert_eq!(none.last, None);
        assert_eq!(none.last_ok, None);

        for day in 1..=KEEP + 3 {
            let ok = day != KEEP + 3;
            let at = format!("2026-11-{:02}T10:00:00Z", day.min(28));
            let at = if day > 28 {
                format!("2026-12-{:02}T10:00:00Z", day - 28)
            } else {
                at
            };
            record(&storage, &verify_run(&at, ok)).await.unwrap();
        }
        let runs = last_runs::<VerifyRun>(&storage).await.unwrap();
        assert!(!runs.last.as_ref().unwrap().ok);
        assert_eq!(
            runs.last_ok.unwrap().finished_at,
            "2026-11-22T10:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            record_keys::<VerifyRun>(&storage).await.unwrap().len(),
            KEEP
        );
        // Drill records are another kind.
        assert_eq!(last_runs::<DrillRun>(&storage).await.unwrap().last, None);
    }
}
