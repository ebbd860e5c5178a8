//! Which location `plan`, `restore` and `pgpitr-restore` read: the one `--from` names (`main`
//! by default), then the others in configuration order (the repository, then the copies), each
//! only when every one before it is unreachable.
//!
//! Unreachable means that storage did not answer after its retries: a refused connection, a
//! timeout, a 5xx ([`StorageError::Transient`]). A location that answers is authoritative: a
//! file it does not hold is reported as it is (and a WAL segment it should hold, one before a
//! later segment of its timeline, is an error of `pgpitr-restore`, never "not found"), never
//! looked for elsewhere, so that a stale copy cannot silently stand in for the repository.

use crate::config::{Config, ConfigError};
use crate::storage::StorageError;

/// The order in which locations are read: `from` (default `main`), then every other location
/// in configuration order.
///
/// # Errors
/// [`ConfigError::NoSuchLocation`] for an unknown `from`.
pub fn order(config: &Config, from: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let first = from.unwrap_or(crate::config::MAIN_LOCATION);
    config.location(first)?;
    let mut out = vec![first.to_string()];
    out.extend(config.location_names().into_iter().filter(|n| n != first));
    Ok(out)
}

/// Whether `e` says that a location is unreachable (the only reason to read the next one).
pub fn is_unreachable(e: &StorageError) -> bool {
    matches!(e, StorageError::Transient { .. })
}

/// The name and configuration of the first location in [`order`] whose `repo.json` can be
/// read, each unreachable one before it logged as a warning.
///
/// # Errors
/// An unknown `from`; the error of the first location that answers with an error other than
/// being unreachable; the last location's error when none is reachable.
pub async fn first_reachable(
    config: &Config,
    from: Option<&str>,
) -> Result<(String, Config), ConfigError> {
    let names = order(config, from)?;
    let last = names.len() - 1;
    for (i, name) in names.into_iter().enumerate() {
        let location = config.location(&name)?;
        let probe = async {
            let storage = location.storage().await?;
            storage
                .get(crate::repo::layout::REPO_JSON)
                .await
                .map(|_| ())
                .or_else(|e| match e {
                    // Not a repository: the command's own reading says so.
                    StorageError::NotFound { .. } => Ok(()),
                    e => Err(ConfigError::Key(e.into())),
                })
        };
        match probe.await {
            Ok(()) => return Ok((name, location)),
            Err(e) if i < last && e.storage_error().is_some_and(is_unreachable) => {
                tracing::warn!("location {name} is unreachable, reading the next one: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("at least the main location")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_comes_first_then_the_configuration_order() {
        let text = "repo = \"/a\"\n[[copy]]\nname = \"dr\"\nrepo = \"/b\"\n[[copy]]\nname = \"disk\"\nrepo = \"/c\"\n";
        let c = Config::from_parts(None, Some(text), &[]).unwrap();
        assert_eq!(order(&c, None).unwrap(), ["main", "dr", "disk"]);
        assert_eq!(order(&c, Some("disk")).unwrap(), ["disk", "main", "dr"]);
        assert_eq!(order(&c, Some("main")).unwrap(), ["main", "dr", "disk"]);
        assert!(order(&c, Some("nope")).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_location_falls_through_a_missing_one_does_not() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let text = format!(
            "repo = \"{}\"\n[[copy]]\nname = \"dr\"\nrepo = \"{}\"\n",
            a.path().display(),
            b.path().display()
        );
        let c = Config::from_parts(None, Some(&text), &[]).unwrap();
        // Both answer (neither holds a repository): the first is read.
        assert_eq!(first_reachable(&c, None).await.unwrap().0, "main");
        assert_eq!(first_reachable(&c, Some("dr")).await.unwrap().0, "dr");
        // The main repository on an S3 server that refuses connections: the copy is read.
        let text = format!(
            "repo = \"s3://gone/p\"\ns3_endpoint = \"http://127.0.0.1:9\"\ns3_region = \"x\"\ns3_force_path_style = true\ns3_retries = 0\ns3_timeout = \"2s\"\n[[copy]]\nname = \"dr\"\nrepo = \"{}\"\n",
            b.path().display()
        );
        let c = Config::from_parts(None, Some(&text), &[]).unwrap();
        std::env::set_var("AWS_ACCESS_KEY_ID", "x");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "y");
        assert_eq!(first_reachable(&c, None).await.unwrap().0, "dr");
        // Alone, it is an error.
        let alone = Config {
            copies: Vec::new(),
            ..c.clone()
        };
        let e = first_reachable(&alone, None).await.unwrap_err();
        assert!(e.storage_error().is_some_and(is_unreachable), "{e}");
    }
}
