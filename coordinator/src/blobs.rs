//! Content-addressed blobs (input images, results, contact sheets) as files under `<data dir>/blobs/`, named
//! by the sha256 of their bytes. Writes go through a temporary file and a rename: a blob is whole or absent.

use std::path::{Path, PathBuf};

use stylefarm_core::job::ImageHash;

pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: &Path) -> std::io::Result<BlobStore> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, hash: &ImageHash) -> PathBuf {
        let h = hash.as_str();
        self.dir.join(&h[..2]).join(h)
    }

    pub fn contains(&self, hash: &ImageHash) -> bool {
        self.path(hash).exists()
    }

    /// Stores `bytes` and returns their hash (a blob already there is kept).
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<ImageHash> {
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

    /// The blob opened for reading (e.g. an image's header only); `None` when there is no such blob.
    pub fn open_blob(
        &self,
        hash: &ImageHash,
    ) -> std::io::Result<Option<std::io::BufReader<std::fs::File>>> {
        match std::fs::File::open(self.path(hash)) {
            Ok(f) => Ok(Some(std::io::BufReader::new(f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The blob's bytes; `None` when there is no such blob.
    pub fn get(&self, hash: &ImageHash) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(hash)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn put_get_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = super::BlobStore::open(dir.path()).unwrap();
        let h = blobs.put(b"hello").unwrap();
        assert_eq!(h, stylefarm_core::job::ImageHash::of(b"hello"));
        assert!(blobs.contains(&h));
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
}
