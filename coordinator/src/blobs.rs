//! Content-addressed blobs (input images, results, contact sheets), named by the sha256 of their bytes,
//! behind the [`BlobStore`] trait. [`DiskBlobs`] keeps them as files under `<data dir>/blobs/`; writes go
//! through a temporary file and a rename: a blob is whole or absent.

use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};

use stylefarm_core::job::ImageHash;

/// A blob opened for reading: buffered and seekable (an image decoder reads its header only).
pub trait BlobReader: BufRead + Seek + Send {}
impl<T: BufRead + Seek + Send> BlobReader for T {}

/// Where the farm's images are kept, by the sha256 of their bytes. A blob is immutable: the same bytes
/// always have the same name, and putting them again keeps the one there.
pub trait BlobStore: Send + Sync {
    /// Whether the blob is stored.
    fn contains(&self, hash: &ImageHash) -> std::io::Result<bool>;
    /// Stores `bytes`, whose sha256 is `hash`, durably (a blob already there is kept).
    fn put_as(&self, hash: &ImageHash, bytes: &[u8]) -> std::io::Result<()>;
    /// Stores `bytes` durably and returns their hash (a blob already there is kept).
    fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash> {
        let hash = ImageHash::of(bytes);
        self.put_as(&hash, bytes)?;
        Ok(hash)
    }
    /// Bytes of the images stored, for the metrics: on disk, all of them (counted when opened, then kept
    /// up to date); in S3, those found by the last listing ([`BlobStore::list`]) plus those this process
    /// stored since, less those it deleted (before any listing: those it stored).
    fn stored_bytes(&self) -> u64;
    /// Calls `visit` with every blob stored, in no particular order; other files or objects beside them
    /// are left out.
    fn list(&self, visit: &mut dyn FnMut(StoredBlob)) -> std::io::Result<()>;
    /// Deletes a blob found by [`BlobStore::list`]; one already gone is no error.
    fn delete(&self, blob: &StoredBlob) -> std::io::Result<()>;
    /// The blob opened for reading; `None` when there is no such blob.
    fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>>;
    /// The blob opened to be read once, from its start to its end (a download), holding what a read
    /// asks for and not the whole blob (a file through its buffer; S3: one GET, its body read as it
    /// comes); `None` when there is no such blob.
    fn open_sequential(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn Read + Send>>> {
        Ok(self
            .open_blob(hash)?
            .map(|reader| Box::new(reader) as Box<dyn Read + Send>))
    }
    /// The blob's bytes; `None` when there is no such blob.
    fn get(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        let Some(mut reader) = self.open_blob(hash)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }
}

/// A blob as [`BlobStore::list`] finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBlob {
    /// Its name, the sha256 of its bytes.
    pub hash: ImageHash,
    /// Its size, in bytes.
    pub bytes: u64,
    /// When it was written (a file's modification time, an object's last-modified).
    pub modified: std::time::SystemTime,
}

/// Takes `bytes` off a count of stored bytes (never below 0: a count that missed a blob stays sane).
fn less(count: &std::sync::atomic::AtomicU64, bytes: u64) {
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let _ = count.fetch_update(relaxed, relaxed, |b| Some(b.saturating_sub(bytes)));
}

/// Blobs as files: `<dir>/<first two hex digits>/<sha256>`, written through `<dir>/tmp/`.
pub struct DiskBlobs {
    dir: PathBuf,
    bytes: std::sync::atomic::AtomicU64,
}

/// A file in `<dir>/tmp/` not written for this long is a crashed write's leftover (a blob's write takes
/// seconds at most) and is deleted when the store is opened.
pub const TMP_LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

