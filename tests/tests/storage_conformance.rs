//! One conformance suite for every `Storage` implementation: the local directory and S3 against
//! a real Garage server. Each contract in `agent/src/storage/mod.rs` has a check here.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use pgpitr::storage::local::LocalStorage;
use pgpitr::storage::s3::{S3Location, S3Storage, MULTIPART_THRESHOLD};
use pgpitr::storage::{DynStorage, PutMode, Storage, StorageError};
use pgpitr_tests::garage::{self, Garage};

async fn conformance(s: DynStorage) {
    let loc = s.location();
    s.check_writable()
        .await
        .unwrap_or_else(|e| panic!("{loc}: {e}"));

    // put / get / head
    s.put("a/b/one", Bytes::from_static(b"first"), PutMode::Create)
        .await
        .unwrap();
    assert_eq!(
        s.get("a/b/one").await.unwrap(),
        Bytes::from_static(b"first")
    );
    assert_eq!(s.head("a/b/one").await.unwrap().unwrap().size, 5);
    assert!(s.head("a/b/none").await.unwrap().is_none());
    assert!(matches!(
        s.get("a/b/none").await,
        Err(StorageError::NotFound { .. })
    ));

    // Create never replaces; Overwrite does
    let again = s
        .put("a/b/one", Bytes::from_static(b"other"), PutMode::Create)
        .await;
    assert!(
        matches!(again, Err(StorageError::AlreadyExists { .. })),
        "{loc}: {again:?}"
    );
    assert_eq!(
        s.get("a/b/one").await.unwrap(),
        Bytes::from_static(b"first"),
        "{loc}: Create replaced an object"
    );
    s.put("a/b/one", Bytes::from_static(b"second"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        s.get("a/b/one").await.unwrap(),
        Bytes::from_static(b"second")
    );

    // ranges
    assert_eq!(
        s.get_range("a/b/one", 1..4).await.unwrap(),
        Bytes::from_static(b"eco")
    );
    assert_eq!(s.get_range("a/b/one", 3..3).await.unwrap(), Bytes::new());

    // list: any string prefix, sorted, recursive
    for k in ["a/b/two", "a/c/x", "a/bz", "b/y"] {
        s.put(k, Bytes::from(k.to_string()), PutMode::Create)
            .await
            .unwrap();
    }
    let keys =
        |v: Vec<pgpitr::storage::ObjectMeta>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
    assert_eq!(
        keys(s.list("a/b").await.unwrap()),
        ["a/b/one", "a/b/two", "a/bz"]
    );
    assert_eq!(keys(s.list("a/b/t").await.unwrap()), ["a/b/two"]);
    assert_eq!(
        keys(s.list("").await.unwrap()),
        ["a/b/one", "a/b/two", "a/bz", "a/c/x", "b/y"]
    );
    assert!(s.list("zzz/").await.unwrap().is_empty());
    // list gives each object's storage time, the one head and modified give, to the second
    // (S3 lists milliseconds, HEAD's Last-Modified has seconds); status and metrics read the
    // age of WAL from it
    let second = |t: Option<jiff::Timestamp>| t.map(|t| t.as_second());
    for o in s.list("a/").await.unwrap() {
        assert!(o.modified.is_some(), "{o:?}");
        assert_eq!(
            second(s.modified(&o.key).await.unwrap()),
            second(o.modified),
            "{o:?}"
        );
        let head = s.head(&o.key).await.unwrap().unwrap();
        assert_eq!(second(head.modified), second(o.modified), "{o:?}");
    }

    // delete is idempotent
    s.delete("a/c/x").await.unwrap();
    s.delete("a/c/x").await.unwrap();
    assert!(s.head("a/c/x").await.unwrap().is_none());

    // large objects (multipart on S3) come back byte for byte
    let big: Vec<u8> = (0..MULTIPART_THRESHOLD + 3 * 1024 * 1024 + 7)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    s.put("big/object", Bytes::from(big.clone()), PutMode::Create)
        .await
        .unwrap();
    let back = s.get("big/object").await.unwrap();
    assert!(
        back.len() == big.len() && back[..] == big[..],
        "{loc}: large object differs"
    );
    let mid = (MULTIPART_THRESHOLD as u64 - 10)..(MULTIPART_THRESHOLD as u64 + 10);
    assert_eq!(
        &s.get_range("big/object", mid.clone()).await.unwrap()[..],
        &big[mid.start as usize..mid.end as usize]
    );

    // staged objects: stored whole under a key in their directory, nothing if dropped
    let mut staged = s.stage("st/a/").await.unwrap();
    for part in [&b"frame one,"[..], b" frame two", b""] {
        staged.write_all(part).unwrap();
    }
    s.put_staged("st/a/obj", staged, PutMode::Create)
        .await
        .unwrap();
    assert_eq!(
        s.get("st/a/obj").await.unwrap(),
        Bytes::from_static(b"frame one, frame two")
    );
    let mut staged = s.stage("st/a/").await.unwrap();
    staged.write_all(b"other").unwrap();
    let again = s.put_staged("st/a/obj", staged, PutMode::Create).await;
    assert!(
        matches!(again, Err(StorageError::AlreadyExists { .. })),
        "{loc}: {again:?}"
    );
    let mut staged = s.stage("st/b/").await.unwrap();
    staged.write_all(b"dropped").unwrap();
    drop(staged);
    assert_eq!(keys(s.list("st/").await.unwrap()), ["st/a/obj"]);

    // every write above committed or cleaned up after itself: no staging object is left
    // (S3: the multipart upload of the large object was completed, not left open)
    let left = s.list_staging().await.unwrap();
    assert!(left.is_empty(), "{loc}: {left:?}");

    // keys that could escape are refused before any I/O
    for bad in ["../x", "/abs", "a/../../b", ""] {
        assert!(
            s.put(bad, Bytes::new(), PutMode::Overwrite).await.is_err(),
            "{loc}: accepted key {bad:?}"
        );
    }
}

#[tokio::test]
async fn local_directory_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Arc::new(LocalStorage::new(dir.path()))).await;
    // No temporary files are left behind.
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn encrypted_local_directory_conforms() {
    use pgpitr::crypto::envelope::Cipher;
    use pgpitr::crypto::keys::RepoKey;
    use pgpitr::storage::encrypted::EncryptedStorage;
    for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
        let dir = tempfile::tempdir().unwrap();
        let raw = Arc::new(LocalStorage::new(dir.path()));
        conformance(Arc::new(EncryptedStorage::new(
            raw,
            &RepoKey::generate(),
            cipher,
        )))
        .await;
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{cipher:?}: {leftovers:?}");
    }
}

