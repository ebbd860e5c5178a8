//! The WAL archive: storing WAL files under content-addressed keys (`layout::wal_object_key`) and
//! getting them back verified. The `archive_command` contract (PostgreSQL docs, "Continuous
//! Archiving and Point-in-Time Recovery", 26.3.1) is enforced here: the same name with the same
//! content is a success, with different content an error that leaves the archived copy untouched.

use std::io::Write;
use std::path::Path;

use super::codec;
use super::layout;
use super::{restore_points, RepoError};
use crate::crypto::keys::ContentIds;
use crate::pg::{RestorePointScanner, WalFileName};
use crate::storage::{PutMode, Storage, StorageError};

/// One stored WAL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedWal {
    pub name: WalFileName,
    pub content_id: String,
    pub key: String,
    /// Compressed size in bytes.
    pub size: u64,
}

/// What [`push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The same content was already archived under this name; nothing was written.
    AlreadyArchived,
}

/// What [`store`] did, and the SHA-256 (hex) of the bytes it archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub outcome: PushOutcome,
    pub content_id: String,
}

/// Every stored WAL object whose key starts with `prefix` (a directory from
/// `layout::wal_dir`, or `layout::WAL_ROOT` for all), sorted by name.
pub async fn list(storage: &dyn Storage, prefix: &str) -> Result<Vec<ArchivedWal>, RepoError> {
    let mut out: Vec<ArchivedWal> = storage
        .list(prefix)
        .await?
        .into_iter()
        .filter_map(|o| {
            layout::parse_wal_object_key(&o.key).map(|(name, content_id)| ArchivedWal {
                name,
                content_id,
                key: o.key,
                size: o.size,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.key.cmp(&b.key)));
    Ok(out)
}

/// The stored versions of `name` (normally zero or one).
pub async fn find(storage: &dyn Storage, name: WalFileName) -> Result<Vec<ArchivedWal>, RepoError> {
    list(storage, &layout::wal_object_prefix(name)).await
}

/// Picks the one stored version of `name` from a listing.
///
/// # Errors
/// [`RepoError::Ambiguous`] when two different contents are stored under the name (possible only
/// when two writers raced on a server without conditional PUT).
pub fn pick(listing: &[ArchivedWal], name: WalFileName) -> Result<Option<&ArchivedWal>, RepoError> {
    let mut found = listing.iter().filter(|w| w.name == name);
    let first = found.next();
    match found.count() {
        0 => Ok(first),
        more => Err(RepoError::Ambiguous {
            name,
            count: more + 1,
        }),
    }
}

/// Stores the file at `path` as WAL file `name`, streaming it through compression and hashing on
/// every core ([`codec::compress_into`]) into the storage's staging area (for a local
/// repository, a temporary file beside the object). The restore points in a segment or
/// `.partial` file are found on the way and indexed first (`repo::restore_points`). Durable when
/// it returns `Ok` (the storage's `put` contract).
///
/// # Errors
/// [`RepoError::DifferentContent`] when `name` is archived with other bytes;
/// [`RepoError::Ambiguous`] when it is archived with two or more different contents, whichever
/// they are; an unreadable file; storage errors.
pub async fn push(
    storage: &dyn Storage,
    name: WalFileName,
    path: &Path,
) -> Result<PushOutcome, RepoError> {
    store(storage, name, path).await.map(|p| p.outcome)
}

/// [`push`], also returning the SHA-256 of the bytes archived.
///
/// # Errors
/// As [`push`].
pub async fn store(
    storage: &dyn Storage,
    name: WalFileName,
    path: &Path,
) -> Result<Pushed, RepoError> {
    let source = path.to_path_buf();
    let holds_records = matches!(name, WalFileName::Segment(_) | WalFileName::Partial(_));
    let mut staged = storage.stage(&layout::wal_dir(name)).await?;
    let (written, staged, points) = tokio::task::spawn_blocking(move || {
        let io = |e| RepoError::io(&source, e);
        let file = std::fs::File::open(&source).map_err(io)?;
        let map = map_file(&file).map_err(io)?;
        let plain = map.as_deref().unwrap_or_default();
        let mut scanner = holds_records.then(RestorePointScanner::new);
        let written = codec::compress_into(
            plain,
            &mut staged,
            &mut |part| {
                if let Some(s) = &mut scanner {
                    s.feed(part);
                }
            },
            &|range| release(map.as_ref(), range),
        )
        .map_err(|e| {
            // A full repository disk: the staged file's error already names where and why.
            let message = if crate::storage::is_disk_full(&e) {
                e.to_string()
            } else {
                format!("writing the compressed WAL file: {e}")
            };
            RepoError::Storage(StorageError::Permanent {
                key: layout::wal_dir(name),
                message,
            })
        })?;
        let points = scanner.map(RestorePointScanner::finish).unwrap_or_default();
        Ok::<_, RepoError>((written, staged, points))
    })
    .await
    .expect("compression task")?;
    let sha = storage.content_ids().id(&written.sha256);
    let archived = judge(name, &find(storage, name).await?, &sha)?;
    // Indexed before the file is stored, so an archived file's restore points are always known;
    // a file refused for other content indexes nothing. The same bytes pushed again are indexed
    // again, in case an earlier push stopped in between.
    restore_points::record(storage, &points).await?;
    if let Some(outcome) = archived {
        return Ok(Pushed {
            outcome,
            content_id: sha,
        });
    }
    let key = layout::wal_object_key(name, &sha);
    match storage.put_staged(&key, staged, PutMode::Create).await {
        Ok(()) => {}
        // Same key means same hash: someone stored these very bytes a moment ago.
        Err(StorageError::AlreadyExists { .. }) => {
            return Ok(Pushed {
                outcome: PushOutcome::AlreadyArchived,
                content_id: sha,
            })
        }
        Err(e) => return Err(e.into()),
    }
    // A racing writer with other content may have slipped in on a server without conditional
    // PUT: look again, and if so report it rather than leave two versions unnoticed.
    judge(name, &find(storage, name).await?, &sha)?;
    Ok(Pushed {
        outcome: PushOutcome::Stored,
        content_id: sha,
    })
}

/// All of `file`, mapped read-only, or `None` for an empty file (an empty mapping is an
/// error). Mapped rather than read: a segment is then hashed and compressed straight from the
/// page cache, with no copy and no fresh memory to fault in, which is slow on a virtual
/// machine. The pages are faulted in as the threads reach them and dropped from the mapping
/// part by part once done with ([`release`]), so that a push's resident memory stays small
/// (mapped pages count in it).
///
/// # Errors
/// `mmap` failing.
fn map_file(file: &std::fs::File) -> std::io::Result<Option<memmap2::Mmap>> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: a mapping is undefined behaviour only if the file changes while mapped.
    // PostgreSQL does not write, truncate or recycle a WAL file while archive_command runs on
    // it (pgarch.c archives only completed files: segments, .partial, .history, .backup).
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Some(map))
}

