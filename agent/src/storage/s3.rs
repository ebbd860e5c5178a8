//! A repository under an S3 bucket and prefix (AWS S3 or a compatible server such as Garage or
//! MinIO), through aws-sdk-s3: SigV4, retries with backoff and the standard credential chain
//! (environment, shared profile, web identity, IMDS) come from the SDK, never from our code.
//! Objects above [`MULTIPART_THRESHOLD`] go up as multipart uploads. Every write (PutObject and
//! CreateMultipartUpload; pgpitr never copies objects server-side) carries the configured
//! [`WriteOptions`]: server-side encryption and storage class.
//!
//! With `s3_object_lock` ([`ObjectLock`]) every object whose key is not mutable is written
//! with an Object Lock retention (`x-amz-object-lock-mode` and `-retain-until-date`; a multipart
//! upload also gets a PutObjectRetention after its completion, for servers that ignore the
//! headers of CreateMultipartUpload), the bucket is checked for Object Lock by
//! [`Storage::check_writable`], and a delete removes every version of the key by its id: in a
//! versioned bucket a plain DELETE only adds a delete marker and frees nothing.

use std::ops::Range;
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::{RetryConfig, RetryPartition, TokenBucket};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::primitives::DateTime;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled, ObjectLockMode,
    ObjectLockRetention, ObjectLockRetentionMode, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{
    validate_key, LockMode, ObjectLock, ObjectMeta, PutMode, StagingObject, Storage, StorageError,
    StorageResult,
};

/// Objects larger than this are uploaded in parts of [`PART_SIZE`].
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Part size for multipart uploads (S3's minimum is 5 MiB for all but the last part).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once per multipart upload.
const PART_CONCURRENCY: usize = 2;
/// Default of `s3_timeout`: the longest one attempt of one request may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `s3_retries`: attempts after the first.
pub const DEFAULT_RETRIES: u32 = 4;
/// The longest connecting may take (within the attempt's timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first backoff before a retry; it doubles with each retry (with jitter) up to
/// [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Where and how to reach the bucket; credentials are not here: they come from the AWS chain.
#[derive(Debug, Clone)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without a leading slash, empty or ending in `/`.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    /// Longest one attempt of one request may take (`s3_timeout`).
    pub timeout: Duration,
    /// Attempts after the first (`s3_retries`).
    pub retries: u32,
    /// Encryption and storage class of every object written.
    pub write: WriteOptions,
    /// Object Lock of the objects written (`s3_object_lock`); `None`: nothing is locked.
    pub lock: Option<ObjectLock>,
}

/// What every PutObject and CreateMultipartUpload asks of the server: `s3_sse`,
/// `s3_sse_kms_key_id` and `s3_storage_class` (none: the bucket's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub sse: Option<Sse>,
    pub storage_class: Option<Class>,
}

/// Server-side encryption (`x-amz-server-side-encryption`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// `AES256`: SSE-S3, keys managed by S3.
    Aes256,
    /// `aws:kms`: SSE-KMS with this key (id, ARN or alias), or the account's `aws/s3` key.
    Kms { key_id: Option<String> },
}

/// Storage classes an object can be read from at once (`x-amz-storage-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Standard,
    StandardIa,
    OnezoneIa,
    IntelligentTiering,
    GlacierIr,
}

