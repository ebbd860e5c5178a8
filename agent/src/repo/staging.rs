//! Leftover staging objects: what a writer killed before its commit leaves in the repository
//! (a local `.tmp.*` file, an incomplete S3 multipart upload; see
//! [`crate::storage::StagingObject`]). None is part of a backup or of the WAL archive, so
//! `verify` reports them as a warning only and `expire` removes those older than a grace
//! period (`--staging-grace`, [`DEFAULT_GRACE`]). A live writer's staging object is minutes
//! old at most; one older than the grace period is judged abandoned.
//!
//! Ages are by the storage's clock where the caller has it (`expire` reads it with
//! [`crate::repo::lock::storage_now`]); `verify`, which writes nothing, uses this host's.

use serde::Serialize;

use crate::storage::{StagingObject, Storage, StorageResult};

/// `--staging-grace` when not given: 24 hours.
pub const DEFAULT_GRACE: &str = "24h";

/// A staging object with its age.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// The key shown to the user (local: the temporary file's path under the root).
    pub key: String,
    /// The S3 upload id; absent for a local temporary file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Bytes written so far.
    pub size: u64,
    /// Seconds since its last write (local) or its start (S3), never negative.
    pub age_seconds: u64,
    #[serde(skip)]
    object: StagingObject,
}

impl Leftover {
    /// `object` aged against `now` (both by the same clock).
    pub fn new(object: StagingObject, now: jiff::Timestamp) -> Self {
        let age = now.duration_since(object.modified).as_secs().max(0) as u64;
        Leftover {
            key: object.key.clone(),
            upload_id: object.upload_id.clone(),
            size: object.size,
            age_seconds: age,
            object,
        }
    }

    pub fn object(&self) -> &StagingObject {
        &self.object
    }
}

/// Every staging object of the repository, aged against `now`, sorted by key.
///
/// # Errors
/// Storage errors of the listing.
pub async fn survey(storage: &dyn Storage, now: jiff::Timestamp) -> StorageResult<Vec<Leftover>> {
    Ok(storage
        .list_staging()
        .await?
        .into_iter()
        .map(|o| Leftover::new(o, now))
        .collect())
}

/// Splits `leftovers` into those older than `grace_seconds` (to remove) and the others (kept:
/// possibly a live writer's). An object exactly `grace_seconds` old is kept.
pub fn abandoned(leftovers: Vec<Leftover>, grace_seconds: u64) -> (Vec<Leftover>, Vec<Leftover>) {
    leftovers
        .into_iter()
        .partition(|l| l.age_seconds > grace_seconds)
}

/// An age in seconds as `3d4h`, `2h5m`, `4m10s` or `12s`.
pub fn human_age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(key: &str, secs: i64) -> StagingObject {
        StagingObject {
            key: key.into(),
            upload_id: None,
            size: 10,
            modified: jiff::Timestamp::from_second(secs).unwrap(),
        }
    }

    #[test]
    fn only_objects_older_than_the_grace_period_are_abandoned() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let all = vec![
            Leftover::new(at("old", 1_000_000 - 86_401), now),
            Leftover::new(at("exactly", 1_000_000 - 86_400), now),
            Leftover::new(at("young", 1_000_000 - 30), now),
            // Written after "now" (clock skew): age 0, kept.
            Leftover::new(at("future", 1_000_100), now),
        ];
        assert_eq!(all[3].age_seconds, 0);
        let (old, kept) = abandoned(all.clone(), 86_400);
        assert_eq!(
            old.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(),
            ["old"]
        );
        assert_eq!(kept.len(), 3);
        let (old, kept) = abandoned(all, 0);
        assert_eq!(old.len(), 3);
        assert_eq!(kept[0].key, "future");
    }

    #[test]
    fn ages_read_as_the_largest_two_units() {
        assert_eq!(human_age(12), "12s");
        assert_eq!(human_age(250), "4m10s");
        assert_eq!(human_age(7500), "2h5m");
        assert_eq!(human_age(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }
}
