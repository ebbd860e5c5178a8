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
//! # The lock object is written once; the heartbeat is a separate object
//!
//! A lock object is written exactly once, by [`RepoLock::acquire`]. While it holds the lock the
//! holder writes `locks/<token>.beat` every [`HEARTBEAT`], and only after a HEAD shows that its
//! lock object still exists: a lock that `pgpitr unlock` removed is never re-created (a
//! HEAD-then-overwrite of the lock object itself could resurrect it). When the HEAD finds the
//! lock gone, the holder records the lock as lost, and [`RepoLock::check`] — called at every
//! commit point (`manifest.json` of a backup, each delete batch of `expire`) — fails with
//! [`LockError::Lost`]; so does a holder that could not refresh its beat for [`TRUST_FOR`].
//! Issue 15, item 4.
//!
//! # Stale locks, by the storage's clock
//!
//! A lock's last sign of life is the storage's own time of its newest write: the
//! Last-Modified (S3) or mtime (local) of its `.beat` object, else of the lock object. "Now" is
//! read from the same clock: [`storage_now`] rewrites `locks/clock` and reads its time back. A
//! lock is stale when its holder ran on this host and is no longer alive, or when its last sign
//! of life is older than [`STALE_AFTER`] by the storage's clock. The `heartbeat` time a lock
//! object records is the holder's clock and only informs messages: two hosts' clocks are never
//! compared. Backends that cannot tell an object's time fall back to this host's clock.
//!
//! A lock whose holder is **certainly dead** — same host name, and (when the lock records them)
//! the same boot and pid namespace as ours, and its pid no longer exists or now belongs to a
//! process started at another time — is broken by [`RepoLock::acquire`] itself, with a warning
//! naming it: a `backup` killed with `kill -9` must not block the next one. This is safe with the
//! protocol above because a lock key is unique to the process that wrote it: only that process
//! ever writes the object, so once it is dead nobody rewrites it, and deleting exactly that key
//! cannot remove anyone else's lock; several contenders breaking it at once all delete the same
//! key (deleting a missing key succeeds) and then contend through the normal path.
//!
//! Every other stale lock — another host whose heartbeat stopped (it may only be partitioned
//! away), an unreadable object, a holder we cannot judge — is reported, never broken silently:
//! `pgpitr unlock` breaks stale locks and prints what it broke (`--force` also breaks a live one).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout;
use crate::storage::{DynStorage, PutMode, Storage, StorageError};

/// How often the holder writes its `.beat` object.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// A lock whose last sign of life (by the storage's clock) is older than this is stale,
/// whatever host it came from.
pub const STALE_AFTER: Duration = Duration::from_secs(15 * 60);
/// A holder that could not write its beat for this long no longer counts on its lock: another
/// process may soon judge it stale. Half of [`STALE_AFTER`], so that a commit point is refused
/// well before anyone may break the lock.
pub const TRUST_FOR: Duration = Duration::from_secs(STALE_AFTER.as_secs() / 2);
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
    /// The holder's clock when it wrote the object (`started`; locks written by pgpitr before
    /// the `.beat` object rewrote it). Shown in messages, never compared with another clock.
    pub heartbeat: jiff::Timestamp,
    /// Who the holder process is beyond its pid, so that a reused pid is not taken for the
    /// holder. Absent when `/proc` could not be read, and in locks written by pgpitr before it
    /// was added (then the pid alone is judged; readers ignore fields they do not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessStamp>,
}

/// Identifies a process on a Linux host more tightly than its pid (see [`LockInfo::process`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStamp {
    /// `/proc/sys/kernel/random/boot_id`: start times only compare within one boot.
    pub boot_id: String,
    /// The `/proc/self/ns/pid` link (`pid:[4026531836]`): a pid means something only within its
    /// pid namespace (containers may share a host name).
    pub pid_namespace: String,
    /// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks after boot.
    pub start_ticks: u64,
}

impl ProcessStamp {
    /// This process's stamp, or `None` without a readable `/proc`.
    pub fn current() -> Option<ProcessStamp> {
        let (boot_id, pid_namespace) = host_context()?;
        Some(ProcessStamp {
            boot_id,
            pid_namespace,
            start_ticks: start_ticks(std::process::id())?,
        })
    }
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

