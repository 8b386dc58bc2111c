//! Decoding of uploaded images and task results within a memory budget. A header may declare 16,384 x
//! 16,384 pixels in a hundred bytes, and decoding such an image takes gigabytes: without a budget, a few
//! such uploads at once would take the coordinator's memory. Each decode first reads its image's header
//! and waits for its share of [`DECODE_BUDGET_BYTES`] (FIFO, tokio's semaphore); small images decode many
//! at a time, the largest one at a time.

use std::io::Cursor;
use std::sync::Arc;

use image::RgbImage;
use stylefarm_core::imaging::{self, MAX_IMAGE_PIXELS};
use tokio::sync::Semaphore;

use crate::{blocking, Error};

/// Bytes a decode may hold a pixel: a 16-bit RGBA buffer (8), the 8-bit RGB image (3), its alpha (1) and
/// an oriented copy (3), rounded up.
const BYTES_PER_PIXEL: u64 = 16;

/// Decode memory the coordinator's decodes hold at once: one image of the most pixels
/// ([`MAX_IMAGE_PIXELS`]), 4 GiB.
pub const DECODE_BUDGET_BYTES: u64 = MAX_IMAGE_PIXELS * BYTES_PER_PIXEL;

const MIB: u64 = 1 << 20;

/// The decode budget: permits of a MiB.
pub(crate) struct DecodeBudget {
    permits: Arc<Semaphore>,
    total_mib: u32,
}

impl Default for DecodeBudget {
    fn default() -> DecodeBudget {
        DecodeBudget::new(DECODE_BUDGET_BYTES)
    }
}

impl DecodeBudget {
    /// A budget of `bytes` (at least a MiB).
    pub(crate) fn new(bytes: u64) -> DecodeBudget {
        let total_mib = u32::try_from(bytes.div_ceil(MIB).max(1)).unwrap_or(u32::MAX >> 3);
        DecodeBudget {
            permits: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// The MiB a decode of `pixels` pixels takes of the budget: at least one, at most all of it.
    fn weight(&self, pixels: u64) -> u32 {
        let mib = pixels.saturating_mul(BYTES_PER_PIXEL).div_ceil(MIB);
        u32::try_from(mib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_mib)
    }

    /// Decodes `bytes` ([`imaging::decode`], on the blocking pool) once its share of the budget is free;
    /// gives the bytes back with the image. Errors name `name` (an undecodable header fails before any
    /// wait).
    pub(crate) async fn decode(
        &self,
        bytes: Vec<u8>,
        name: &'static str,
    ) -> Result<(Vec<u8>, RgbImage), Error> {
        let (bytes, size) = blocking(move || {
            let size = imaging::dimensions(Cursor::new(&bytes), name);
            Ok((bytes, size))
        })
        .await?;
        let (width, height) = size?;
        let share = self
            .permits
            .clone()
            .acquire_many_owned(self.weight(u64::from(width) * u64::from(height)))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        // the share goes with the decode: a request cancelled meanwhile does not give it back before the
        // decode (which cannot be stopped) ends
        let (bytes, decoded) = blocking(move || {
            let decoded = imaging::decode(&bytes, name);
            drop(share);
            Ok((bytes, decoded))
        })
        .await?;
        Ok((bytes, decoded?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    /// A decode waits while the budget is taken, and goes on once it is given back; the largest image
    /// takes all of it, a small one a MiB.
    #[tokio::test]
    async fn a_decode_waits_for_its_share_of_the_budget() {
        let budget = Arc::new(DecodeBudget::default());
        assert_eq!(budget.total_mib, 4096);
        assert_eq!(budget.weight(MAX_IMAGE_PIXELS), 4096);
        assert_eq!(budget.weight(u64::MAX), 4096);
        assert_eq!((budget.weight(0), budget.weight(512 * 512)), (1, 4));
        let held = budget.permits.acquire_many(4096).await.unwrap();
        let b = budget.clone();
        let decode = tokio::spawn(async move { b.decode(png(64, 48), "image").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!decode.is_finished(), "it waits for the budget");
        drop(held);
        let (bytes, img) = decode.await.unwrap().unwrap();
        assert_eq!(
            (img.width(), img.height(), bytes.len()),
            (64, 48, png(64, 48).len())
        );
        // a header that is no image's fails at once, budget or not
        let _held = budget.permits.acquire_many(4096).await.unwrap();
        let error = budget
            .decode(b"not an image".to_vec(), "image")
            .await
            .unwrap_err();
        assert!(error.to_string().contains("image"), "{error}");
    }
}