impl Class {
    /// Every accepted class with its S3 name.
    pub const ALL: [(Class, &'static str); 5] = [
        (Class::Standard, "STANDARD"),
        (Class::StandardIa, "STANDARD_IA"),
        (Class::OnezoneIa, "ONEZONE_IA"),
        (Class::IntelligentTiering, "INTELLIGENT_TIERING"),
        (Class::GlacierIr, "GLACIER_IR"),
    ];

    fn sdk(self) -> StorageClass {
        match self {
            Class::Standard => StorageClass::Standard,
            Class::StandardIa => StorageClass::StandardIa,
            Class::OnezoneIa => StorageClass::OnezoneIa,
            Class::IntelligentTiering => StorageClass::IntelligentTiering,
            Class::GlacierIr => StorageClass::GlacierIr,
        }
    }
}

impl WriteOptions {
    /// Parses the three keys (an empty string counts as unset, so that an environment variable
    /// can clear a file's value). Messages never quote the value given, only pgpitr's own names.
    ///
    /// # Errors
    /// `(key, message)`: an unknown encryption or class; a class whose objects need a restore
    /// request before a GET; a KMS key id without `s3_sse = "aws:kms"`, or not a plain token.
    pub fn parse(
        sse: Option<&str>,
        kms_key_id: Option<&str>,
        class: Option<&str>,
    ) -> Result<WriteOptions, (&'static str, String)> {
        fn set(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let key_id = match set(kms_key_id) {
            Some(k) if k.len() > 2048 || k.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err((
                    "s3_sse_kms_key_id",
                    "expected a KMS key id, key ARN or alias (at most 2048 characters, no spaces)"
                        .into(),
                ))
            }
            k => k.map(str::to_string),
        };
        let sse = match set(sse) {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("AES256") => Some(Sse::Aes256),
            Some(v) if v.eq_ignore_ascii_case("aws:kms") => Some(Sse::Kms { key_id: None }),
            Some(_) => return Err(("s3_sse", "expected \"AES256\" or \"aws:kms\"".into())),
        };
        let sse = match (sse, key_id) {
            (Some(Sse::Kms { .. }), key_id) => Some(Sse::Kms { key_id }),
            (_, Some(_)) => {
                return Err((
                    "s3_sse_kms_key_id",
                    "set only with s3_sse = \"aws:kms\"; set that too, or remove the key id".into(),
                ))
            }
            (sse, None) => sse,
        };
        let storage_class = match set(class).map(str::to_ascii_uppercase) {
            None => None,
            Some(v) => Some(Class::parse(&v).map_err(|m| ("s3_storage_class", m))?),
        };
        Ok(WriteOptions { sse, storage_class })
    }
}

impl Class {
    /// An upper-case class name.
    fn parse(name: &str) -> Result<Class, String> {
        if let Some((class, _)) = Class::ALL.iter().find(|(_, n)| *n == name) {
            return Ok(*class);
        }
        let names: Vec<&str> = Class::ALL.iter().map(|(_, n)| *n).collect();
        let valid = names.join(", ");
        Err(match name {
            "GLACIER" | "DEEP_ARCHIVE" | "GLACIER_FLEXIBLE_RETRIEVAL" | "GLACIER_DEEP_ARCHIVE" => {
                format!(
                    "{name} is refused: its objects must be restored by a request (hours) before they can be read, so restores and restore_command would fail; use one of {valid}"
                )
            }
            "REDUCED_REDUNDANCY" => format!(
                "REDUCED_REDUNDANCY is refused: it keeps fewer copies than STANDARD and is no cheaper (AWS advises against it); use one of {valid}"
            ),
            _ => format!("unknown storage class; expected one of {valid}"),
        })
    }
}

impl S3Location {
    /// Parses `s3://bucket[/prefix]`; the other fields are given.
    ///
    /// # Errors
    /// A URL without the `s3://` scheme or without a bucket name.
    pub fn parse(
        url: &str,
        endpoint: Option<String>,
        region: String,
        force_path_style: bool,
    ) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| "not an s3:// URL".to_string())?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("the URL names no bucket: expected s3://bucket/prefix".into());
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix,
            endpoint,
            region,
            force_path_style,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            write: WriteOptions::default(),
            lock: None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    location: S3Location,
}

