//! Garbage collection of the blob store: images that no job refers to any more (their jobs deleted, or
//! uploads never submitted) are deleted once unused for a keep time (`stylefarm coordinator
//! --keep-unused-blobs-secs`). Mark and sweep, as a periodic chore of the coordinator's: the scheduler's
//! jobs and tasks give the images in use ([`crate::scheduler::Scheduler::images_in_use`]), the blob store's
//! listing the images stored ([`BlobStore::list`]).
//!
//! A task's checkpoint that a newer one replaced (or its task's success dropped) is deleted at once, with
//! the same guards, rather than left for a collection ([`TrackedBlobs::delete_unreferenced`]).
//!
//! A blob is found or stored first and referred to after: a submit checks its images, then records the
//! job; a worker's result is stored, then recorded; so is a stage's image. So that a collection never
//! deletes a blob between the two steps, the coordinator reaches its blobs through [`TrackedBlobs`], which
//! remembers when each blob was last stored or looked for, and which of those steps are under way
//! ([`BlobUse`], held from the first step until the record is made). A collection spares every blob used
//! since the oldest of the uses under way when it walked the jobs, and every blob used or written within
//! the keep time. It decides to delete a blob under the lock that a use takes to say it used it, and a use
//! of a blob being deleted waits for the deletion to end: a blob is either spared or gone before the use
//! looks (and then stored again by it). Uses of other blobs do not wait for a deletion.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use stylefarm_core::job::ImageHash;

use crate::blobs::{BlobReader, BlobStore, StoredBlob};

/// A blob store as the coordinator uses it: each blob stored or looked for is remembered, so that
/// [`TrackedBlobs::collect`] spares it.
pub struct TrackedBlobs {
    store: Arc<dyn BlobStore>,
    tracking: Arc<Shared>,
    /// Blobs deleted by collections (and superseded checkpoints, [`TrackedBlobs::delete_unreferenced`]),
    /// and their bytes (metrics).
    pub(crate) collected: Counter,
    pub(crate) collected_bytes: Counter,
}

/// The tracking, and the signal that a deletion ended.
#[derive(Default)]
struct Shared {
    tracking: Mutex<Tracking>,
    deleted: Condvar,
}

#[derive(Default)]
struct Tracking {
    /// When each blob was last stored or looked for by this process (entries older than a collection's
    /// horizon are dropped by it, and by [`Tracking::prune`] as they grow).
    used: HashMap<ImageHash, Instant>,
    /// `used`'s entries after its last prune.
    pruned_to: usize,
    /// The keep time of the collections (`None`: no collection runs, and a use matters only while a
    /// step under way may need it).
    keep: Option<Duration>,
    /// When each use under way began, by a number given in order: the first is the oldest.
    uses: BTreeMap<u64, Instant>,
    next_use: u64,
    /// The blobs being deleted (by a collection, or at once: [`TrackedBlobs::delete_unreferenced`]).
    deleting: HashSet<ImageHash>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a use of `hash`, now; waits first while the blob is being deleted.
    fn touch(&self, hash: &ImageHash) {
        let mut t = self.lock();
        while t.deleting.contains(hash) {
            t = self.deleted.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        t.used.insert(hash.clone(), Instant::now());
        if t.used.len() > (2 * t.pruned_to).max(PRUNE_FROM) {
            t.prune();
        }
    }
}

/// The entries of [`Tracking::used`] from which it is pruned, when it has doubled since the last prune.
const PRUNE_FROM: usize = 4096;

impl Tracking {
    /// The oldest use under way's start, or now: a blob used since may have its reference on its way.
    fn horizon(&self) -> Instant {
        self.uses
            .values()
            .next()
            .copied()
            .unwrap_or_else(Instant::now)
    }