/// Drops bytes `range` of `map` from this process's page table (`MADV_DONTNEED`); the file's
/// pages stay in the page cache. A hint: failing changes nothing but resident memory.
fn release(map: Option<&memmap2::Mmap>, range: std::ops::Range<usize>) {
    if let Some(map) = map.filter(|_| !range.is_empty()) {
        // SAFETY: on a shared file mapping, MADV_DONTNEED only unmaps pages, which a later read
        // would fault in again from the page cache (madvise(2)); `compress_into` releases a
        // range only once no thread reads it any more. The offset is a multiple of PART_SIZE,
        // so page-aligned.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
    }
}

/// What the stored `versions` of `name` say about archiving content whose SHA-256 is `new`:
/// `None` when nothing is stored yet, [`PushOutcome::AlreadyArchived`] when the one stored
/// content is `new`. Every version counts, not the first listed: `pgpitr-restore` refuses a name
/// stored with two contents ([`pick`]), so a push must never report success for such a name.
/// The rule is the `archive_command` contract (PostgreSQL docs, "Continuous Archiving and
/// Point-in-Time Recovery", 26.3.1): exit 0 only when the file is archived and restorable.
///
/// # Errors
/// [`RepoError::Ambiguous`] when two or more different contents are stored (a race of writers on
/// a server without conditional PUT), whatever `new` is; [`RepoError::DifferentContent`] when
/// exactly one content is stored and it is not `new`.
fn judge(
    name: WalFileName,
    versions: &[ArchivedWal],
    new: &str,
) -> Result<Option<PushOutcome>, RepoError> {
    let mut contents: Vec<&str> = versions
        .iter()
        .filter(|w| w.name == name)
        .map(|w| w.content_id.as_str())
        .collect();
    contents.sort_unstable();
    contents.dedup();
    // A `.partial` file is the tail of a timeline some server left (at promotion, issue 20):
    // two servers, or two promotions, may leave different tails under one name (a primary and
    // a standby archiving into one repository). PostgreSQL never asks `restore_command` for one,
    // so each content is kept under its own key, and none is ever refused.
    if matches!(name, WalFileName::Partial(_)) {
        if contents.contains(&new) {
            return Ok(Some(PushOutcome::AlreadyArchived));
        }
        if !contents.is_empty() {
            tracing::warn!(
                "WAL file {name} is already archived with other content; this content is kept \
                 beside it (a .partial file is never restored by PostgreSQL)"
            );
        }
        return Ok(None);
    }
    match contents[..] {
        [] => Ok(None),
        [existing] if existing == new => Ok(Some(PushOutcome::AlreadyArchived)),
        [existing] => Err(RepoError::DifferentContent {
            name,
            existing: existing.to_string(),
            new: new.to_string(),
        }),
        _ => Err(RepoError::Ambiguous {
            name,
            count: contents.len(),
        }),
    }
}