#[tokio::test]
async fn s3_on_garage_conforms() {
    let g = Garage::shared();
    let bucket = g.bucket();
    std::env::set_var("AWS_ACCESS_KEY_ID", garage::KEY_ID);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", garage::SECRET);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let loc = S3Location::parse(
        &format!("s3://{bucket}/some/prefix"),
        Some(g.endpoint.clone()),
        garage::REGION.into(),
        true,
    )
    .unwrap();
    conformance(Arc::new(S3Storage::connect(loc).await)).await;
}

/// A writer killed in the middle of a multipart upload leaves it open: `list_staging` shows it
/// (under the prefix only) with the bytes uploaded and its start time, `remove_staging` aborts
/// it, and aborting one that is gone succeeds.
#[tokio::test]
async fn s3_incomplete_multipart_uploads_are_listed_and_aborted() {
    let g = Garage::shared();
    let bucket = g.bucket();
    std::env::set_var("AWS_ACCESS_KEY_ID", garage::KEY_ID);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", garage::SECRET);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let before = jiff::Timestamp::now();
    let mut uploads = Vec::new();
    for (key, part) in [
        ("repo/packs/ab/abcd.pack", 3000usize),
        ("other/packs/ab/abcd.pack", 10),
    ] {
        uploads.push(g.leave_upload_open(&bucket, key, part).await);
    }
    let loc = S3Location::parse(
        &format!("s3://{bucket}/repo"),
        Some(g.endpoint.clone()),
        garage::REGION.into(),
        true,
    )
    .unwrap();
    let s = S3Storage::connect(loc).await;
    let left = s.list_staging().await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].key, "packs/ab/abcd.pack");
    assert_eq!(left[0].upload_id.as_deref(), Some(uploads[0].as_str()));
    assert_eq!(left[0].size, 3000);
    let skew = left[0].modified.duration_since(before).as_secs().abs();
    assert!(skew < 300, "Initiated {} vs {before}", left[0].modified);

    s.remove_staging(&left[0]).await.unwrap();
    assert!(s.list_staging().await.unwrap().is_empty());
    s.remove_staging(&left[0]).await.unwrap();
    // The upload outside the prefix is untouched.
    let other = g
        .client()
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = other
        .uploads()
        .iter()
        .filter_map(|u| u.upload_id())
        .collect();
    assert_eq!(ids, [uploads[1].as_str()]);
}

#[tokio::test]
async fn missing_repository_is_a_clear_error() {
    let s = LocalStorage::new("/nonexistent/pgpitr-repo");
    let e = pgpitr::storage::Storage::check_writable(&s)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = pgpitr::storage::Storage::put(&s, "x", Bytes::new(), PutMode::Create)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}
