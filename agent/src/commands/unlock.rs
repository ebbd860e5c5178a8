//! `pgpitr unlock`: breaks the repository lock left by a `backup` or `expire` that died (see
//! [`crate::repo::lock`] for when a lock is stale). Prints every lock it breaks; a live lock is
//! broken only with `--force`. `--leases` instead removes every restore's lease
//! ([`crate::repo::lease`]), once the recoveries they protect are done.

use crate::config::{Config, ConfigError};
use crate::repo::lease;
use crate::repo::lock::{self, BrokenLock};
use crate::repo::RepoError;
use crate::storage::StorageError;

#[derive(clap::Args, Debug, Clone)]
pub struct UnlockArgs {
    /// Also break a lock whose holder looks alive (make sure it is not running).
    #[arg(long)]
    pub force: bool,
    /// Remove every restore's lease instead (leases/), once the recoveries are done; locks are
    /// left alone.
    #[arg(long, conflicts_with = "force")]
    pub leases: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("the repository is locked by {0}, which looks alive (it refreshed its lock recently); hint: if you are sure it is not running, use `pgpitr unlock --force`")]
    Live(String),
}

impl From<StorageError> for UnlockError {
    fn from(e: StorageError) -> Self {
        UnlockError::Repo(e.into())
    }
}

/// Breaks stale locks (all locks with `--force`) and returns what it broke; with `--leases`,
/// removes the leases instead (and returns no lock).
///
/// # Errors
/// [`UnlockError::Live`] when a live lock remains (after breaking the stale ones).
pub async fn run(config: &Config, args: &UnlockArgs) -> Result<Vec<BrokenLock>, UnlockError> {
    let storage = config.storage().await?;
    if args.leases {
        let removed = lease::remove_all(storage.as_ref()).await?;
        for l in &removed {
            println!("removed lease {}", l.describe());
        }
        if removed.is_empty() {
            println!("no lease to remove");
        }
        return Ok(Vec::new());
    }
    let (broken, live) = lock::break_locks(storage.as_ref(), args.force).await?;
    for b in &broken {
        println!("{}", render_one(b));
    }
    if let Some(l) = live.first() {
        return Err(UnlockError::Live(l.describe()));
    }
    Ok(broken)
}

fn render_one(b: &BrokenLock) -> String {
    match &b.stale {
        Some(why) => format!("broke stale lock {} held by {}: {why}", b.key, b.holder),
        None => format!("broke live lock {} held by {} (--force)", b.key, b.holder),
    }
}