/// Downloads `wal`, verifies its SHA-256 and writes it to `dest` atomically: a temporary file in
/// `dest`'s directory renamed into place only after verification, with mode 0600. Not synced:
/// PostgreSQL fsyncs every file `restore_command` delivers (see [`Durability`]).
///
/// # Errors
/// [`RepoError::Corrupt`] on a checksum or lz4 failure (nothing is written at `dest`); storage
/// and I/O errors.
pub async fn fetch_to(
    storage: &dyn Storage,
    wal: &ArchivedWal,
    dest: &Path,
) -> Result<u64, RepoError> {
    let compressed = storage.get(&wal.key).await?;
    write_to(
        compressed,
        wal,
        dest,
        Durability::LeftToCaller,
        storage.content_ids(),
    )
    .await
}

/// What [`write_to`] does for durability before renaming the file into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Starts writing the file to disk without waiting (`sync_file_range`), for files fetched
    /// ahead. PostgreSQL fsyncs every file `restore_command` restores, in the startup process
    /// (KeepFileRestoredFromArchive's durable_rename, src/backend/access/transam/xlogarchive.c):
    /// a segment whose writeback began while the one before it was replayed costs recovery
    /// little or no disk wait there, and the fetch ahead is not slowed down by waiting itself.
    WritebackStarted,
    /// Left to the caller: for files PostgreSQL syncs itself right after the call.
    LeftToCaller,
}