    /// Forgets the uses that no collection and no [`TrackedBlobs::delete_unreferenced`] will ask about:
    /// before the horizon and past the keep time (every use before the horizon, without collections).
    /// Uses of blobs that are not stored (a submit's look-up of an unknown image) or that no collection
    /// would delete are otherwise kept for the process' life.
    fn prune(&mut self) {
        let (horizon, keep) = (self.horizon(), self.keep);
        let now = Instant::now();
        self.used.retain(|_, used| {
            *used >= horizon || keep.is_some_and(|k| now.checked_sub(k).is_none_or(|k| *used >= k))
        });
        self.pruned_to = self.used.len();
    }
}

/// What a collection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Blobs stored when it listed them.
    pub listed: u64,
    /// Of those, the blobs it deleted.
    pub deleted: u64,
    /// Their bytes.
    pub deleted_bytes: u64,
}

/// Steps under way that find or store blobs and then record a reference to them (a submit, a result, a
/// stage's image): while it lives, a collection spares every blob it used. Drop it once the reference
/// is recorded (or given up).
pub struct BlobUse {
    store: Arc<dyn BlobStore>,
    tracking: Arc<Shared>,
    id: u64,
}

impl BlobUse {
    /// Whether the blob is stored ([`BlobStore::contains`]).
    pub fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
        self.tracking.touch(hash);
        store_call();
        self.store.contains(hash)
    }

    /// Stores `bytes` and returns their hash ([`BlobStore::put`]).
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash> {
        let hash = ImageHash::of(bytes);
        self.tracking.touch(&hash);
        store_call();
        self.store.put_as(&hash, bytes)?;
        Ok(hash)
    }
}

impl Drop for BlobUse {
    fn drop(&mut self) {
        self.tracking.lock().uses.remove(&self.id);
    }
}

/// Fault injection (tests): every call of the coordinator's to its blob store goes by the fail point
/// `coordinator-blob-store` (e.g. `sleep(2000)`: a slow store).
fn store_call() {
    fail::fail_point!("coordinator-blob-store");
}

impl TrackedBlobs {
    /// `store`, tracked, for collections of blobs unused for `keep` ([`TrackedBlobs::collect`]; `None`: no
    /// collection runs, only [`TrackedBlobs::delete_unreferenced`]).
    pub fn new(store: Arc<dyn BlobStore>, keep: Option<Duration>) -> TrackedBlobs {
        let tracking = Shared::default();
        tracking.lock().keep = keep;
        TrackedBlobs {
            store,
            tracking: Arc::new(tracking),
            collected: Counter::default(),
            collected_bytes: Counter::default(),
        }
    }

    /// Starts a step that finds or stores blobs and then records a reference to them ([`BlobUse`]).
    pub fn begin_use(&self) -> BlobUse {
        let mut t = self.tracking.lock();
        let id = t.next_use;
        t.next_use += 1;
        t.uses.insert(id, Instant::now());
        BlobUse {
            store: self.store.clone(),
            tracking: self.tracking.clone(),
            id,
        }
    }

