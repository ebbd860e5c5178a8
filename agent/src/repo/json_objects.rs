//! Reading the small JSON objects a listing names (backup manifests, the restore point index),
//! several at a time.

use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::RepoError;
use crate::storage::{Storage, StorageError};

/// Objects fetched at once.
const FETCH_PARALLEL: usize = 16;

/// Fetches and decodes every object of `keys`, in the order of `keys`, as `(key, value)`. An
/// object deleted since it was listed (a concurrent `expire`) is skipped.
///
/// # Errors
/// Storage errors; [`RepoError::Corrupt`] for an object that is not valid JSON of type `T`.
pub async fn load<T: DeserializeOwned>(
    storage: &dyn Storage,
    keys: Vec<String>,
) -> Result<Vec<(String, T)>, RepoError> {
    let mut fetched = futures::stream::iter(keys)
        .map(|key| async move {
            let body = storage.get(&key).await;
            (key, body)
        })
        .buffered(FETCH_PARALLEL);
    let mut out = Vec::new();
    while let Some((key, body)) = fetched.next().await {
        let body = match body {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let value = serde_json::from_slice(&body).map_err(|e| RepoError::Corrupt {
            key: key.clone(),
            message: e.to_string(),
        })?;
        out.push((key, value));
    }
    Ok(out)
}