    /// Why this lock's holder is certainly dead, or `None` unless it is: the lock was taken on
    /// this host (same host name and, when recorded, the same boot and pid namespace as this
    /// process) by a pid that no longer exists, or that now belongs to a process started at
    /// another time. Such a lock is broken by [`RepoLock::acquire`] without asking.
    pub fn dead_holder(&self, this_host: &str) -> Option<String> {
        if self.host != this_host {
            return None;
        }
        let Some(stamp) = &self.process else {
            // A lock from a pgpitr that did not record its process: the pid alone.
            return (!pid_exists(self.pid))
                .then(|| format!("process {} is not running on this host", self.pid));
        };
        let (boot_id, pid_namespace) = host_context()?;
        if stamp.boot_id != boot_id || stamp.pid_namespace != pid_namespace {
            // Another boot, another container or another machine of the same name: our view of
            // its pids says nothing.
            return None;
        }
        if !pid_exists(self.pid) {
            return Some(format!("process {} is not running on this host", self.pid));
        }
        match start_ticks(self.pid) {
            Some(t) if t != stamp.start_ticks => Some(format!(
                "process {} is not running on this host (the pid now belongs to another process)",
                self.pid
            )),
            // The same process, or it cannot be told (it exited meanwhile, or /proc hides it):
            // alive, to be safe.
            _ => None,
        }
    }