impl S3Storage {
    /// Builds a client: `1 + location.retries` attempts per request with exponential backoff,
    /// each attempt (connecting, sending, reading the answer) bounded by `location.timeout`, so
    /// a stalled server is a timeout, then a retry, never a hang. One request therefore ends
    /// within `attempts × timeout + the backoffs` (see docs/configuration.md, `s3_timeout`).
    pub async fn connect(location: S3Location) -> Self {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(location.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(location.retries.saturating_add(1))
                    .with_initial_backoff(INITIAL_BACKOFF)
                    .with_max_backoff(MAX_BACKOFF),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT.min(location.timeout))
                    .read_timeout(location.timeout)
                    .operation_attempt_timeout(location.timeout)
                    .build(),
            )
            .load()
            .await;
        // Every request gets its retries: the SDK's default retry quota, shared by the whole
        // process, runs dry after a few dozen retries, and a long backup on a flaky network
        // would then fail at the first error. Each request stays bounded by `retries`.
        let partition = RetryPartition::custom("pgpitr")
            .token_bucket(TokenBucket::unlimited())
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(location.force_path_style)
            .retry_partition(partition);
        if let Some(endpoint) = &location.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        S3Storage {
            client: Client::from_conf(conf.build()),
            location,
        }
    }

    /// `x-amz-server-side-encryption`, `-aws-kms-key-id` and `x-amz-storage-class` of every
    /// write.
    fn write_headers(
        &self,
    ) -> (
        Option<ServerSideEncryption>,
        Option<String>,
        Option<StorageClass>,
    ) {
        let w = &self.location.write;
        let (sse, key_id) = match &w.sse {
            None => (None, None),
            Some(Sse::Aes256) => (Some(ServerSideEncryption::Aes256), None),
            Some(Sse::Kms { key_id }) => (Some(ServerSideEncryption::AwsKms), key_id.clone()),
        };
        (sse, key_id, w.storage_class.map(Class::sdk))
    }

    /// The Object Lock mode and retain-until date of a new object under `key`: `None` without
    /// `s3_object_lock` and for mutable keys.
    fn lock_of(&self, key: &str) -> Option<(ObjectLockMode, jiff::Timestamp)> {
        let lock = self.location.lock.as_ref()?;
        if (lock.is_mutable)(key) {
            return None;
        }
        let retain = if key.starts_with(crate::repo::layout::WAL_ROOT) {
            lock.retain_wal
        } else {
            lock.retain
        };
        let retain = jiff::SignedDuration::try_from(retain).ok()?;
        let until = jiff::Timestamp::now().checked_add(retain).ok()?;
        Some((object_lock_mode(lock.mode), until))
    }

    fn full_key(&self, key: &str) -> StorageResult<String> {
        validate_key(key)?;
        Ok(format!("{}{}", self.location.prefix, key))
    }

    async fn put_multipart(&self, key: &str, full: &str, data: Bytes) -> StorageResult<()> {
        let bucket = &self.location.bucket;
        let (sse, key_id, class) = self.write_headers();
        let lock = self.lock_of(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(full)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(key_id)
            .set_storage_class(class)
            .set_object_lock_mode(lock.as_ref().map(|(m, _)| m.clone()))
            .set_object_lock_retain_until_date(lock.as_ref().map(|(_, t)| aws_time(*t)))
            .set_checksum_algorithm(lock.as_ref().map(|_| ChecksumAlgorithm::Crc32))
            .send()
            .await
            .map_err(|e| map_err(key, e))?;
        let part_checksum = lock.as_ref().map(|_| ChecksumAlgorithm::Crc32);
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let parts: Vec<(i32, Bytes)> = (0..data.len())
            .step_by(PART_SIZE)
            .enumerate()
            .map(|(i, start)| {
                (
                    i as i32 + 1,
                    data.slice(start..(start + PART_SIZE).min(data.len())),
                )
            })
            .collect();
        let uploaded: StorageResult<Vec<CompletedPart>> = futures::stream::iter(parts)
            .map(|(number, body)| {
                let upload_id = upload_id.clone();
                let part_checksum = part_checksum.clone();
                let with_checksum = part_checksum.is_some();
                async move {
                    let out = self
                        .client
                        .upload_part()
                        .bucket(bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .part_number(number)
                        .set_checksum_algorithm(part_checksum)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| map_err(key, e))?;
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        // Only an upload created with a checksum algorithm (a locked one)
                        // expects the parts' checksums at its completion.
                        .set_checksum_crc32(
                            with_checksum
                                .then(|| out.checksum_crc32().map(str::to_string))
                                .flatten(),
                        )
                        .build())
                }
            })
            .buffered(PART_CONCURRENCY)
            .try_collect()
            .await;
        let completed = match uploaded {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| map_err(key, e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed?;
        // Some servers (moto) complete the upload without the lock its creation asked for.
        match lock {
            Some((_, until)) => self.extend_lock(key, until).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// GET of `key` (or of `range` of it) with its whole body. The SDK retries a request that
    /// fails before its answer's headers, but not a body cut short after them (a reset or a
    /// stall mid-body, a truncated body); those are retried here, as often and with the same
    /// backoff as the SDK's retries, but not once [`S3Storage::request_bound`] has passed: a
    /// GET ends within twice that bound.
    async fn get_object(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<Bytes> {
        let full = self.full_key(key)?;
        let mut backoff = INITIAL_BACKOFF;
        let mut attempt = 0u32;
        let deadline = std::time::Instant::now() + self.request_bound();
        loop {
            let out = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(&full)
                .set_range(
                    range
                        .as_ref()
                        .map(|r| format!("bytes={}-{}", r.start, r.end - 1)),
                )
                .send()
                .await
                .map_err(|e| map_err(key, e))?;
            let expected = out.content_length().and_then(|n| u64::try_from(n).ok());
            let body = match collect(key, out.body).await {
                Ok(b) if expected.is_none_or(|n| n == b.len() as u64) => Ok(b),
                Ok(b) => Err(StorageError::Transient {
                    key: key.to_string(),
                    message: format!(
                        "the object body was cut short ({} of {} bytes)",
                        b.len(),
                        expected.unwrap_or(0)
                    ),
                }),
                Err(e) => Err(e),
            };
            match body {
                Err(e)
                    if attempt < self.location.retries && std::time::Instant::now() < deadline =>
                {
                    tracing::debug!("retrying a GET whose body failed: {e}");
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// The longest one request takes with its retries: `(1 + retries) × timeout` plus the
    /// backoffs between the attempts (each at most double the one before, from
    /// [`INITIAL_BACKOFF`] up to [`MAX_BACKOFF`]).
    pub fn request_bound(&self) -> Duration {
        let mut total = self.location.timeout * self.location.retries.saturating_add(1);
        let mut backoff = INITIAL_BACKOFF;
        for _ in 0..self.location.retries {
            total += backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        total
    }

    /// HEAD of `key`: `None` when it does not exist.
    async fn head_object(
        &self,
        key: &str,
    ) -> StorageResult<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.location.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(e) => match map_err(key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }
}

impl S3Storage {
    /// With `s3_object_lock`: the bucket must have Object Lock enabled (else every locked
    /// write fails) and no default retention (it would lock pgpitr's mutable objects too, and
    /// the repository lock could never be released).
    async fn check_object_lock(&self) -> StorageResult<()> {
        let bucket = &self.location.bucket;
        let config = match self
            .client
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(out) => out.object_lock_configuration().cloned(),
            Err(e) => match e.code() {
                Some("ObjectLockConfigurationNotFoundError") => None,
                _ => return Err(map_err("", e)),
            },
        };
        let enabled = config
            .as_ref()
            .and_then(|c| c.object_lock_enabled())
            .is_some_and(|e| *e == ObjectLockEnabled::Enabled);
        if !enabled {
            return Err(StorageError::Permanent {
                key: String::new(),
                message: format!(
                    "bucket '{bucket}' has no Object Lock enabled, which `s3_object_lock` needs; enable it on the bucket (see docs/operations.md, \"Immutable backups\") or remove `s3_object_lock`"
                ),
            });
        }
        if config
            .as_ref()
            .and_then(|c| c.rule())
            .and_then(|r| r.default_retention())
            .is_some()
        {
            return Err(StorageError::Permanent {
                key: String::new(),
                message: format!(
                    "bucket '{bucket}' has a default Object Lock retention, which would lock the repository's lock and lease objects too; remove the bucket's default retention (pgpitr sets each object's retention itself)"
                ),
            });
        }
        Ok(())
    }

    /// Deletes every version and delete marker of `key` by its id (ListObjectVersions). A
    /// version still locked fails the call with [`StorageError::Permanent`]; the versions
    /// listed before it are gone.
    async fn delete_versions(&self, key: &str, full: &str) -> StorageResult<()> {
        let bucket = &self.location.bucket;
        let mut ids: Vec<String> = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(bucket)
                .prefix(full)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| map_err(key, e))?;
            ids.extend(
                page.versions()
                    .iter()
                    .filter(|v| v.key() == Some(full))
                    .filter_map(|v| v.version_id().map(str::to_string)),
            );
            ids.extend(
                page.delete_markers()
                    .iter()
                    .filter(|v| v.key() == Some(full))
                    .filter_map(|v| v.version_id().map(str::to_string)),
            );
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() && version_marker.is_none() {
                break;
            }
        }
        for id in ids {
            match self
                .client
                .delete_object()
                .bucket(bucket)
                .key(full)
                .version_id(&id)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) => match map_err(key, e) {
                    StorageError::NotFound { .. } => {}
                    StorageError::Permanent { message, .. } if message.contains("access denied") => {
                        return Err(StorageError::Permanent {
                            key: key.to_string(),
                            message: "a version of the object is still under Object Lock (or deleting versions is not allowed): it stays until its lock ends".into(),
                        })
                    }
                    other => return Err(other),
                },
            }
        }
        Ok(())
    }

    /// Bytes uploaded so far by the incomplete upload `upload_id` of `full` (ListParts).
    async fn uploaded_bytes(&self, key: &str, full: &str, upload_id: &str) -> StorageResult<u64> {
        let mut pages = self
            .client
            .list_parts()
            .bucket(&self.location.bucket)
            .key(full)
            .upload_id(upload_id)
            .into_paginator()
            .send();
        let mut total = 0u64;
        while let Some(page) = pages.next().await {
            let page = match page.map_err(|e| map_err(key, e)) {
                Ok(p) => p,
                // Completed or aborted since it was listed.
                Err(StorageError::NotFound { .. }) => return Ok(0),
                Err(e) => return Err(e),
            };
            total += page
                .parts()
                .iter()
                .map(|p| p.size().unwrap_or(0).max(0) as u64)
                .sum::<u64>();
        }
        Ok(total)
    }
}

/// Maps an SDK error (after the SDK's own retries) to what the caller can act on. The message
/// holds the service's error code and text, never a credential.
fn map_err<E>(key: &str, e: SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = key.to_string();
    let status = match &e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    };
    let message = match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_string(),
        _ => unanswered(&e),
    };
    match (status, &e) {
        // A missing bucket is never a missing object: pgpitr-restore's "not found" would end
        // recovery.
        (_, _) if e.code() == Some("NoSuchBucket") => StorageError::Permanent {
            key,
            message: "no such bucket; create it, or check the bucket in `repo`".into(),
        },
        (Some(404), _) => StorageError::NotFound { key },
        (Some(412), _) => StorageError::AlreadyExists { key },
        (_, SdkError::TimeoutError(_) | SdkError::DispatchFailure(_)) => StorageError::Transient { key, message },
        (Some(s), _) if s >= 500 || s == 429 => StorageError::Transient { key, message: format!("HTTP {s}: {message}") },
        (Some(403), _) => StorageError::Permanent {
            key,
            message: format!("access denied ({message}); check the credentials in the AWS chain and the bucket policy"),
        },
        _ => StorageError::Permanent { key, message },
    }
}

/// One line for a request the service never answered, naming the cause and the fix, never the
/// SDK's error chain (which quotes the endpoint and runs to kilobytes).
fn unanswered<E, R>(e: &SdkError<E, R>) -> String
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let chain = DisplayErrorContext(e).to_string();
    tracing::debug!("S3 request failed: {chain}");
    match e {
        SdkError::TimeoutError(_) => {
            "timed out waiting for the S3 endpoint; check that it is reachable, or raise `s3_timeout`".into()
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            "timed out connecting to the S3 endpoint; check `s3_endpoint` and the network".into()
        }
        SdkError::DispatchFailure(_) if chain.contains("credentials") => {
            "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials for the user running pgpitr".into()
        }
        SdkError::DispatchFailure(d) if d.is_io() => {
            "the S3 endpoint is unreachable (connection failed); check `s3_endpoint` and the network".into()
        }
        SdkError::DispatchFailure(_) => {
            "the request could not be sent to the S3 endpoint; check `s3_endpoint`, the network and the credentials (PGPITR_LOG=debug shows the details)".into()
        }
        _ => "the S3 endpoint gave no usable answer (PGPITR_LOG=debug shows the details)".into(),
    }
}

#[async_trait::async_trait]
impl Storage for S3Storage {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.location.bucket, self.location.prefix)
    }

    async fn check_writable(&self) -> StorageResult<()> {
        match self
            .client
            .head_bucket()
            .bucket(&self.location.bucket)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => {
                return Err(match map_err("", e) {
                    StorageError::NotFound { .. } => StorageError::Permanent {
                        key: String::new(),
                        message: format!(
                            "bucket '{}' does not exist; create it or fix `repo`",
                            self.location.bucket
                        ),
                    },
                    other => other,
                })
            }
        }
        match &self.location.lock {
            Some(_) => self.check_object_lock().await,
            None => Ok(()),
        }
    }

    fn object_lock(&self) -> Option<&ObjectLock> {
        self.location.lock.as_ref()
    }

    async fn locked_until(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        if self.location.lock.is_none() {
            return Ok(None);
        }
        let until = self
            .head_object(key)
            .await?
            .and_then(|out| out.object_lock_retain_until_date().and_then(timestamp));
        Ok(until.filter(|t| *t > jiff::Timestamp::now()))
    }

    async fn extend_lock(&self, key: &str, until: jiff::Timestamp) -> StorageResult<bool> {
        let Some(lock) = &self.location.lock else {
            return Ok(false);
        };
        if (lock.is_mutable)(key) {
            return Ok(false);
        }
        let Some(head) = self.head_object(key).await? else {
            return Ok(false);
        };
        let current = head.object_lock_retain_until_date().and_then(timestamp);
        if current.is_some_and(|c| c >= aws_timestamp(until)) {
            return Ok(false);
        }
        // A lock keeps its mode: S3 refuses to turn COMPLIANCE into GOVERNANCE.
        let mode = match head.object_lock_mode() {
            Some(ObjectLockMode::Compliance) => ObjectLockRetentionMode::Compliance,
            Some(ObjectLockMode::Governance) => ObjectLockRetentionMode::Governance,
            _ => match lock.mode {
                LockMode::Governance => ObjectLockRetentionMode::Governance,
                LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            },
        };
        let full = self.full_key(key)?;
        self.client
            .put_object_retention()
            .bucket(&self.location.bucket)
            .key(&full)
            .set_version_id(head.version_id().map(str::to_string))
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .retention(
                ObjectLockRetention::builder()
                    .mode(mode)
                    .retain_until_date(aws_time(until))
                    .build(),
            )
            .send()
            .await
            .map(|_| true)
            .map_err(|e| map_err(key, e))
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StorageResult<()> {
        let full = self.full_key(key)?;
        if mode == PutMode::Create && self.head(key).await?.is_some() {
            return Err(StorageError::AlreadyExists {
                key: key.to_string(),
            });
        }
        if data.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(key, &full, data).await;
        }
        let (sse, key_id, class) = self.write_headers();
        let lock = self.lock_of(key);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.location.bucket)
            .key(&full)
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(key_id)
            .set_storage_class(class)
            // A PUT with a lock must carry a checksum (Content-MD5 or x-amz-checksum-*).
            .set_checksum_algorithm(lock.as_ref().map(|_| ChecksumAlgorithm::Crc32))
            .set_object_lock_mode(lock.as_ref().map(|(m, _)| m.clone()))
            .set_object_lock_retain_until_date(lock.map(|(_, t)| aws_time(t)))
            .body(ByteStream::from(data));
        if mode == PutMode::Create {
            req = req.if_none_match("*");
        }
        req.send().await.map(|_| ()).map_err(|e| map_err(key, e))
    }

    async fn get(&self, key: &str) -> StorageResult<Bytes> {
        self.get_object(key, None).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StorageResult<Bytes> {
        self.full_key(key)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.get_object(key, Some(range)).await
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        Ok(self.head_object(key).await?.map(|out| ObjectMeta {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0) as u64,
            modified: out.last_modified().and_then(timestamp),
        }))
    }

    async fn modified(&self, key: &str) -> StorageResult<Option<jiff::Timestamp>> {
        Ok(self
            .head_object(key)
            .await?
            .and_then(|out| out.last_modified().and_then(timestamp)))
    }

    async fn list(&self, prefix: &str) -> StorageResult<Vec<ObjectMeta>> {
        let full_prefix = format!("{}{}", self.location.prefix, prefix);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.location.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_err(prefix, e))?;
            for object in page.contents() {
                let Some(full) = object.key() else { continue };
                let key = &full[self.location.prefix.len()..];
                if validate_key(key).is_ok() {
                    out.push(ObjectMeta {
                        key: key.to_string(),
                        size: object.size().unwrap_or(0) as u64,
                        modified: object.last_modified().and_then(timestamp),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_staging(&self) -> StorageResult<Vec<StagingObject>> {
        let bucket = &self.location.bucket;
        let mut out = Vec::new();
        let (mut key_marker, mut upload_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(bucket)
                .prefix(&self.location.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_marker.take())
                .send()
                .await
                .map_err(|e| map_err("", e))?;
            for upload in page.uploads() {
                let (Some(full), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                let Some(key) = full.strip_prefix(self.location.prefix.as_str()) else {
                    continue;
                };
                if validate_key(key).is_err() {
                    continue;
                }
                let modified = upload
                    .initiated()
                    .and_then(|t| jiff::Timestamp::new(t.secs(), t.subsec_nanos() as i32).ok())
                    // Without an Initiated time: "now", never judged abandoned.
                    .unwrap_or_else(jiff::Timestamp::now);
                out.push(StagingObject {
                    key: key.to_string(),
                    upload_id: Some(id.to_string()),
                    size: self.uploaded_bytes(key, full, id).await?,
                    modified,
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            upload_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && upload_marker.is_none() {
                break;
            }
        }
        out.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
        Ok(out)
    }

    async fn remove_staging(&self, staging: &StagingObject) -> StorageResult<()> {
        let key = staging.key.as_str();
        let Some(upload_id) = &staging.upload_id else {
            return Err(StorageError::Permanent {
                key: key.to_string(),
                message: "not an S3 multipart upload (no upload id)".into(),
            });
        };
        let full = self.full_key(key)?;
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.location.bucket)
            .key(&full)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(key, e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, key: &str) -> StorageResult<()> {
        let full = self.full_key(key)?;
        if self.location.lock.is_some() {
            return self.delete_versions(key, &full).await;
        }
        match self
            .client
            .delete_object()
            .bucket(&self.location.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(key, e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

async fn collect(key: &str, body: ByteStream) -> StorageResult<Bytes> {
    body.collect()
        .await
        .map(|d| d.into_bytes())
        .map_err(|e| StorageError::Transient {
            key: key.to_string(),
            message: format!("reading the object body failed: {}", body_error(&e)),
        })
}

/// The cause of a failed body read in a few words, without the SDK's error chain (which can
/// quote the endpoint).
fn body_error(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let chain = DisplayErrorContext(e).to_string().to_ascii_lowercase();
    if chain.contains("timeout") || chain.contains("timed out") {
        "timed out"
    } else if chain.contains("reset") {
        "connection reset"
    } else if chain.contains("end of file")
        || chain.contains("incomplete")
        || chain.contains("closed")
    {
        "the connection closed before the end"
    } else {
        "connection error"
    }
}

/// A timestamp as an S3 date-time (whole seconds, rounded up so that a lock never ends early).
fn aws_time(t: jiff::Timestamp) -> DateTime {
    DateTime::from_secs(aws_timestamp(t).as_second())
}

/// `t` rounded up to a whole second, as S3 stores a retain-until date.
fn aws_timestamp(t: jiff::Timestamp) -> jiff::Timestamp {
    let secs = t.as_second() + i64::from(t.subsec_nanosecond() > 0);
    jiff::Timestamp::from_second(secs).unwrap_or(t)
}

/// The SDK's name of a lock mode.
fn object_lock_mode(mode: LockMode) -> ObjectLockMode {
    match mode {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

/// An S3 date-time (`Last-Modified`, `Initiated`) as a timestamp.
fn timestamp(t: &aws_sdk_s3::primitives::DateTime) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(t.secs(), t.subsec_nanos() as i32).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let l = S3Location::parse("s3://b/some/prefix/", None, "garage".into(), true).unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("b", "some/prefix/")
        );
        let l = S3Location::parse("s3://b", None, "r".into(), false).unwrap();
        assert_eq!(l.prefix, "");
        assert!(S3Location::parse("s3:///x", None, "r".into(), false).is_err());
        assert!(S3Location::parse("/local", None, "r".into(), false).is_err());
    }

    #[test]
    fn write_options_parse() {
        let p = |sse, key, class| WriteOptions::parse(sse, key, class);
        assert_eq!(p(None, None, None), Ok(WriteOptions::default()));
        assert_eq!(
            p(Some(""), Some(" "), Some("")),
            Ok(WriteOptions::default())
        );
        assert_eq!(
            p(Some("AES256"), None, Some("standard_ia")),
            Ok(WriteOptions {
                sse: Some(Sse::Aes256),
                storage_class: Some(Class::StandardIa)
            })
        );
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(
            p(Some("aws:kms"), Some(arn), None).unwrap().sse,
            Some(Sse::Kms {
                key_id: Some(arn.into())
            })
        );
        assert_eq!(
            p(Some("AWS:KMS"), None, None).unwrap().sse,
            Some(Sse::Kms { key_id: None })
        );
        for (_, name) in Class::ALL {
            assert!(p(None, None, Some(name)).is_ok(), "{name}");
        }
    }

    #[test]
    fn write_options_refusals_name_the_key_never_the_value() {
        let refused = |sse, key, class, want_key: &str, want: &str| {
            let (k, m) = WriteOptions::parse(sse, key, class).unwrap_err();
            assert_eq!(k, want_key, "{m}");
            assert!(m.contains(want), "{m}");
            assert!(!m.contains("Zq7") && !m.contains('\n'), "{m}");
        };
        refused(Some("Zq7aes"), None, None, "s3_sse", "AES256");
        refused(Some("aws:kms:dsse"), None, None, "s3_sse", "aws:kms");
        refused(None, Some("Zq7key"), None, "s3_sse_kms_key_id", "aws:kms");
        refused(
            Some("AES256"),
            Some("Zq7key"),
            None,
            "s3_sse_kms_key_id",
            "aws:kms",
        );
        refused(
            Some("aws:kms"),
            Some("Zq7 key"),
            None,
            "s3_sse_kms_key_id",
            "no spaces",
        );
        for class in ["GLACIER", "deep_archive", "GLACIER_FLEXIBLE_RETRIEVAL"] {
            refused(
                None,
                None,
                Some(class),
                "s3_storage_class",
                "restored by a request",
            );
        }
        refused(
            None,
            None,
            Some("REDUCED_REDUNDANCY"),
            "s3_storage_class",
            "fewer copies",
        );
        refused(
            None,
            None,
            Some("Zq7"),
            "s3_storage_class",
            "STANDARD, STANDARD_IA, ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR",
        );
    }
}
