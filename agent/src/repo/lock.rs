//! The repository lock: at most one `pgpitr backup` or `pgpitr expire` at a time per repository,
//! on a local directory and on S3 alike.
//!
//! # Why not one `locks/repo.lock` created with `PutMode::Create`
//!
//! On S3, `PutMode::Create` is a HEAD followed by a PUT with `If-None-Match: *`, and some servers
//! (Garage 2.5) ignore that header: two processes can both "create" the same key and both believe
//! they hold it. So every contender writes its OWN object, `locks/<token>.lock` (a unique token:
//! the time in nanoseconds, the pid and random digits, so tokens sort by time), and then lists
//! `locks/`. The rule that makes this safe needs nothing but a list that shows every object
//! whose PUT completed before the list began (local directories; AWS S3 and Garage are strongly
//! consistent):
//!
//! - a contender **wins only if a listing taken after its own PUT shows no other lock object**;
//! - otherwise it deletes its object and fails — at once if an older (smaller) token exists,
//!   after re-listing for a couple of seconds if it is itself the oldest (the others may be
//!   backing off).
//!
//! Two winners are impossible: if A won, its listing came after A's PUT and showed no B, so B's
//! PUT came after that listing, while A's object still existed; B's own listing therefore shows
//! A and B cannot win. Losing together is possible under a tight race; both then fail clearly,
//! which is safe.
//!
//! # Stale locks
//!
//! The holder rewrites its object every [`HEARTBEAT`] with a fresh `heartbeat` time. A lock is
//! stale when its holder ran on this host and its pid is no longer alive, or when its heartbeat
//! is older than [`STALE_AFTER`] (the holder is on another host, or its pid was reused). Stale
//! locks are reported, never broken silently: `pgpitr unlock` breaks them and prints what it
//! broke (`--force` also breaks a live one).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout;
use crate::storage::{DynStorage, PutMode, Storage, StorageError};

/// How often the holder refreshes its lock object.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// A lock whose heartbeat is older than this is stale, whatever host it came from.
pub const STALE_AFTER: Duration = Duration::from_secs(15 * 60);
/// How long the oldest of several contenders waits for the others to back off.
const CONTEND_WAIT: Duration = Duration::from_millis(500);
const CONTEND_TRIES: u32 = 4;

/// What a lock object says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub token: String,
    /// `backup` or `expire`.
    pub command: String,
    pub host: String,
    pub pid: u32,
    pub started: jiff::Timestamp,
    pub heartbeat: jiff::Timestamp,
}

impl LockInfo {
    /// `expire (pid 123 on host db1, since 2026-11-23T07:00:00Z)`.
    pub fn describe(&self) -> String {
        format!(
            "{} (pid {} on host {}, since {}, last heartbeat {})",
            self.command,
            self.pid,
            self.host,
            self.started
                .round(jiff::Unit::Second)
                .unwrap_or(self.started),
            self.heartbeat
                .round(jiff::Unit::Second)
                .unwrap_or(self.heartbeat)
        )
    }

    /// Why this lock is stale, or `None` while its holder may be alive.
    pub fn stale_reason(&self, now: jiff::Timestamp, this_host: &str) -> Option<String> {
        if self.host == this_host && !pid_alive(self.pid) {
            return Some(format!("process {} is not running on this host", self.pid));
        }
        let age = now.duration_since(self.heartbeat);
        if age.as_secs() > STALE_AFTER.as_secs() as i64 {
            return Some(format!(
                "no heartbeat for {} s (more than {} s)",
                age.as_secs(),
                STALE_AFTER.as_secs()
            ));
        }
        None
    }
}

/// One lock object found in `locks/`.
#[derive(Debug, Clone)]
pub struct FoundLock {
    pub key: String,
    pub token: String,
    /// `Err` with the reason when the object cannot be read or decoded.
    pub info: Result<LockInfo, String>,
}

impl FoundLock {
    pub fn describe(&self) -> String {
        match &self.info {
            Ok(i) => i.describe(),
            Err(e) => format!("an unreadable lock object ({e})"),
        }
    }