    /// Whether the blob is stored; remembered as a use.
    pub fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
        self.begin_use().contains(hash)
    }

    /// Stores `bytes` and returns their hash; remembered as a use.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash> {
        self.begin_use().put(bytes)
    }

    /// The blob's bytes; `None` when there is no such blob.
    pub fn get(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        store_call();
        self.store.get(hash)
    }

    /// The blob opened for reading; `None` when there is no such blob.
    pub fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>> {
        store_call();
        self.store.open_blob(hash)
    }

    /// The blob opened to be read once, start to end ([`BlobStore::open_sequential`]); `None` when there
    /// is no such blob.
    pub fn open_sequential(
        &self,
        hash: &ImageHash,
    ) -> std::io::Result<Option<Box<dyn std::io::Read + Send>>> {
        store_call();
        self.store.open_sequential(hash)
    }

    /// Bytes of the images stored ([`BlobStore::stored_bytes`]).
    pub fn stored_bytes(&self) -> u64 {
        self.store.stored_bytes()
    }

    /// Deletes the blobs that `in_use` (the mark: called once, after the collection took note of the uses
    /// under way) does not name and that were neither written nor used (stored or looked for) within
    /// `keep`; stops early, without error, when `may_delete` says no (it is asked before each deletion:
    /// the coordinator's hold on a shared job store). An error of the blob store ends the collection.
    pub fn collect(
        &self,
        keep: Duration,
        in_use: impl FnOnce() -> HashSet<ImageHash>,
        may_delete: impl Fn() -> bool,
    ) -> std::io::Result<Collected> {
        // blobs used since the oldest use under way are spared: its reference may come after the mark
        let horizon = self.tracking.lock().horizon();
        let in_use = in_use();
        let Some(written_before) = SystemTime::now().checked_sub(keep) else {
            return Ok(Collected::default());
        };
        let mut done = Collected::default();
        let mut unused = Vec::new();
        self.store.list(&mut |blob| {
            done.listed += 1;
            if blob.modified <= written_before && !in_use.contains(&blob.hash) {
                unused.push(blob);
            }
        })?;
        // used since the horizon, or within the keep time (every use, when the clock does not go back
        // that far)
        let spared = |used: Instant| {
            used >= horizon || Instant::now().checked_sub(keep).is_none_or(|k| used >= k)
        };
        for blob in unused {
            if !may_delete() {
                break;
            }
            {
                let mut t = self.tracking.lock();
                if t.used.get(&blob.hash).is_some_and(|used| spared(*used)) {
                    continue;
                }
                t.used.remove(&blob.hash);
                t.deleting.insert(blob.hash.clone());
            }
            let deleted = self.delete(&blob);
            self.tracking.lock().deleting.remove(&blob.hash);
            self.tracking.deleted.notify_all();
            deleted?;
            done.deleted += 1;
            done.deleted_bytes += blob.bytes;
        }
        // what no later collection needs: uses before this one's horizon and older than the keep time
        self.tracking.lock().used.retain(|_, used| spared(*used));
        Ok(done)
    }

    /// Deletes the blob `hash` of `bytes` bytes at once, unless `in_use` (asked after the uses under way
    /// are noted) says a reference to it is recorded, or a step under way used it since the oldest of
    /// them began (its reference may be on its way, as for [`TrackedBlobs::collect`]), or `may_delete`
    /// (asked last, as a collection asks before each deletion) says no: a task's checkpoint replaced by
    /// a newer one, which would otherwise wait for a collection, or stay when none is configured.
    /// `bytes`: its size, by which the stored bytes go down (0: not known, and they stay). Whether it was
    /// deleted.
    pub fn delete_unreferenced(
        &self,
        hash: &ImageHash,
        bytes: u64,
        in_use: impl FnOnce(&ImageHash) -> bool,
        may_delete: impl FnOnce() -> bool,
    ) -> std::io::Result<bool> {
        let horizon = self.tracking.lock().horizon();
        if in_use(hash) {
            return Ok(false);
        }
        {
            let mut t = self.tracking.lock();
            if t.used.get(hash).is_some_and(|used| *used >= horizon) || !may_delete() {
                return Ok(false);
            }
            t.used.remove(hash);
            t.deleting.insert(hash.clone());
        }
        let blob = StoredBlob {
            hash: hash.clone(),
            bytes,
            modified: SystemTime::now(),
        };
        store_call();
        let deleted = self.delete(&blob);
        self.tracking.lock().deleting.remove(hash);
        self.tracking.deleted.notify_all();
        deleted.map(|()| true)
    }

    /// Deletes the blob `hash` of `bytes` bytes, found damaged (its bytes no longer hash to its name: a
    /// disk's fault, a file cut by hand), whatever references it: kept, it would be served as the image
    /// (and found held, so never uploaded again); gone, the image's next upload stores it anew. A use of
    /// it meanwhile waits for the deletion, as for a collection's. Not counted as collected.
    pub fn delete_damaged(&self, hash: &ImageHash, bytes: u64) -> std::io::Result<()> {
        self.tracking.lock().deleting.insert(hash.clone());
        let blob = StoredBlob {
            hash: hash.clone(),
            bytes,
            modified: SystemTime::now(),
        };
        store_call();
        let deleted = self.store.delete(&blob);
        self.tracking.lock().deleting.remove(hash);
        self.tracking.deleted.notify_all();
        deleted
    }

    fn delete(&self, blob: &StoredBlob) -> std::io::Result<()> {
        self.store.delete(blob)?;
        self.collected.inc();
        self.collected_bytes.inc_by(blob.bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::DiskBlobs;

    const KEEP: Duration = Duration::from_millis(300);

    /// Sets a disk blob's modification time `ago` in the past, as if written then.
    fn backdate(dir: &std::path::Path, hash: &ImageHash, ago: Duration) {
        let h = hash.as_str();
        std::fs::File::options()
            .write(true)
            .open(dir.join(&h[..2]).join(h))
            .unwrap()
            .set_modified(SystemTime::now() - ago)
            .unwrap();
    }

    fn disk() -> (tempfile::TempDir, TrackedBlobs) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskBlobs::open(dir.path()).unwrap());
        (dir, TrackedBlobs::new(store, Some(KEEP)))
    }

    /// The blobs of the store, by hash.
    fn stored(blobs: &TrackedBlobs) -> HashSet<ImageHash> {
        let mut hashes = HashSet::new();
        blobs
            .store
            .list(&mut |b| {
                hashes.insert(b.hash);
            })
            .unwrap();
        hashes
    }

    #[test]
    fn unused_blobs_older_than_the_keep_time_are_deleted_and_the_rest_kept() {
        let (dir, blobs) = disk();
        let keep = Duration::from_secs(3600);
        // written two hours ago by an earlier process (this one has not used them)
        let [referenced, unused, looked_for] =
            [&b"referenced"[..], b"unused", b"looked for"].map(|bytes| {
                let hash = blobs.store.put(bytes).unwrap();
                backdate(dir.path(), &hash, 2 * keep);
                hash
            });
        let fresh = blobs.put(b"fresh").unwrap();
        // a client that finds an old blob there (and so does not upload it): kept for its submit
        assert!(blobs.contains(&looked_for).unwrap());
        let before = blobs.stored_bytes();
        let in_use = HashSet::from([referenced.clone()]);
        let done = blobs.collect(keep, || in_use.clone(), || true).unwrap();
        assert_eq!(
            done,
            Collected {
                listed: 4,
                deleted: 1,
                deleted_bytes: 6
            }
        );
        assert_eq!(
            stored(&blobs),
            HashSet::from([referenced.clone(), looked_for.clone(), fresh.clone()])
        );
        assert!(!blobs.contains(&unused).unwrap());
        assert_eq!(blobs.stored_bytes(), before - 6);
        assert_eq!((blobs.collected.get(), blobs.collected_bytes.get()), (1, 6));
        // with no keep time, the unused ones go however recently used: all but the referenced one
        blobs
            .collect(Duration::ZERO, || in_use.clone(), || true)
            .unwrap();
        assert_eq!(stored(&blobs), HashSet::from([referenced]));
        assert_eq!(blobs.stored_bytes(), 10);
    }

    /// A blob deleted at once (a superseded checkpoint) goes unless a reference to it is recorded, or a
    /// step under way used it (its reference may be on its way); its bytes leave the store's count.
    #[test]
    fn an_unreferenced_blob_is_deleted_at_once_unless_a_step_under_way_used_it() {
        let (_dir, blobs) = disk();
        let old = blobs.put(b"old checkpoint").unwrap();
        let before = blobs.stored_bytes();
        // referenced: kept
        assert!(!blobs
            .delete_unreferenced(&old, 14, |_| true, || true)
            .unwrap());
        // not the store's holder any more: kept
        assert!(!blobs
            .delete_unreferenced(&old, 14, |_| false, || false)
            .unwrap());
        // used by a step under way (a result storing the same bytes, say): kept
        let storing = blobs.begin_use();
        assert!(storing.contains(&old).unwrap());
        assert!(!blobs
            .delete_unreferenced(&old, 14, |_| false, || true)
            .unwrap());
        drop(storing);
        // none of those: deleted
        assert!(blobs
            .delete_unreferenced(&old, 14, |_| false, || true)
            .unwrap());
        assert!(!stored(&blobs).contains(&old));
        assert_eq!(blobs.stored_bytes(), before - 14);
    }

    /// A step under way (a submit that checked its images, a result stored) when the jobs were walked
    /// records its reference after the walk: every blob it used, however long ago, is spared, even one
    /// that was stored long before, and so is one it uses after.
    #[test]
    fn blobs_of_a_use_under_way_during_the_mark_are_spared() {
        let (_dir, blobs) = disk();
        let old = blobs.put(b"old").unwrap();
        let later = blobs.put(b"later").unwrap();
        std::thread::sleep(KEEP + Duration::from_millis(50));
        let submit = blobs.begin_use();
        assert!(submit.contains(&old).unwrap());
        // the keep time passes while the submit is under way (a slow header read, say)
        std::thread::sleep(KEEP + Duration::from_millis(50));
        let done = blobs
            .collect(
                KEEP,
                || {
                    // the walk: the submit's job is not recorded yet; it uses another blob meanwhile
                    assert!(submit.contains(&later).unwrap());
                    HashSet::new()
                },
                || true,
            )
            .unwrap();
        assert_eq!(done.deleted, 0);
        assert_eq!(stored(&blobs), HashSet::from([old.clone(), later.clone()]));
        // the submit ended (its job recorded, or given up): its blobs are now up to the mark
        drop(submit);
        std::thread::sleep(KEEP + Duration::from_millis(50));
        assert_eq!(
            blobs
                .collect(KEEP, || HashSet::from([old.clone()]), || true)
                .unwrap()
                .deleted,
            1
        );
        assert_eq!(stored(&blobs), HashSet::from([old]));
    }

    /// A blob deleted by a collection is stored again by the next put of its bytes (a put that found it
    /// there before does not count on it afterwards: it was spared).
    #[test]
    fn a_put_after_a_collection_stores_the_blob_again() {
        let (_dir, blobs) = disk();
        let hash = blobs.put(b"again").unwrap();
        std::thread::sleep(KEEP + Duration::from_millis(50));
        blobs.collect(KEEP, HashSet::new, || true).unwrap();
        assert!(!blobs.contains(&hash).unwrap());
        assert_eq!(blobs.put(b"again").unwrap(), hash);
        assert_eq!(blobs.get(&hash).unwrap().unwrap(), b"again");
    }

    /// A disk store whose deletions take 1.5 s, then say so.
    struct SlowDeletes {
        inner: DiskBlobs,
        ended: std::sync::atomic::AtomicBool,
    }

    impl BlobStore for SlowDeletes {
        fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
            self.inner.contains(hash)
        }
        fn put_as(&self, hash: &ImageHash, bytes: &[u8]) -> std::io::Result<()> {
            self.inner.put_as(hash, bytes)
        }
        fn stored_bytes(&self) -> u64 {
            self.inner.stored_bytes()
        }
        fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>> {
            self.inner.open_blob(hash)
        }
        fn list(&self, visit: &mut dyn FnMut(StoredBlob)) -> std::io::Result<()> {
            self.inner.list(visit)
        }
        fn delete(&self, blob: &StoredBlob) -> std::io::Result<()> {
            std::thread::sleep(Duration::from_millis(1500));
            self.inner.delete(blob)?;
            self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    /// While a collection deletes a blob, a use of that blob waits for the deletion to end (and finds it
    /// gone), and uses of other blobs do not wait.
    #[test]
    fn a_use_of_a_blob_being_deleted_waits_for_it_and_other_uses_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SlowDeletes {
            inner: DiskBlobs::open(dir.path()).unwrap(),
            ended: false.into(),
        });
        let old = store.put(b"old").unwrap();
        backdate(dir.path(), &old, Duration::from_secs(7200));
        let blobs = Arc::new(TrackedBlobs::new(
            store.clone(),
            Some(Duration::from_secs(3600)),
        ));
        let collection = {
            let blobs = blobs.clone();
            std::thread::spawn(move || {
                blobs
                    .collect(Duration::from_secs(3600), HashSet::new, || true)
                    .unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        blobs.put(b"another").unwrap();
        assert!(blobs.contains(&ImageHash::of(b"another")).unwrap());
        assert!(
            !store.ended.load(std::sync::atomic::Ordering::SeqCst),
            "another blob's uses did not wait for the deletion"
        );
        assert!(!blobs.contains(&old).unwrap(), "waited, and found it gone");
        assert!(store.ended.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(collection.join().unwrap().deleted, 1);
    }

    /// Its memory of uses stays bounded: without collections, the look-ups of blobs that are not stored
    /// (a submit's of unknown images) and the blobs stored are forgotten once no step under way may need
    /// them; a use under way keeps its own, which a checkpoint's deletion asks about.
    #[test]
    fn uses_no_collection_asks_about_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskBlobs::open(dir.path()).unwrap());
        let blobs = TrackedBlobs::new(store, None);
        let checkpoint = blobs.put(b"a checkpoint").unwrap();
        for i in 0..3 * PRUNE_FROM as u32 {
            blobs.contains(&ImageHash::of(&i.to_le_bytes())).unwrap();
        }
        let used = |hash: &ImageHash| blobs.tracking.lock().used.contains_key(hash);
        assert!(blobs.tracking.lock().used.len() <= PRUNE_FROM);
        assert!(!used(&checkpoint));
        // a use under way: its blob is remembered, and spared by a checkpoint's deletion
        let held = blobs.begin_use();
        let kept = held.put(b"kept").unwrap();
        for i in 0..3 * PRUNE_FROM as u32 {
            blobs.contains(&ImageHash::of(&i.to_be_bytes())).unwrap();
        }
        assert!(used(&kept));
        assert!(!blobs
            .delete_unreferenced(&kept, 0, |_| false, || true)
            .unwrap());
        drop(held);
        assert!(blobs
            .delete_unreferenced(&kept, 0, |_| false, || true)
            .unwrap());
        assert!(blobs
            .delete_unreferenced(&checkpoint, 0, |_| false, || true)
            .unwrap());
    }

    /// A collection stops deleting when told (the coordinator no longer surely holds its job store).
    #[test]
    fn a_collection_stops_when_it_may_no_longer_delete() {
        let (_dir, blobs) = disk();
        for i in 0..4u8 {
            blobs.put(&[i]).unwrap();
        }
        std::thread::sleep(KEEP + Duration::from_millis(50));
        let asked = std::sync::atomic::AtomicU32::new(0);
        let done = blobs
            .collect(KEEP, HashSet::new, || {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
            })
            .unwrap();
        assert_eq!((done.listed, done.deleted), (4, 2));
        assert_eq!(stored(&blobs).len(), 2);
    }

    /// The S3 backend lists, deletes and counts as the disk one does; objects beside the blobs (another
    /// prefix, a key that is no sha256) are left alone.
    #[test]
    fn s3_blobs_are_collected() {
        let server = crate::blobs::S3Server::start();
        let other = server.blobs("farm2");
        let kept_elsewhere = other.put(b"another farm's").unwrap();
        let store = Arc::new(server.blobs("farm"));
        store.put_as(&ImageHash::of(b"x"), b"x").unwrap();
        std::fs::write(server.bucket_dir().join("farm").join("notes.txt"), b"mine").unwrap();
        let blobs = TrackedBlobs::new(store, Some(Duration::from_secs(1)));
        let referenced = blobs.put(b"referenced").unwrap();
        let unused = blobs.put(b"unused").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let done = blobs
            .collect(
                Duration::from_secs(1),
                || HashSet::from([referenced.clone()]),
                || true,
            )
            .unwrap();
        assert_eq!((done.listed, done.deleted), (3, 2));
        assert!(blobs.contains(&referenced).unwrap());
        assert!(!blobs.contains(&unused).unwrap());
        assert_eq!(
            blobs.stored_bytes(),
            10,
            "the listing's total, less the deleted"
        );
        assert!(other.contains(&kept_elsewhere).unwrap());
        assert!(server.bucket_dir().join("farm").join("notes.txt").exists());
    }
}