    /// Why this lock is stale, or `None` while its holder may be alive. Wider than
    /// [`LockInfo::dead_holder`]: also a last sign of life older than [`STALE_AFTER`], and a lock
    /// taken under this host name in another boot; these are broken only by `pgpitr unlock`.
    /// `last_seen` and `now` are both the storage's clock (see the module docs).
    pub fn stale_reason(
        &self,
        last_seen: jiff::Timestamp,
        now: jiff::Timestamp,
        this_host: &str,
    ) -> Option<String> {
        if let Some(why) = self.dead_holder(this_host) {
            return Some(why);
        }
        if let (true, Some(stamp), Some((boot_id, _))) =
            (self.host == this_host, &self.process, host_context())
        {
            if stamp.boot_id != boot_id {
                return Some(
                    "it was taken before this host restarted (its boot id differs; unless \
                     another machine has the same host name)"
                        .into(),
                );
            }
        }
        let age = now.duration_since(last_seen);
        if age.as_secs() > STALE_AFTER.as_secs() as i64 {
            return Some(format!(
                "no heartbeat for {} s by the storage's clock (more than {} s)",
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
    /// The storage's time of the newest write of the lock or its `.beat` object; `None` when
    /// the backend cannot tell.
    pub last_seen: Option<jiff::Timestamp>,
}

impl FoundLock {
    pub fn describe(&self) -> String {
        match &self.info {
            // The last heartbeat as the storage saw it (its `.beat` or lock object), when known.
            Ok(i) => LockInfo {
                heartbeat: self.last_seen.unwrap_or(i.heartbeat),
                ..i.clone()
            }
            .describe(),
            Err(e) => format!("an unreadable lock object ({e})"),
        }
    }

    /// Why it is stale; an unreadable object is stale (no live holder writes garbage). `now`
    /// is the storage's clock ([`storage_now`]); without a [`FoundLock::last_seen`], the
    /// holder's own heartbeat time stands in.
    pub fn stale_reason(&self, now: jiff::Timestamp, this_host: &str) -> Option<String> {
        match &self.info {
            Ok(i) => i.stale_reason(self.last_seen.unwrap_or(i.heartbeat), now, this_host),
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
    /// This process no longer holds its lock: it was removed (`pgpitr unlock`), or could not be
    /// refreshed for [`TRUST_FOR`]. Returned at commit points, which are then not passed.
    #[error("the repository lock {key} was lost ({why}); stopped before the next commit point; hint: check for another pgpitr backup or expire, then run this again")]
    Lost { key: String, why: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What the heartbeat task tells the holder.
#[derive(Debug)]
struct Beat {
    /// Why the lock is lost, once it is.
    lost: std::sync::Mutex<Option<String>>,
    /// When the lock or its beat was last written (this process's monotonic clock).
    refreshed: std::sync::Mutex<std::time::Instant>,
}

impl Beat {
    fn lose(&self, why: &str) {
        let mut lost = self.lost.lock().expect("not poisoned");
        if lost.is_none() {
            *lost = Some(why.to_string());
        }
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().expect("not poisoned").clone()
    }

    fn refreshed(&self) {
        *self.refreshed.lock().expect("not poisoned") = std::time::Instant::now();
    }

    fn since_refresh(&self) -> Duration {
        self.refreshed.lock().expect("not poisoned").elapsed()
    }
}

/// A held repository lock. Call [`RepoLock::release`] when done; a process that dies leaves a
/// stale lock behind (see the module docs).
#[derive(Debug)]
pub struct RepoLock {
    storage: DynStorage,
    key: String,
    beat_key: String,
    beat: std::sync::Arc<Beat>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RepoLock {
    /// Takes the lock for `command`.
    ///
    /// # Errors
    /// [`LockError::Held`] naming the holder (and whether its lock looks stale); storage errors.
    pub async fn acquire(storage: DynStorage, command: &str) -> Result<RepoLock, LockError> {
        Self::acquire_beating(storage, command, HEARTBEAT).await
    }

    /// [`RepoLock::acquire`] with a heartbeat every `every` (tests use a short one).
    pub async fn acquire_beating(
        storage: DynStorage,
        command: &str,
        every: Duration,
    ) -> Result<RepoLock, LockError> {
        let host = hostname();
        let found = list(storage.as_ref()).await?;
        // Staleness is only computed for a message; read the storage's clock only then.
        let now = if found.is_empty() {
            jiff::Timestamp::now()
        } else {
            storage_now(storage.as_ref()).await?
        };
        let held = |other: &FoundLock| LockError::Held {
            holder: other.describe(),
            key: other.key.clone(),
            stale: other.stale_reason(now, &host),
        };
        if let Some(other) = break_dead(storage.as_ref(), found, &host).await?.first() {
            return Err(held(other));
        }
        let now = jiff::Timestamp::now();
        let info = LockInfo {
            token: new_token(now),
            command: command.to_string(),
            host: host.clone(),
            pid: std::process::id(),
            started: now,
            heartbeat: now,
            process: ProcessStamp::current(),
        };
        let key = layout::lock_key(&info.token);
        let beat_key = layout::beat_key(&info.token);
        write(storage.as_ref(), &key, &info).await?;
        let beat = std::sync::Arc::new(Beat {
            lost: std::sync::Mutex::new(None),
            refreshed: std::sync::Mutex::new(std::time::Instant::now()),
        });
        let mut tries = 0;
        loop {
            // Another contender may have died since the first listing: its object is broken
            // here too (it can never win).
            let others = match list(storage.as_ref()).await {
                Ok(all) => {
                    let all = all.into_iter().filter(|l| l.key != key).collect();
                    break_dead(storage.as_ref(), all, &host).await
                }
                Err(e) => Err(e),
            };
            let others = match others {
                Ok(o) => o,
                Err(e) => {
                    let _ = storage.delete(&key).await;
                    return Err(e.into());
                }
            };
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
            let (storage, key, beat_key, beat) =
                (storage.clone(), key.clone(), beat_key.clone(), beat.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    // HEAD first, and never write the lock object itself: a lock removed by
                    // `pgpitr unlock` stays removed.
                    match storage.head(&key).await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            tracing::error!(
                                "the repository lock {key} was removed by someone else; this \
                                 process stops at its next commit point"
                            );
                            beat.lose("it was removed, e.g. by `pgpitr unlock`");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!("cannot refresh the repository lock: {e}");
                            continue;
                        }
                    }
                    let body = Bytes::from(jiff::Timestamp::now().to_string());
                    match storage.put(&beat_key, body, PutMode::Overwrite).await {
                        Ok(()) => beat.refreshed(),
                        Err(e) => tracing::warn!("cannot refresh the repository lock: {e}"),
                    }
                }
            })
        };
        Ok(RepoLock {
            storage,
            key,
            beat_key,
            beat,
            heartbeat,
        })
    }

    /// Checks, right now, that this process still holds its lock: the lock object exists (a
    /// HEAD), the heartbeat has not found it gone, and it was refreshed within [`TRUST_FOR`].
    /// Called before every commit point.
    ///
    /// # Errors
    /// [`LockError::Lost`] with the reason; storage errors of the HEAD.
    pub async fn check(&self) -> Result<(), LockError> {
        let lost = |why: String| LockError::Lost {
            key: self.key.clone(),
            why,
        };
        if let Some(why) = self.beat.lost() {
            return Err(lost(why));
        }
        if self.storage.head(&self.key).await?.is_none() {
            self.beat.lose("it was removed, e.g. by `pgpitr unlock`");
            return Err(lost("it was removed, e.g. by `pgpitr unlock`".into()));
        }
        let since = self.beat.since_refresh();
        if since > TRUST_FOR {
            return Err(lost(format!(
                "its heartbeat could not be written for {} s",
                since.as_secs()
            )));
        }
        Ok(())
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
        // The lock first: a beat without its lock means nothing (`unlock` removes it).
        for key in [&self.key, &self.beat_key] {
            if let Err(e) = self.storage.delete(key).await {
                tracing::warn!(
                    "cannot remove the repository lock {key}: {e}; remove it with `pgpitr unlock`"
                );
            }
        }
    }
}

/// Deletes the locks of `found` whose holder is certainly dead ([`LockInfo::dead_holder`]),
/// each with a warning, and returns the others. Only the examined key is deleted: it was written
/// by its dead holder alone, so nothing else can be lost.
async fn break_dead(
    storage: &dyn Storage,
    found: Vec<FoundLock>,
    host: &str,
) -> Result<Vec<FoundLock>, StorageError> {
    let mut left = Vec::new();
    for l in found {
        let why = match &l.info {
            Ok(info) => info.dead_holder(host).map(|why| (info, why)),
            Err(_) => None,
        };
        let Some((info, why)) = why else {
            left.push(l);
            continue;
        };
        storage.delete(&l.key).await?;
        storage.delete(&layout::beat_key(&l.token)).await?;
        let now = jiff::Timestamp::now();
        tracing::warn!(
            "broke the stale repository lock {} of {} (pid {} on host {}, taken {} s ago, last \
             heartbeat {} s ago): {why}",
            l.key,
            info.command,
            info.pid,
            info.host,
            now.duration_since(info.started).as_secs(),
            now.duration_since(l.last_seen.unwrap_or(info.heartbeat))
                .as_secs(),
        );
    }
    Ok(left)
}

async fn write(storage: &dyn Storage, key: &str, info: &LockInfo) -> Result<(), StorageError> {
    let body = serde_json::to_vec_pretty(info).expect("serialisable");
    storage
        .put(key, Bytes::from(body), PutMode::Overwrite)
        .await
}

/// "Now" by the storage's clock: writes `locks/<token>.clock`, reads its time back (S3
/// Last-Modified, a local file's mtime) and removes it; this host's clock when the backend
/// cannot tell.
///
/// # Errors
/// Storage errors (the write needs write access).
pub async fn storage_now(storage: &dyn Storage) -> Result<jiff::Timestamp, StorageError> {
    let local = jiff::Timestamp::now();
    let key = layout::clock_key(&new_token(local));
    storage
        .put(&key, Bytes::from(format!("{local}\n")), PutMode::Overwrite)
        .await?;
    let read = storage.modified(&key).await;
    // Removed even when the read failed; a leftover is removed by `pgpitr unlock`.
    let removed = storage.delete(&key).await;
    let now = read?.unwrap_or(local);
    removed?;
    Ok(now)
}

/// Every lock object, oldest token first, each with the storage's time of its newest write or
/// of its `.beat` ([`FoundLock::last_seen`]).
///
/// # Errors
/// Storage errors (a lock deleted between list and read is skipped).
pub async fn list(storage: &dyn Storage) -> Result<Vec<FoundLock>, StorageError> {
    let objects = storage.list(layout::LOCKS_ROOT).await?;
    let beats: std::collections::HashSet<String> = objects
        .iter()
        .filter_map(|o| layout::parse_beat_key(&o.key))
        .collect();
    let mut out = Vec::new();
    for o in objects {
        let Some(token) = layout::parse_lock_key(&o.key) else {
            continue;
        };
        let info = match storage.get(&o.key).await {
            Ok(body) => serde_json::from_slice::<LockInfo>(&body).map_err(|e| e.to_string()),
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let mut last_seen = storage.modified(&o.key).await?;
        if beats.contains(&token) {
            if let Some(t) = storage.modified(&layout::beat_key(&token)).await? {
                last_seen = Some(last_seen.map_or(t, |l| l.max(t)));
            }
        }
        out.push(FoundLock {
            key: o.key,
            token,
            info,
            last_seen,
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
    let now = storage_now(storage).await?;
    let mut broken = Vec::new();
    let mut live = Vec::new();
    let found = list(storage).await?;
    for l in &found {
        let stale = l.stale_reason(now, &host);
        if stale.is_some() || force {
            storage.delete(&l.key).await?;
            storage.delete(&layout::beat_key(&l.token)).await?;
            broken.push(BrokenLock {
                key: l.key.clone(),
                holder: l.describe(),
                stale,
            });
        } else {
            live.push(l.clone());
        }
    }
    // Beats whose lock is gone (a heartbeat that raced with a removal), and clock objects
    // older than a minute (left by a process that died while reading the storage's clock).
    let held: std::collections::HashSet<&str> = live.iter().map(|l| l.token.as_str()).collect();
    for o in storage.list(layout::LOCKS_ROOT).await? {
        if let Some(token) = layout::parse_beat_key(&o.key) {
            if !held.contains(token.as_str())
                && storage.head(&layout::lock_key(&token)).await?.is_none()
            {
                storage.delete(&o.key).await?;
            }
        } else if layout::parse_clock_key(&o.key).is_some() {
            let old = storage
                .modified(&o.key)
                .await?
                .is_some_and(|t| now.duration_since(t).as_secs() > 60);
            if old {
                storage.delete(&o.key).await?;
            }
        }
    }
    Ok((broken, live))
}

/// `<nanoseconds, 20 digits>-<pid>-<8 hex digits>`: unique, and sorting by time.
pub(crate) fn new_token(now: jiff::Timestamp) -> String {
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

/// Whether process `pid` may exist on this host: `/proc/<pid>` exists (a zombie counts), or
/// `kill(pid, 0)` says anything but ESRCH (EPERM: another user's process, which `/proc` may hide
/// when mounted with `hidepid`). Only when both say it is gone is it gone.
fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return true;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// This host's boot id and this process's pid namespace, or `None` without a readable `/proc`.
fn host_context() -> Option<(String, String)> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let (boot_id, ns) = (boot_id.trim(), ns.to_string_lossy());
    (!boot_id.is_empty() && !ns.is_empty()).then(|| (boot_id.to_string(), ns.into_owned()))
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`, in clock ticks after boot).
fn start_ticks(pid: u32) -> Option<u64> {
    parse_start_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// itself hold spaces and parentheses, so fields are counted after the last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3 (state) onwards; 22 is the 20th of them.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;
    use std::sync::Arc;

    /// Judged as if the object's storage time were the holder's heartbeat.
    trait ByHeartbeat {
        fn stale_by_heartbeat(&self, now: jiff::Timestamp, host: &str) -> Option<String>;
    }

    impl ByHeartbeat for LockInfo {
        fn stale_by_heartbeat(&self, now: jiff::Timestamp, host: &str) -> Option<String> {
            self.stale_reason(self.heartbeat, now, host)
        }
    }

    fn info(host: &str, pid: u32, heartbeat: &str) -> LockInfo {
        let t: jiff::Timestamp = heartbeat.parse().unwrap();
        LockInfo {
            token: "1".into(),
            command: "expire".into(),
            host: host.into(),
            pid,
            started: t,
            heartbeat: t,
            process: None,
        }
    }

    /// The pid and stamp of a process that has exited (and been reaped).
    fn dead_process() -> (u32, ProcessStamp) {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        let stamp = ProcessStamp {
            start_ticks: start_ticks(pid).unwrap(),
            ..ProcessStamp::current().unwrap()
        };
        child.kill().unwrap();
        child.wait().unwrap();
        (pid, stamp)
    }

    #[test]
    fn staleness() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let me = std::process::id();
        // This process: alive, fresh.
        assert_eq!(
            info("h", me, "2026-11-23T09:59:00Z").stale_by_heartbeat(now, "h"),
            None
        );
        // Same host, a pid that cannot exist.
        assert!(info("h", 0, "2026-11-23T09:59:00Z")
            .stale_by_heartbeat(now, "h")
            .unwrap()
            .contains("not running"));
        // Other host: only the heartbeat's age counts.
        assert_eq!(
            info("other", 0, "2026-11-23T09:59:00Z").stale_by_heartbeat(now, "h"),
            None
        );
        assert_eq!(
            info("other", 0, "2026-11-23T09:00:00Z").dead_holder("h"),
            None
        );
        assert!(info("other", 0, "2026-11-23T09:00:00Z")
            .stale_by_heartbeat(now, "h")
            .unwrap()
            .contains("no heartbeat"));
    }

    #[test]
    fn the_process_stamp_tells_a_reused_pid_from_the_holder() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let fresh = "2026-11-23T09:59:00Z";
        let me = std::process::id();
        let stamp = ProcessStamp::current().expect("/proc is readable");
        let stamped = |pid: u32, stamp: ProcessStamp| LockInfo {
            process: Some(stamp),
            ..info("h", pid, fresh)
        };
        // This very process: alive.
        assert_eq!(stamped(me, stamp.clone()).dead_holder("h"), None);
        assert_eq!(
            stamped(me, stamp.clone()).stale_by_heartbeat(now, "h"),
            None
        );
        // Our pid, but started at another time: the holder is gone, the pid was reused.
        let reused = stamped(
            me,
            ProcessStamp {
                start_ticks: stamp.start_ticks + 1,
                ..stamp.clone()
            },
        );
        assert!(
            reused.dead_holder("h").unwrap().contains("another process"),
            "{reused:?}"
        );
        // A process that has exited.
        let (pid, dead) = dead_process();
        assert!(stamped(pid, dead.clone())
            .dead_holder("h")
            .unwrap()
            .contains("not running"));
        // Another pid namespace (a container with our host name): cannot judge, not stale while
        // the heartbeat is fresh.
        let other_ns = stamped(
            pid,
            ProcessStamp {
                pid_namespace: "pid:[1]".into(),
                ..dead.clone()
            },
        );
        assert_eq!(other_ns.dead_holder("h"), None);
        assert_eq!(other_ns.stale_by_heartbeat(now, "h"), None);
        // Another boot: not broken automatically, but `pgpitr unlock` may break it.
        let other_boot = stamped(
            pid,
            ProcessStamp {
                boot_id: "00000000-0000-0000-0000-000000000000".into(),
                ..dead
            },
        );
        assert_eq!(other_boot.dead_holder("h"), None);
        assert!(other_boot
            .stale_by_heartbeat(now, "h")
            .unwrap()
            .contains("restarted"));
    }

    #[test]
    fn lock_objects_stay_readable_across_versions() {
        // Written by a pgpitr without the process stamp.
        let old = r#"{"token":"1","command":"backup","host":"h","pid":7,
            "started":"2026-11-23T09:59:00Z","heartbeat":"2026-11-23T09:59:00Z"}"#;
        let i: LockInfo = serde_json::from_str(old).unwrap();
        assert_eq!(i.process, None);
        // Written with it; unknown fields (from later versions) are ignored.
        let mut v = serde_json::to_value(LockInfo {
            process: ProcessStamp::current(),
            ..i.clone()
        })
        .unwrap();
        assert!(v["process"]["start_ticks"].is_u64(), "{v}");
        v["later"] = serde_json::json!(1);
        let back: LockInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back.process, ProcessStamp::current());
        // And without a stamp the field is left out.
        assert!(serde_json::to_value(&i).unwrap().get("process").is_none());
    }

    #[test]
    fn start_ticks_are_counted_after_the_command_name() {
        let fields: Vec<String> = (3..=25).map(|f| f.to_string()).collect();
        let line = format!("42 (a) b (c)) {}\n", fields.join(" "));
        assert_eq!(parse_start_ticks(&line), Some(22));
        assert_eq!(parse_start_ticks("42 (x) S 1 2"), None);
        assert_eq!(parse_start_ticks("garbage"), None);
        assert!(start_ticks(std::process::id()).is_some());
    }

    #[test]
    fn tokens_are_valid_and_sort_by_time() {
        let a = new_token("2026-11-23T10:00:00Z".parse().unwrap());
        let b = new_token("2026-11-23T10:00:01Z".parse().unwrap());
        assert!(layout::is_lock_token(&a), "{a}");
        assert!(a < b);
    }

    async fn plant(storage: &dyn Storage, info: &LockInfo) -> String {
        let key = layout::lock_key(&info.token);
        write(storage, &key, info).await.unwrap();
        key
    }

    /// A lock left by a `kill -9`'d process of this host.
    fn dead_lock(token: &str) -> LockInfo {
        let (pid, stamp) = dead_process();
        LockInfo {
            token: token.into(),
            process: Some(stamp),
            ..info(&hostname(), pid, "2026-11-23T09:59:00Z")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_contenders_never_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        for round in 0..5 {
            // Every other round, a dead holder's lock that every contender wants to break.
            let dead = (round % 2 == 1).then(|| dead_lock("00000000000000000001-1-0000dead"));
            if let Some(d) = &dead {
                plant(storage.as_ref(), d).await;
            }
            let tries: Vec<_> = (0..8)
                .map(|_| tokio::spawn(RepoLock::acquire(storage.clone(), "expire")))
                .collect();
            let mut won = Vec::new();
            for t in tries {
                if let Ok(lock) = t.await.unwrap() {
                    won.push(lock);
                }
            }
            assert!(won.len() <= 1, "round {round}: {} holders", won.len());
            let left = list(storage.as_ref()).await.unwrap();
            assert!(
                left.iter().all(|l| !l.key.contains("dead")),
                "round {round}: the dead lock is still there"
            );
            assert_eq!(
                left.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(),
                won.iter().map(|l| l.key()).collect::<Vec<_>>()
            );
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

        // Locks left by dead processes on this host, with and without the process stamp, are
        // broken by the next acquire.
        let stamped = plant(storage.as_ref(), &dead_lock("00000000000000000001-1-dead")).await;
        let legacy = LockInfo {
            token: "00000000000000000002-0-dead".into(),
            host: hostname(),
            ..info("x", 0, "2026-11-23T09:59:00Z")
        };
        let legacy = plant(storage.as_ref(), &legacy).await;
        let lock = RepoLock::acquire(storage.clone(), "expire").await.unwrap();
        let left: Vec<String> = list(storage.as_ref())
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(left, vec![lock.key().to_string()]);
        assert!(!left.contains(&stamped) && !left.contains(&legacy));
        lock.release().await;

        // Another host with a fresh heartbeat: refused, to wait.
        let fresh = LockInfo {
            token: "00000000000000000003-7-other".into(),
            heartbeat: jiff::Timestamp::now(),
            ..info("another-host", 0, "2026-11-23T09:59:00Z")
        };
        let fresh_key = plant(storage.as_ref(), &fresh).await;
        let msg = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("another-host") && msg.contains("wait") && !msg.contains("stale"),
            "{msg}"
        );
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert!(broken.is_empty() && live.len() == 1);
        storage.delete(&fresh_key).await.unwrap();

        // Another host whose heartbeat stopped: reported stale, broken only by `unlock`.
        let old = LockInfo {
            token: "00000000000000000004-7-other".into(),
            ..info("another-host", 0, "2026-11-23T09:00:00Z")
        };
        let old_key = plant(storage.as_ref(), &old).await;
        // The storage last heard of it an hour ago (its own clock, not the holder's).
        set_mtime(
            dir.path(),
            &old_key,
            jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1),
        );
        let msg = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stale") && msg.contains("no heartbeat") && msg.contains("pgpitr unlock"),
            "{msg}"
        );
        assert_eq!(list(storage.as_ref()).await.unwrap().len(), 1);
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert_eq!(broken.len(), 1);
        assert!(live.is_empty());
        RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap()
            .release()
            .await;
    }

    /// A storage that removes `armed` right after answering a HEAD that found it: `pgpitr
    /// unlock` running between the heartbeat's HEAD and its write.
    #[derive(Debug)]
    struct RemovedAfterHead {
        inner: LocalStorage,
        armed: std::sync::Mutex<Option<String>>,
    }

    #[async_trait::async_trait]
    impl Storage for RemovedAfterHead {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn check_writable(&self) -> crate::storage::StorageResult<()> {
            self.inner.check_writable().await
        }
        async fn put(
            &self,
            key: &str,
            data: Bytes,
            mode: PutMode,
        ) -> crate::storage::StorageResult<()> {
            self.inner.put(key, data, mode).await
        }
        async fn get(&self, key: &str) -> crate::storage::StorageResult<Bytes> {
            self.inner.get(key).await
        }
        async fn get_range(
            &self,
            key: &str,
            range: std::ops::Range<u64>,
        ) -> crate::storage::StorageResult<Bytes> {
            self.inner.get_range(key, range).await
        }
        async fn head(
            &self,
            key: &str,
        ) -> crate::storage::StorageResult<Option<crate::storage::ObjectMeta>> {
            let found = self.inner.head(key).await?;
            let armed = self.armed.lock().unwrap().take_if(|k| k.as_str() == key);
            if let (Some(_), Some(k)) = (&found, armed) {
                self.inner.delete(&k).await?;
            }
            Ok(found)
        }
        async fn list(
            &self,
            prefix: &str,
        ) -> crate::storage::StorageResult<Vec<crate::storage::ObjectMeta>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> crate::storage::StorageResult<()> {
            self.inner.delete(key).await
        }
        async fn modified(
            &self,
            key: &str,
        ) -> crate::storage::StorageResult<Option<jiff::Timestamp>> {
            self.inner.modified(key).await
        }
    }

    /// Issue 15, item 4: the heartbeat used to HEAD the lock and then rewrite it, so a lock
    /// removed in between came back. Now it writes only the `.beat` object, finds the lock gone
    /// at its next HEAD and the holder's next commit point fails.
    #[tokio::test]
    async fn the_heartbeat_never_resurrects_a_removed_lock() {
        let dir = tempfile::tempdir().unwrap();
        let racy = Arc::new(RemovedAfterHead {
            inner: LocalStorage::new(dir.path().to_path_buf()),
            armed: std::sync::Mutex::new(None),
        });
        let storage: DynStorage = racy.clone();
        let lock = RepoLock::acquire_beating(storage.clone(), "backup", Duration::from_millis(50))
            .await
            .unwrap();
        let written = storage.get(lock.key()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Beats come as a separate object; the lock object is untouched.
        assert!(storage.head(&lock.beat_key).await.unwrap().is_some());
        assert_eq!(storage.get(lock.key()).await.unwrap(), written);
        lock.check().await.unwrap();

        *racy.armed.lock().unwrap() = Some(lock.key().to_string());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(racy.armed.lock().unwrap().is_none(), "the heartbeat ran");
        assert!(
            storage.head(lock.key()).await.unwrap().is_none(),
            "the removed lock was written again"
        );
        let err = lock.check().await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Lost { .. }), "{msg}");
        assert!(msg.contains("was lost") && !msg.contains('\n'), "{msg}");
        // Another process can take the lock now; `unlock` clears the orphaned beat.
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert!(broken.is_empty() && live.is_empty());
        assert!(storage.head(&lock.beat_key).await.unwrap().is_none());
        lock.release().await;
    }

    #[tokio::test]
    async fn check_fails_once_the_lock_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let lock = RepoLock::acquire(storage.clone(), "expire").await.unwrap();
        lock.check().await.unwrap();
        let (broken, _) = break_locks(storage.as_ref(), true).await.unwrap();
        assert_eq!(broken.len(), 1);
        assert!(matches!(lock.check().await, Err(LockError::Lost { .. })));
        lock.release().await;
        // Nothing is left in locks/: no lock, no beat, no clock object.
        assert!(storage.list(layout::LOCKS_ROOT).await.unwrap().is_empty());
    }

    fn set_mtime(dir: &std::path::Path, key: &str, t: jiff::Timestamp) {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(key))
            .unwrap();
        f.set_modified(std::time::SystemTime::from(t)).unwrap();
    }

    /// Issue 15, item 4: staleness used to compare the holder's heartbeat time with the
    /// checker's clock. Now both sides of the comparison are the storage's clock.
    #[tokio::test]
    async fn staleness_is_judged_by_the_storage_clock() {
        let dir = tempfile::tempdir().unwrap();
        let storage: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let now = jiff::Timestamp::now();
        let day = jiff::SignedDuration::from_hours(24);

        // A live holder whose clock runs a day behind ours (ours runs ahead): its heartbeat
        // time looks a day old, its object is fresh. Live.
        let behind = LockInfo {
            token: "00000000000000000005-7-behind".into(),
            heartbeat: now - day,
            started: now - day,
            ..info("another-host", 1, "2026-11-23T09:59:00Z")
        };
        let key = plant(storage.as_ref(), &behind).await;
        let msg = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("wait") && !msg.contains("stale"), "{msg}");
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert!(broken.is_empty() && live.len() == 1, "{broken:?}");
        // An old lock object kept alive by a fresh beat: live too.
        set_mtime(dir.path(), &key, now - day);
        storage
            .put(
                &layout::beat_key(&behind.token),
                Bytes::from_static(b"x"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert!(broken.is_empty() && live.len() == 1, "{broken:?}");
        storage.delete(&key).await.unwrap();
        storage
            .delete(&layout::beat_key(&behind.token))
            .await
            .unwrap();

        // A dead holder whose clock ran a day ahead: its heartbeat time is in the future, but
        // the storage last heard of it an hour ago. Stale.
        let ahead = LockInfo {
            token: "00000000000000000006-7-ahead".into(),
            heartbeat: now + day,
            started: now + day,
            ..info("another-host", 1, "2026-11-23T09:59:00Z")
        };
        let key = plant(storage.as_ref(), &ahead).await;
        set_mtime(dir.path(), &key, now - jiff::SignedDuration::from_hours(1));
        let msg = RepoLock::acquire(storage.clone(), "expire")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stale") && msg.contains("storage's clock"),
            "{msg}"
        );
        let (broken, live) = break_locks(storage.as_ref(), false).await.unwrap();
        assert_eq!(broken.len(), 1, "{live:?}");
        assert!(live.is_empty());
    }
}