    /// Why it is stale; an unreadable object is stale (no live holder writes garbage).
    pub fn stale_reason(&self, now: jiff::Timestamp, this_host: &str) -> Option<String> {
        match &self.info {
            Ok(i) => i.stale_reason(now, this_host),
            Err(e) => Some(format!("unreadable: {e}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the repository is locked by {holder} ({key}){}; hint: {}", .stale.as_ref().map(|s| format!(": the lock is stale, {s}")).unwrap_or_default(), if .stale.is_some() { "check that no pgpitr backup or expire is running, then break it with `pgpitr unlock`" } else { "wait for it to finish; one backup or expire runs at a time per repository" })]
    Held {
        holder: String,
        key: String,
        stale: Option<String>,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A held repository lock. Call [`RepoLock::release`] when done; a process that dies leaves a
/// stale lock behind (see the module docs).
#[derive(Debug)]
pub struct RepoLock {
    storage: DynStorage,
    key: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RepoLock {
    /// Takes the lock for `command`.
    ///
    /// # Errors
    /// [`LockError::Held`] naming the holder (and whether its lock looks stale); storage errors.
    pub async fn acquire(storage: DynStorage, command: &str) -> Result<RepoLock, LockError> {
        let now = jiff::Timestamp::now();
        let host = hostname();
        let held = |other: &FoundLock| LockError::Held {
            holder: other.describe(),
            key: other.key.clone(),
            stale: other.stale_reason(jiff::Timestamp::now(), &host),
        };
        if let Some(other) = list(storage.as_ref()).await?.first() {
            return Err(held(other));
        }
        let info = LockInfo {
            token: new_token(now),
            command: command.to_string(),
            host: host.clone(),
            pid: std::process::id(),
            started: now,
            heartbeat: now,
        };
        let key = layout::lock_key(&info.token);
        write(storage.as_ref(), &key, &info).await?;
        let mut tries = 0;
        loop {
            let all = list(storage.as_ref()).await;
            let all = match all {
                Ok(a) => a,
                Err(e) => {
                    let _ = storage.delete(&key).await;
                    return Err(e.into());
                }
            };
            let others: Vec<&FoundLock> = all.iter().filter(|l| l.key != key).collect();
            let Some(first) = others.first() else {
                break;
            };
            tries += 1;
            if first.token < info.token || tries >= CONTEND_TRIES {
                let err = held(first);
                storage.delete(&key).await?;
                return Err(err);
            }
            tokio::time::sleep(CONTEND_WAIT).await;
        }
        tracing::debug!("took the repository lock {key}");
        let heartbeat = {
            let (storage, key, mut info) = (storage.clone(), key.clone(), info.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    match storage.head(&key).await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            tracing::error!("the repository lock {key} was broken by someone else");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("cannot refresh the repository lock: {e}");
                            continue;
                        }
                    }
                    info.heartbeat = jiff::Timestamp::now();
                    if let Err(e) = write(storage.as_ref(), &key, &info).await {
                        tracing::warn!("cannot refresh the repository lock: {e}");
                    }
                }
            })
        };
        Ok(RepoLock {
            storage,
            key,
            heartbeat,
        })
    }

    /// The lock object's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops the heartbeat and deletes the lock object (a failure is logged: the lock then
    /// looks stale once its heartbeat ages).
    pub async fn release(self) {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        if let Err(e) = self.storage.delete(&self.key).await {
            tracing::warn!(
                "cannot remove the repository lock {}: {e}; remove it with `pgpitr unlock`",
                self.key
            );
        }
    }
}

async fn write(storage: &dyn Storage, key: &str, info: &LockInfo) -> Result<(), StorageError> {
    let body = serde_json::to_vec_pretty(info).expect("serialisable");
    storage
        .put(key, Bytes::from(body), PutMode::Overwrite)
        .await
}

/// Every lock object, oldest token first.
///
/// # Errors
/// Storage errors (a lock deleted between list and read is skipped).
pub async fn list(storage: &dyn Storage) -> Result<Vec<FoundLock>, StorageError> {
    let mut out = Vec::new();
    for o in storage.list(layout::LOCKS_ROOT).await? {
        let Some(token) = layout::parse_lock_key(&o.key) else {
            continue;
        };
        let info = match storage.get(&o.key).await {
            Ok(body) => serde_json::from_slice::<LockInfo>(&body).map_err(|e| e.to_string()),
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        out.push(FoundLock {
            key: o.key,
            token,
            info,
        });
    }
    out.sort_by(|a, b| a.token.cmp(&b.token));
    Ok(out)
}

/// A lock that [`break_locks`] removed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct BrokenLock {
    pub key: String,
    pub holder: String,
    /// Why it was stale; `None` for a live lock broken with `force`.
    pub stale: Option<String>,
}

/// Deletes stale locks (and live ones too when `force`). Returns what was broken and the live
/// locks left in place.
///
/// # Errors
/// Storage errors.
pub async fn break_locks(
    storage: &dyn Storage,
    force: bool,
) -> Result<(Vec<BrokenLock>, Vec<FoundLock>), StorageError> {
    let host = hostname();
    let now = jiff::Timestamp::now();
    let mut broken = Vec::new();
    let mut live = Vec::new();
    for l in list(storage).await? {
        let stale = l.stale_reason(now, &host);
        if stale.is_some() || force {
            storage.delete(&l.key).await?;
            broken.push(BrokenLock {
                key: l.key.clone(),
                holder: l.describe(),
                stale,
            });
        } else {
            live.push(l);
        }
    }
    Ok((broken, live))
}

/// `<nanoseconds, 20 digits>-<pid>-<8 hex digits>`: unique, and sorting by time.
fn new_token(now: jiff::Timestamp) -> String {
    use sha2::{Digest, Sha256};
    let nanos = now.as_nanosecond().max(0) as u128;
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(hostname().as_bytes());
    let local = 0u8;
    h.update((&local as *const u8 as usize).to_le_bytes());
    format!(
        "{nanos:020}-{}-{}",
        std::process::id(),
        hex::encode(&h.finalize()[..4])
    )
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `gethostname`).
pub fn hostname() -> String {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let s = s.trim();
        if !s.is_empty() {
            return s.to_string();
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        return String::from_utf8_lossy(&buf[..end]).into_owned();
    }
    "unknown".into()
}

/// Whether process `pid` exists on this host (`kill(pid, 0)`; EPERM means it exists).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;
    use std::sync::Arc;

