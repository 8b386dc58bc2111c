//! The parts of WorkerService.Exchange on the wire (exact mode over several workers): float32 values,
//! little-endian, each part in one or more messages of at most [`crate::CHUNK_BYTES`].

use crate::CHUNK_BYTES;

/// Parts as (key, values).
pub type Parts = Vec<(u64, Vec<f32>)>;

/// The payloads of a part's messages: its values' bytes in chunks of at most [`CHUNK_BYTES`] (one empty
/// chunk for no values, so that the part is still sent).
pub fn chunks(values: &[f32]) -> Vec<Vec<u8>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    if bytes.is_empty() {
        return vec![Vec::new()];
    }
    bytes.chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect()
}

/// Appends one message's values (`bytes`, a multiple of 4) under `key` to `parts`: to the last part when
/// it has the same key (a part sent in several messages), else as a new part.
pub fn append(parts: &mut Parts, key: u64, bytes: &[u8]) {
    let values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match parts.last_mut() {
        Some((k, v)) if *k == key => v.extend(values),
        _ => parts.push((key, values.collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_in_several_messages_comes_back_whole() {
        let values: Vec<f32> = (0..(CHUNK_BYTES / 4 + 3)).map(|i| i as f32 * 0.5).collect();
        let mut parts = Parts::new();
        for chunk in chunks(&values) {
            append(&mut parts, 7, &chunk);
        }
        for chunk in chunks(&[]) {
            append(&mut parts, 0, &chunk);
        }
        assert_eq!(chunks(&values).len(), 2);
        assert_eq!(parts, vec![(7, values), (0, Vec::new())]);
    }
}
