//! Content-addressed blobs (input images, results, contact sheets), named by the sha256 of their bytes,
//! behind the [`BlobStore`] trait. [`DiskBlobs`] keeps them as files under `<data dir>/blobs/`; writes go
//! through a temporary file and a rename: a blob is whole or absent.

use std::io::{BufRead, Seek};
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
    /// Stores `bytes` durably and returns their hash (a blob already there is kept).
    fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash>;
    /// The blob opened for reading; `None` when there is no such blob.
    fn open_blob(&self, hash: &ImageHash) -> std::io::Result<Option<Box<dyn BlobReader>>>;
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

/// Blobs as files: `<dir>/<first two hex digits>/<sha256>`, written through `<dir>/tmp/`.
pub struct DiskBlobs {
    dir: PathBuf,
}

impl DiskBlobs {
    /// Opens (or creates) the directory.
    pub fn open(dir: &Path) -> std::io::Result<DiskBlobs> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(DiskBlobs {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, hash: &ImageHash) -> PathBuf {
        let h = hash.as_str();
        self.dir.join(&h[..2]).join(h)
    }
}

impl BlobStore for DiskBlobs {
    fn contains(&self, hash: &ImageHash) -> std::io::Result<bool> {
        self.path(hash).try_exists()
    }

    fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash> {
        let hash = ImageHash::of(bytes);
        let path = self.path(&hash);
        if !path.exists() {
            std::fs::create_dir_all(path.parent().expect("blob path has a parent"))?;
            let tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))?;
            std::fs::write(tmp.path(), bytes)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
        }
        Ok(hash)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::BlobStore;

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
    fn disk_blobs() {
        let dir = tempfile::tempdir().unwrap();
        suite(&super::DiskBlobs::open(dir.path()).unwrap());
    }
}