    fn info(host: &str, pid: u32, heartbeat: &str) -> LockInfo {
        let t: jiff::Timestamp = heartbeat.parse().unwrap();
        LockInfo {
            token: "1".into(),
            command: "expire".into(),
            host: host.into(),
            pid,
            started: t,
            heartbeat: t,
        }
    }

    #[test]
    fn staleness() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let me = std::process::id();
        // This process: alive, fresh.
        assert_eq!(
            info("h", me, "2026-11-23T09:59:00Z").stale_reason(now, "h"),
            None
        );
        // Same host, a pid that cannot exist.
        assert!(info("h", 0, "2026-11-23T09:59:00Z")
            .stale_reason(now, "h")
            .unwrap()
            .contains("not running"));
        // Other host: only the heartbeat's age counts.
        assert_eq!(
            info("other", 0, "2026-11-23T09:59:00Z").stale_reason(now, "h"),
            None
        );
        assert!(info("other", 0, "2026-11-23T09:00:00Z")
            .stale_reason(now, "h")
            .unwrap()
            .contains("no heartbeat"));
    }

    #[test]
    fn tokens_are_valid_and_sort_by_time() {
        let a = new_token("2026-11-23T10:00:00Z".parse().unwrap());
        let b = new_token("2026-11-23T10:00:01Z".parse().unwrap());
        assert!(layout::is_lock_token(&a), "{a}");
        assert!(a < b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_contenders_never_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        for _ in 0..5 {
            let tries: Vec<_> = (0..8)
                .map(|_| tokio::spawn(RepoLock::acquire(storage.clone(), "expire")))
                .collect();
            let mut won = Vec::new();
            for t in tries {
                if let Ok(lock) = t.await.unwrap() {
                    won.push(lock);
                }
            }
            assert!(won.len() <= 1, "{} holders", won.len());
            for lock in won {
                lock.release().await;
            }
            assert!(list(storage.as_ref()).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_stale_locks_are_broken() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let lock = RepoLock::acquire(storage.clone(), "backup").await.unwrap();
        let err = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("locked by backup") && msg.contains("wait"),
            "{msg}"
        );
        // Live: not broken without force.
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert!(broken.is_empty() && live.len() == 1);
        lock.release().await;
        assert!(list(storage.as_ref()).await.unwrap().is_empty());

        // A lock left by a dead process on this host.
        let dead = LockInfo {
            token: "00000000000000000001-0-dead".into(),
            host: hostname(),
            pid: 0,
            ..info("x", 0, "2026-11-23T09:59:00Z")
        };
        write(storage.as_ref(), &layout::lock_key(&dead.token), &dead)
            .await
            .unwrap();
        let msg = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stale") && msg.contains("pgpitr unlock"),
            "{msg}"
        );
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert_eq!(broken.len(), 1);
        assert!(live.is_empty());
        RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap()
            .release()
            .await;
    }
}