impl DiskBlobs {
    /// Opens (or creates) the directory, deleting leftovers of writes that a crash cut short (files in
    /// `tmp/` older than [`TMP_LEFTOVER_AGE`]; younger ones may be another process's writes under way).
    pub fn open(dir: &Path) -> std::io::Result<DiskBlobs> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let removed = remove_leftovers(&dir.join("tmp"), TMP_LEFTOVER_AGE)?;
        if removed > 0 {
            tracing::info!(removed, "deleted the leftovers of interrupted blob writes");
        }
        let blobs = DiskBlobs {
            dir: dir.to_path_buf(),
            bytes: 0.into(),
        };
        // the images' sizes
        let mut bytes = 0;
        blobs.list(&mut |blob| bytes += blob.bytes)?;
        blobs
            .bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(blobs)
    }

    fn path(&self, hash: &ImageHash) -> PathBuf {
        let h = hash.as_str();
        self.dir.join(&h[..2]).join(h)
    }
}

/// Deletes the files in `tmp` not modified for `age`; returns how many. One that goes meanwhile is no error.
fn remove_leftovers(tmp: &Path, age: std::time::Duration) -> std::io::Result<usize> {
    let mut removed = 0;
    for file in std::fs::read_dir(tmp)? {
        let file = file?;
        let old = match file.metadata() {
            Ok(meta) => meta.is_file() && meta.modified()?.elapsed().is_ok_and(|a| a >= age),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if old {
            match std::fs::remove_file(file.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

impl BlobStore for DiskBlobs {
    fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
        self.path(hash).try_exists()
    }

    fn put_as(&self, hash: &ImageHash, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(hash);
        let shard = path.parent().expect("blob path has a parent");
        // a file there of another size is damaged (cut short, say): written again, in its place
        let held = std::fs::metadata(&path).map(|m| m.len()).ok();
        if held != Some(bytes.len() as u64) {
            std::fs::create_dir_all(shard)?;
            let tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))?;
            std::fs::write(tmp.path(), bytes)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            less(&self.bytes, held.unwrap_or(0));
            self.bytes
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // the file's name durable too, and its shard folder's (whichever put made it), before the store
        // records the blob: after a power loss, a record must not name a file whose rename was never
        // written down (ext4's journal usually carries it along with the store's fsync; btrfs and others
        // do not). Also when the file is there already: another put of the same bytes may have renamed it
        // and not made its name durable yet (a folder with nothing to write: 46 us an fsync on this project's
        // machine, against 121 us after a rename).
        std::fs::File::open(shard)?.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn stored_bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn list(&self, visit: &mut dyn FnMut(StoredBlob)) -> std::io::Result<()> {
        for shard in std::fs::read_dir(&self.dir)? {
            let shard = shard?;
            if shard.file_name() == "tmp" || !shard.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(shard.path())? {
                let file = file?;
                let Some(hash) = file.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if self.path(&hash) != file.path() {
                    continue;
                }
                let meta = match file.metadata() {
                    Ok(meta) => meta,
                    // deleted since the directory was read
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                visit(StoredBlob {
                    hash,
                    bytes: meta.len(),
                    modified: meta.modified()?,
                });
            }
        }
        Ok(())
    }

    fn delete(&self, blob: &StoredBlob) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(&blob.hash)) {
            Ok(()) => {
                less(&self.bytes, blob.bytes);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>> {
        match std::fs::File::open(self.path(hash)) {
            Ok(f) => Ok(Some(Box::new(std::io::BufReader::new(f)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(hash)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Blobs in an S3 bucket (or any S3-compatible store): the object `<prefix>/<sha256>`. Configured like the
/// AWS tools, from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL` for a store other than AWS, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), through
/// the `object_store` crate. A blob larger than [`MULTIPART_PART_BYTES`] is uploaded in parts (multipart
/// upload, a few parts at once, each copied as it goes); an object appears whole when its upload
/// completes, so a blob is whole or absent.
pub struct S3Blobs {
    store: object_store::aws::AmazonS3,
    prefix: String,
    /// The runtime the store's futures run on: the trait is synchronous, and its callers may be async tasks
    /// of another runtime, so requests are spawned here and waited for.
    runtime: Option<tokio::runtime::Runtime>,
    /// The bytes stored, as a listing found them and as this process changed them since.
    bytes: ListedBytes,
}

/// The bytes in a store that only a listing can count (S3): the last listing's total, plus what this process
/// stored less what it deleted since that listing began (a delete while the count is low is not lost to a
/// floor of 0; an object stored while a listing ran may be counted twice, until the next). Listings run one
/// at a time: two at once (start-up's, a collection's) would each count what the other counts.
#[derive(Default)]
struct ListedBytes {
    /// Bytes this process stored less those it deleted, since it began (negative when it deleted more).
    changed: std::sync::atomic::AtomicI64,
    /// The last listing's total, and `changed` as that listing began.
    listed: std::sync::Mutex<(u64, i64)>,
    /// Held through a listing.
    listing: std::sync::Mutex<()>,
}

impl ListedBytes {
    fn changed_by(&self, bytes: i64) {
        (self.changed).fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        let (listed, at) = *self.listed.lock().unwrap_or_else(|e| e.into_inner());
        let changed = self.changed.load(std::sync::atomic::Ordering::Relaxed);
        (listed as i64).saturating_add(changed - at).max(0) as u64
    }
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        // without waiting: the store may be dropped on an async task of another runtime
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The part size of a multipart upload, and the size above which a blob is uploaded in parts.
pub const MULTIPART_PART_BYTES: usize = 8 << 20;

/// The parts of a multipart upload sent at once.
const MULTIPART_PARTS_IN_FLIGHT: usize = 4;

impl S3Blobs {
    /// Blobs under `url`, `s3://<bucket>[/<prefix>]`, with the endpoint and credentials from the
    /// environment. An error names what is wrong with the URL or the configuration, or what the server
    /// answered when asked for the first object under the prefix: a bucket that does not exist, or
    /// credentials it refuses, fail here, at start-up, rather than at the first upload. A server out of
    /// reach is only warned of: images wait for it, as at any later outage.
    pub fn open(url: &str) -> std::io::Result<S3Blobs> {
        Self::build(url, &[], Self::retry())?.checked(url)
    }

    /// These blobs once the server answered for them ([`S3Blobs::open`]); `url` names them in errors.
    fn checked(self, url: &str) -> std::io::Result<S3Blobs> {
        match self.first_object() {
            Ok(()) => Ok(self),
            Err(e) if crate::out_of_reach(&e) => {
                tracing::warn!(
                    blobs = url,
                    error = %e,
                    "the blob store is out of reach; images wait for it"
                );
                Ok(self)
            }
            Err(e) => Err(std::io::Error::new(e.kind(), format!("blobs '{url}': {e}"))),
        }
    }

    /// Asks for the first object under the prefix, if any: whether the bucket is there and the
    /// credentials are taken.
    fn first_object(&self) -> std::io::Result<()> {
        use object_store::ObjectStore;
        use tokio_stream::StreamExt;
        let prefix =
            (!self.prefix.is_empty()).then(|| object_store::path::Path::from(&*self.prefix));
        let store = self.store.clone();
        self.run(async move { store.list(prefix.as_ref()).next().await.transpose() })
            .map(drop)
    }

    /// How a request that failed to connect, timed out or got a server error is retried: 5 times, backing
    /// off from 100 ms (about 3 s in all; 15 s at most), not object_store's default of up to 3 minutes. A
    /// coordinator's caller waits on it, with a thread of the blocking pool held: better to answer
    /// UNAVAILABLE soon (workers and clients retry; a stage's work is tried again every few seconds).
    pub fn retry() -> object_store::RetryConfig {
        object_store::RetryConfig {
            max_retries: 5,
            retry_timeout: std::time::Duration::from_secs(15),
            ..Default::default()
        }
    }

    /// With `retry`: how object_store retries a request.
    fn build(
        url: &str,
        config: &[(&str, &str)],
        retry: object_store::RetryConfig,
    ) -> std::io::Result<S3Blobs> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid(format!("blobs '{url}': expected s3://bucket[/prefix]")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid(format!("blobs '{url}': no bucket")));
        }
        crate::install_crypto_provider();
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry);
        for (key, value) in config {
            let key = key
                .parse()
                .map_err(|e| invalid(format!("blobs '{url}': {key}: {e}")))?;
            builder = builder.with_config(key, *value);
        }
        let store = builder
            .build()
            .map_err(|e| invalid(format!("blobs '{url}': {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blobs-s3")
            .enable_all()
            .build()?;
        Ok(S3Blobs {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            runtime: Some(runtime),
            bytes: ListedBytes::default(),
        })
    }

    fn path(&self, hash: &ImageHash) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(hash.as_str())
        } else {
            object_store::path::Path::from(format!("{}/{hash}", self.prefix))
        }
    }

    /// [`S3Blobs::open`] with `config` (object_store's `AmazonS3ConfigKey` names, e.g. `aws_endpoint`,
    /// `aws_access_key_id`, `aws_allow_http`) over the environment's.
    pub fn open_with(url: &str, config: &[(&str, &str)]) -> std::io::Result<S3Blobs> {
        Self::build(url, config, Self::retry())
    }

    /// Runs `request` on the store's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        request: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> std::io::Result<T> {
        run_on(self.runtime_handle(), request)
    }

    /// The store's runtime.
    fn runtime_handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until the store drops")
            .handle()
    }

    /// The object's bytes; `None` when there is none.
    fn fetch(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        use object_store::ObjectStoreExt;
        let (store, path) = (self.store.clone(), self.path(hash));
        let got = self.run(async move { store.get(&path).await?.bytes().await });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Runs `request` on `runtime` (an S3 store's) and waits for it, from any thread.
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    request: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
) -> std::io::Result<T> {
    let handle = runtime.spawn(request);
    // outside tokio's cooperative budget: a caller inside a tokio task (the start-up's stage work runs
    // in a block_on) would otherwise, once its task's budget is spent, poll a pending handle for good
    match futures_executor::block_on(tokio::task::unconstrained(handle)) {
        Ok(result) => result.map_err(io_error),
        Err(e) => Err(std::io::Error::other(format!("blob store request: {e}"))),
    }
}

/// A piece of an object's body, or the error reading it.
type PieceResult = object_store::Result<bytes::Bytes>;

/// An object's body as one GET brings it ([`S3Blobs`]' [`BlobStore::open_sequential`]): each read takes
/// the next piece the response has (tens of KiB), so that a download holds a piece, not the object.
struct S3Body {
    /// The rest of the body; `None` once it ended.
    body: Option<std::pin::Pin<Box<dyn tokio_stream::Stream<Item = PieceResult> + Send>>>,
    runtime: tokio::runtime::Handle,
    /// What the last piece has left to read.
    held: bytes::Bytes,
}

impl Read for S3Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio_stream::StreamExt;
        while self.held.is_empty() {
            let Some(mut body) = self.body.take() else {
                return Ok(0);
            };
            // read on the store's runtime, which drives its connections
            let next = run_on(&self.runtime, async move {
                let piece = body.next().await.transpose()?;
                Ok((body, piece))
            })?;
            match next {
                (body, Some(piece)) => {
                    self.body = Some(body);
                    self.held = piece;
                }
                (_, None) => return Ok(0),
            }
        }
        let n = buf.len().min(self.held.len());
        buf[..n].copy_from_slice(&self.held.split_to(n));
        Ok(n)
    }
}

/// An object_store error as an I/O error whose kind says what went wrong: `NotFound` for a missing
/// object; `NotConnected` or `TimedOut` when the store was out of reach after object_store's retries (no
/// connection, a request that failed or timed out, or a server error, 5xx: a store restarting or
/// overloaded, S3's 503 SlowDown): the coordinator answers UNAVAILABLE, something to retry, not INTERNAL;
/// `Other` otherwise.
fn io_error(e: object_store::Error) -> std::io::Error {
    use object_store::client::{HttpError, HttpErrorKind};
    use std::io::ErrorKind;
    // object_store keeps a response's status in an error type of its own that it does not export; its text
    // is "Server returned non-2xx status code: <status>..." (checked by the tests against a server that
    // answers 503)
    const SERVER_ERROR: &str = "Server returned non-2xx status code: 5";
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut kind = match e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Other,
    };
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<HttpError>() {
            kind = match http.kind() {
                HttpErrorKind::Timeout => ErrorKind::TimedOut,
                HttpErrorKind::Connect | HttpErrorKind::Request | HttpErrorKind::Interrupted => {
                    ErrorKind::NotConnected
                }
                _ => kind,
            };
            break;
        }
        if err.to_string().starts_with(SERVER_ERROR) {
            kind = ErrorKind::NotConnected;
            break;
        }
        source = err.source();
    }
    std::io::Error::new(kind, e)
}

impl BlobStore for S3Blobs {
    fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
        use object_store::ObjectStoreExt;
        let (store, path) = (self.store.clone(), self.path(hash));
        match self.run(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put_as(&self, hash: &ImageHash, bytes: &[u8]) -> std::io::Result<()> {
        use object_store::ObjectStoreExt;
        if self.contains(hash)? {
            return Ok(());
        }
        let (store, path) = (self.store.clone(), self.path(hash));
        let len = bytes.len() as u64;
        if bytes.len() <= MULTIPART_PART_BYTES {
            let bytes = bytes::Bytes::copy_from_slice(bytes);
            self.run(async move { store.put(&path, bytes.into()).await })?;
        } else {
            let upload = self.run(async move { store.put_multipart(&path).await })?;
            let mut parts =
                object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_BYTES);
            // copied a part at a time, as parts go: the copies (the requests need owned bytes) hold at
            // most MULTIPART_PARTS_IN_FLIGHT parts, not the whole blob again
            for chunk in bytes.chunks(MULTIPART_PART_BYTES) {
                let part = bytes::Bytes::copy_from_slice(chunk);
                parts = self.run(async move {
                    if let Err(e) = parts.wait_for_capacity(MULTIPART_PARTS_IN_FLIGHT).await {
                        if let Err(abort) = parts.abort().await {
                            tracing::warn!(error = %abort, "aborting a failed multipart upload");
                        }
                        return Err(e);
                    }
                    parts.put(part);
                    Ok(parts)
                })?;
            }
            self.run(async move { parts.finish().await })?;
        }
        self.bytes.changed_by(len as i64);
        Ok(())
    }

    fn stored_bytes(&self) -> u64 {
        self.bytes.now()
    }

    fn list(&self, visit: &mut dyn FnMut(StoredBlob)) -> std::io::Result<()> {
        use object_store::ObjectStore;
        use tokio_stream::StreamExt;
        let prefix =
            (!self.prefix.is_empty()).then(|| object_store::path::Path::from(&*self.prefix));
        let _one_at_a_time = self.bytes.listing.lock().unwrap_or_else(|e| e.into_inner());
        let mut listing = self.store.list(prefix.as_ref());
        let at = (self.bytes.changed).load(std::sync::atomic::Ordering::Relaxed);
        // the listing's pages come in on the store's runtime, one object at a time through a channel
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        self.runtime
            .as_ref()
            .expect("the runtime lives until the store drops")
            .spawn(async move {
                while let Some(object) = listing.next().await {
                    if tx.send(object).await.is_err() {
                        return;
                    }
                }
            });
        let mut total = 0;
        while let Some(object) = futures_executor::block_on(rx.recv()) {
            let object = object.map_err(io_error)?;
            let Some(hash) = object.location.filename().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if self.path(&hash) != object.location {
                continue;
            }
            total += object.size;
            visit(StoredBlob {
                hash,
                bytes: object.size,
                modified: object.last_modified.into(),
            });
        }
        // what this process stored or deleted while it ran (a long listing of a large bucket) counts on
        *self.bytes.listed.lock().unwrap_or_else(|e| e.into_inner()) = (total, at);
        Ok(())
    }

    fn delete(&self, blob: &StoredBlob) -> std::io::Result<()> {
        use object_store::ObjectStoreExt;
        let (store, path) = (self.store.clone(), self.path(&blob.hash));
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) => self.bytes.changed_by(-(blob.bytes as i64)),
            // already gone (deleted twice at once): its bytes were counted out then
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>> {
        Ok(self
            .fetch(hash)?
            .map(|bytes| Box::new(std::io::Cursor::new(bytes)) as Box<dyn BlobReader>))
    }

    fn open_sequential(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn Read + Send>>> {
        use object_store::ObjectStoreExt;
        let (store, path) = (self.store.clone(), self.path(hash));
        match self.run(async move { store.get(&path).await }) {
            Ok(got) => Ok(Some(Box::new(S3Body {
                body: Some(got.into_stream()),
                runtime: self.runtime_handle().clone(),
                held: bytes::Bytes::new(),
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        self.fetch(hash)
    }
}

/// An S3-compatible server of its own, for tests and benchmarks: `s3s-fs` (installed by the README's test
/// command) on a free loopback port, its objects under a temporary directory, with one bucket, `farm`;
/// killed when dropped. Panics with the reason when it cannot start.
pub struct S3Server {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The server's access key id.
pub const S3_TEST_KEY: &str = "stylefarm-test";
/// The server's secret access key.
pub const S3_TEST_SECRET: &str = "stylefarm-test-secret";

/// The configuration of a store at `endpoint` (plain HTTP) with the test server's credentials.
fn test_config(endpoint: &str) -> [(&str, &str); 5] {
    [
        ("aws_endpoint", endpoint),
        ("aws_access_key_id", S3_TEST_KEY),
        ("aws_secret_access_key", S3_TEST_SECRET),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
    ]
}

impl S3Server {
    /// A server on a free port.
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("farm")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Self::spawn(port, dir.path());
        S3Server {
            child,
            port,
            _dir: dir,
        }
    }

    /// Kills the server (SIGKILL): its port refuses connections until [`S3Server::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A server again on the same port and objects, after [`S3Server::stop`].
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, self._dir.path());
    }

    /// `s3s-fs` on `port` serving `dir`, once it listens.
    fn spawn(port: u16, dir: &std::path::Path) -> std::process::Child {
        let mut child = std::process::Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_TEST_KEY, "--secret-key", S3_TEST_SECRET])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs (installed by deploy/test.sh: cargo install s3s-fs)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("s3s-fs did not listen on port {port}");
    }

    /// Its endpoint URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a coordinator process needs for `--blobs s3://farm/...` on this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_TEST_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The directory the server keeps bucket `farm` in (each object a file).
    pub fn bucket_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("farm")
    }

    /// Blobs under `s3://farm/<prefix>` on this server.
    pub fn blobs(&self, prefix: &str) -> S3Blobs {
        S3Blobs::open_with(
            &format!("s3://farm/{prefix}"),
            &test_config(&self.endpoint()),
        )
        .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{BlobStore, S3Server};
    use stylefarm_core::job::ImageHash;

    /// The behaviour every backend must have.
    pub(crate) fn suite(blobs: &dyn BlobStore) {
        let h = blobs.put(b"hello").unwrap();
        assert_eq!(h, stylefarm_core::job::ImageHash::of(b"hello"));
        assert!(blobs.contains(&h).unwrap());
        assert_eq!(blobs.get(&h).unwrap().unwrap(), b"hello");
        let mut read = String::new();
        std::io::Read::read_to_string(&mut blobs.open_blob(&h).unwrap().unwrap(), &mut read)
            .unwrap();
        assert_eq!(read, "hello");
        assert_eq!(blobs.put(b"hello").unwrap(), h);
        assert!(blobs
            .get(&stylefarm_core::job::ImageHash::of(b"other"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn s3_blobs() {
        let server = S3Server::start();
        suite(&server.blobs("blobs"));
        // another prefix is another store
        let other = server.blobs("other");
        assert!(!other.contains(&ImageHash::of(b"hello")).unwrap());
    }

    /// The bytes stored (a metric) are those a listing finds plus what the process stored and deleted while
    /// it ran: a long listing (a large bucket, at start-up) does not overwrite them, and a delete before
    /// anything was counted is not lost.
    #[test]
    fn an_s3_listing_keeps_what_was_stored_or_deleted_while_it_ran() {
        let server = S3Server::start();
        let blobs = server.blobs("l");
        blobs.put(b"12345").unwrap();
        let six = blobs.put(b"123456").unwrap();
        let fresh = server.blobs("l");
        let (mut listed, mut first) = (0, true);
        fresh
            .list(&mut |blob| {
                listed += blob.bytes;
                if std::mem::take(&mut first) {
                    // a delete first, while the count is 0: not lost to a floor
                    let gone = super::StoredBlob {
                        hash: six.clone(),
                        bytes: 6,
                        modified: std::time::SystemTime::now(),
                    };
                    fresh.delete(&gone).unwrap();
                    fresh.put(b"1234567").unwrap();
                }
            })
            .unwrap();
        assert!(listed >= 11, "{listed}");
        assert_eq!(fresh.stored_bytes(), listed + 7 - 6);
    }

    /// A blob over the part size goes up in parts (a multipart upload; more parts than go at once, and a
    /// short last one) and comes back whole.
    #[test]
    fn large_s3_blobs_are_uploaded_in_parts() {
        let server = S3Server::start();
        let blobs = server.blobs("");
        let parts = super::MULTIPART_PARTS_IN_FLIGHT + 2;
        let big: Vec<u8> = (0..super::MULTIPART_PART_BYTES * parts + 12345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let hash = blobs.put(&big).unwrap();
        assert_eq!(blobs.get(&hash).unwrap().unwrap(), big);
        // and read as a download reads it: its body as it comes, in reads of a chunk
        let mut body = blobs.open_sequential(&hash).unwrap().unwrap();
        let (mut back, mut reads) = (Vec::new(), 0);
        loop {
            let mut chunk = Vec::new();
            let mut piece = std::io::Read::take(&mut body, 1 << 20);
            std::io::Read::read_to_end(&mut piece, &mut chunk).unwrap();
            if chunk.is_empty() {
                break;
            }
            back.extend(chunk);
            reads += 1;
        }
        assert!(
            back == big && reads == big.len().div_ceil(1 << 20),
            "{reads} reads"
        );
        assert!(blobs
            .open_sequential(&ImageHash::of(b"none"))
            .unwrap()
            .is_none());
        // the in-flight parts and the upload are gone: one object
        let objects = std::fs::read_dir(server.bucket_dir())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_file())
            .count();
        assert_eq!(objects, 1);
    }

    /// Blobs of bucket `farm` at `endpoint` retried once (5 s at most), not as `S3Blobs::retry` says.
    fn impatient(endpoint: &str) -> super::S3Blobs {
        let retry = object_store::RetryConfig {
            max_retries: 1,
            retry_timeout: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        super::S3Blobs::build("s3://farm", &super::test_config(endpoint), retry).unwrap()
    }

    /// A bucket that does not exist, or credentials the server refuses, are found at start-up, naming the
    /// URL; a server out of reach is not (it is waited for, as at any later outage).
    #[test]
    fn an_s3_store_is_checked_at_start_up() {
        let mut server = S3Server::start();
        let endpoint = server.endpoint();
        let open = |url: &str, secret: &str| {
            let mut config = super::test_config(&endpoint);
            config[2].1 = secret;
            super::S3Blobs::build(url, &config, super::S3Blobs::retry())
                .unwrap()
                .checked(url)
        };
        open("s3://farm/images", super::S3_TEST_SECRET).unwrap();
        for (url, secret) in [
            ("s3://no-such-bucket/images", super::S3_TEST_SECRET),
            ("s3://farm/images", "not-the-secret-at-all"),
        ] {
            let e = open(url, secret).err().unwrap();
            assert!(
                e.to_string().starts_with(&format!("blobs '{url}': ")),
                "{e}"
            );
            assert!(!crate::out_of_reach(&e), "{e}");
        }
        server.stop();
        open("s3://farm/images", super::S3_TEST_SECRET).unwrap();
    }

    /// A store that stops answering: every call fails with an error the coordinator answers as
    /// UNAVAILABLE (something to retry), naming the request; none hangs past the retry budget.
    #[test]
    fn an_s3_store_out_of_reach_is_unavailable() {
        let mut server = S3Server::start();
        let endpoint = server.endpoint();
        let blobs = impatient(&endpoint);
        let hash = blobs.put(b"hello").unwrap();
        server.stop();
        let started = std::time::Instant::now();
        let errors = [
            blobs.contains(&hash).unwrap_err(),
            blobs.get(&hash).unwrap_err(),
            blobs.put(b"another").unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
            let status = tonic::Status::from(crate::Error::Io(e));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().starts_with("blob store out of reach")
                    && status.message().contains(&endpoint),
                "{status:?}"
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        // back on the same port and objects: the same store answers again
        server.restart();
        assert_eq!(blobs.get(&hash).unwrap().unwrap(), b"hello");
    }

    /// A store that answers every request with 503 (a server restarting or overloaded) is out of reach
    /// too, once the retries are spent: UNAVAILABLE, not INTERNAL.
    #[test]
    fn an_s3_store_answering_503_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                // the request's head (HEAD and GET carry no body), then the answer
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") {
                    match std::io::Read::read(&mut stream, &mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let _ = std::io::Write::write_all(
                    &mut stream,
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        let blobs = impatient(&endpoint);
        for e in [
            blobs.contains(&ImageHash::of(b"x")).unwrap_err(),
            blobs.get(&ImageHash::of(b"x")).unwrap_err(),
        ] {
            assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
            let status = tonic::Status::from(crate::Error::Io(e));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(status.message().contains("503"), "{status:?}");
        }
    }

    #[test]
    fn disk_blobs() {
        let dir = tempfile::tempdir().unwrap();
        suite(&super::DiskBlobs::open(dir.path()).unwrap());
    }

    /// A crash in the middle of a write leaves its temporary file: the next open deletes it once it is older
    /// than any write, and leaves a younger one (another process's write under way) and the blobs alone.
    #[test]
    fn disk_blobs_delete_the_leftovers_of_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let blob = super::DiskBlobs::open(dir.path())
            .unwrap()
            .put(b"kept")
            .unwrap();
        let tmp = dir.path().join("tmp");
        let written = |name: &str, ago: std::time::Duration| {
            let file = std::fs::File::create(tmp.join(name)).unwrap();
            file.set_modified(std::time::SystemTime::now() - ago)
                .unwrap();
        };
        written(
            "crashed",
            super::TMP_LEFTOVER_AGE + std::time::Duration::from_secs(60),
        );
        written("under-way", std::time::Duration::from_secs(5));
        let blobs = super::DiskBlobs::open(dir.path()).unwrap();
        assert!(!tmp.join("crashed").exists());
        assert!(tmp.join("under-way").exists());
        assert_eq!(blobs.get(&blob).unwrap().unwrap(), b"kept");
        assert_eq!(blobs.stored_bytes(), 4);
    }
}