/// The second half of [`fetch_to`]: verifies `compressed`, the stored object of `wal`, and
/// writes its plain bytes to `dest` atomically (on a blocking thread).
///
/// # Errors
/// As [`fetch_to`], without the storage errors.
pub async fn write_to(
    compressed: bytes::Bytes,
    wal: &ArchivedWal,
    dest: &Path,
    durability: Durability,
    ids: ContentIds,
) -> Result<u64, RepoError> {
    let (wal, dest) = (wal.clone(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || write_verified(&compressed, &wal, &dest, durability, &ids))
        .await
        .expect("decompression task")
}

fn write_verified(
    compressed: &[u8],
    wal: &ArchivedWal,
    dest: &Path,
    durability: Durability,
    ids: &ContentIds,
) -> Result<u64, RepoError> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".pgpitr-")
        .tempfile_in(dir)
        .map_err(|e| RepoError::io(dir, e))?;
    // A failed write (a full disk at `dest`) is an I/O error at `dest`, not a corrupt object.
    let corrupt = |e: codec::DecodeError| match e {
        codec::DecodeError::Write(e) => RepoError::io(dest, e),
        e => RepoError::Corrupt {
            key: wal.key.clone(),
            message: e.to_string(),
        },
    };
    let file = tmp.as_file();
    let expected = codec::Expected {
        ids,
        id: &wal.content_id,
    };
    let parts = codec::decode_parts(compressed, expected, &|offset, plain| {
        std::os::unix::fs::FileExt::write_all_at(file, plain, offset)
    });
    let written = match parts.map_err(corrupt)? {
        Some(n) => n,
        // Written before objects had a part index: one SHA-256, on a thread of its own.
        None => {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            let n = codec::decompress_verified(compressed, expected, &mut out).map_err(corrupt)?;
            out.flush().map_err(|e| RepoError::io(dest, e))?;
            n
        }
    };
    if durability == Durability::WritebackStarted {
        crate::storage::local::start_writeback(tmp.as_file());
    }
    tmp.persist(dest)
        .map_err(|e| RepoError::io(dest, e.error))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::restore_point::tests::{restore_point, WalWriter};
    use crate::storage::local::LocalStorage;

    /// A WAL segment holding `count` restore points named `name`.
    fn segment_with(name: &str, count: usize) -> Vec<u8> {
        let mut w = WalWriter::new(2);
        for _ in 0..count {
            w.record(&restore_point(name, 0));
        }
        w.bytes()
    }

    #[tokio::test]
    async fn restore_points_are_indexed_only_for_the_bytes_archived() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("repo"));
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        let name: WalFileName = "000000010000000000000003".parse().unwrap();
        let file = dir.path().join("segment");
        let indexed = || async { restore_points::load(&storage).await.unwrap() };
        let indexed_names = || async {
            let names: Vec<String> = indexed().await.into_iter().map(|p| p.name).collect();
            names
        };

        std::fs::write(&file, segment_with("first", 1)).unwrap();
        assert_eq!(
            push(&storage, name, &file).await.unwrap(),
            PushOutcome::Stored
        );
        assert_eq!(indexed_names().await, ["first"]);

        // Other bytes under the same name: refused, and their restore points (one of them at
        // another LSN) are not indexed.
        std::fs::write(&file, segment_with("other", 2)).unwrap();
        let err = push(&storage, name, &file).await.unwrap_err();
        assert!(matches!(err, RepoError::DifferentContent { .. }), "{err}");
        assert_eq!(indexed_names().await, ["first"]);

        // The same bytes again, with the index lost in between: indexed again.
        restore_points::remove(&storage, &indexed().await)
            .await
            .unwrap();
        std::fs::write(&file, segment_with("first", 1)).unwrap();
        assert_eq!(
            push(&storage, name, &file).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
        assert_eq!(indexed_names().await, ["first"]);
        // Neither the refused push nor the repeated one left a file behind.
        let wal_dir = dir.path().join("repo").join(layout::wal_dir(name));
        let files: Vec<_> = std::fs::read_dir(&wal_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    /// Issue 15, item 7: two versions of one name (writers racing on a server without
    /// conditional PUT) make `pgpitr-restore` refuse the name, so no push of it may succeed,
    /// whichever version is listed first.
    #[tokio::test]
    async fn a_push_counts_every_stored_version_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("repo"));
        let elsewhere = LocalStorage::new(dir.path().join("elsewhere"));
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
        let name: WalFileName = "000000010000000000000003".parse().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, segment_with("a", 1)).unwrap();
        std::fs::write(&b, segment_with("b", 1)).unwrap();
        std::fs::write(&c, segment_with("c", 1)).unwrap();

        // The second version is planted as the losing writer of a race would have stored it.
        assert_eq!(push(&storage, name, &a).await.unwrap(), PushOutcome::Stored);
        assert_eq!(
            push(&elsewhere, name, &b).await.unwrap(),
            PushOutcome::Stored
        );
        let planted = &find(&elsewhere, name).await.unwrap()[0];
        let bytes = elsewhere.get(&planted.key).await.unwrap();
        storage
            .put(&planted.key, bytes, PutMode::Create)
            .await
            .unwrap();
        let versions = find(&storage, name).await.unwrap();
        assert_eq!(versions.len(), 2);
        assert!(matches!(
            pick(&versions, name),
            Err(RepoError::Ambiguous { count: 2, .. })
        ));

        // Either stored content, or a third: refused as ambiguous, and nothing more is stored.
        for file in [&a, &b, &c] {
            let err = push(&storage, name, file).await.unwrap_err();
            assert!(
                matches!(err, RepoError::Ambiguous { count: 2, .. }),
                "{}: {err}",
                file.display()
            );
            assert!(err.to_string().contains("stored 2 times"), "{err}");
        }
        assert_eq!(find(&storage, name).await.unwrap().len(), 2);
    }

    /// Issue 20: a primary and a standby archiving into one repository may each leave a
    /// `.partial` tail of one name with other bytes (each promotion its own): every content is
    /// kept under its own key, and the same content again is a success, never a refusal.
    #[tokio::test]
    async fn differing_partial_files_are_all_kept_and_never_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("repo"));
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        let name: WalFileName = "000000010000000000000003.partial".parse().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, segment_with("a", 1)).unwrap();
        std::fs::write(&b, segment_with("b", 2)).unwrap();
        assert_eq!(push(&storage, name, &a).await.unwrap(), PushOutcome::Stored);
        assert_eq!(push(&storage, name, &b).await.unwrap(), PushOutcome::Stored);
        for file in [&a, &b] {
            assert_eq!(
                push(&storage, name, file).await.unwrap(),
                PushOutcome::AlreadyArchived
            );
        }
        let versions = find(&storage, name).await.unwrap();
        assert_eq!(versions.len(), 2, "{versions:?}");
        assert_ne!(versions[0].content_id, versions[1].content_id);
        // A segment of the same number still refuses other bytes.
        let segment: WalFileName = "000000010000000000000003".parse().unwrap();
        assert_eq!(
            push(&storage, segment, &a).await.unwrap(),
            PushOutcome::Stored
        );
        let err = push(&storage, segment, &b).await.unwrap_err();
        assert!(matches!(err, RepoError::DifferentContent { .. }), "{err}");
    }

    #[test]
    fn a_push_is_judged_by_the_distinct_contents_stored() {
        let name: WalFileName = "000000010000000000000003".parse().unwrap();
        let version = |sha: &str| ArchivedWal {
            name,
            content_id: sha.to_string(),
            key: layout::wal_object_key(name, sha),
            size: 1,
        };
        let (x, y, z) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        assert!(matches!(judge(name, &[], &x), Ok(None)));
        assert!(matches!(
            judge(name, &[version(&x)], &x),
            Ok(Some(PushOutcome::AlreadyArchived))
        ));
        match judge(name, &[version(&y)], &x) {
            Err(RepoError::DifferentContent { existing, new, .. }) => {
                assert_eq!((existing, new), (y.clone(), x.clone()));
            }
            other => panic!("{other:?}"),
        }
        // Whichever comes first in the listing.
        for versions in [
            [version(&x), version(&y)],
            [version(&y), version(&x)],
            [version(&y), version(&z)],
        ] {
            assert!(matches!(
                judge(name, &versions, &x),
                Err(RepoError::Ambiguous { count: 2, .. })
            ));
        }
        // One content listed twice is still one content.
        assert!(matches!(
            judge(name, &[version(&x), version(&x)], &x),
            Ok(Some(PushOutcome::AlreadyArchived))
        ));
    }

    #[tokio::test]
    async fn files_of_any_size_come_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("repo"));
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        // Up to ten parts, the last one partial.
        let sizes = [
            0,
            1,
            8192,
            3 * 1024 * 1024 + 5,
            9 * codec::PART_SIZE + 12_345,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let name: WalFileName = format!("00000001000000000000000{i}.partial")
                .parse()
                .unwrap();
            let plain: Vec<u8> = (0..size).map(|b| (b * 7 % 251) as u8).collect();
            let file = dir.path().join(name.to_string());
            std::fs::write(&file, &plain).unwrap();
            assert_eq!(
                push(&storage, name, &file).await.unwrap(),
                PushOutcome::Stored
            );
            let found = find(&storage, name).await.unwrap();
            let dest = dir.path().join("restored");
            let n = fetch_to(&storage, &found[0], &dest).await.unwrap();
            assert_eq!(n, size as u64);
            assert!(std::fs::read(&dest).unwrap() == plain, "{size} bytes");
        }
    }
}
