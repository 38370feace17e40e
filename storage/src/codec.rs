//! Chunk codecs and checksums.
//!
//! Floating-point data compresses poorly as it is: the sign, exponent and high mantissa bits
//! repeat across neighbouring values, the low mantissa bits are noise. The byte-plane shuffle
//! stores every value's first byte, then every second byte, and so on, so zstd sees the
//! compressible planes as long runs.

use serde::{Deserialize, Serialize};

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// The raw little-endian values.
    Raw,
    /// zstd of the raw values.
    Zstd,
    /// zstd of the values' byte planes (element width 4).
    ZstdShuffle4,
}

/// Byte planes of `raw`, whose elements are `width` bytes wide.
pub fn shuffle(raw: &[u8], width: usize, out: &mut Vec<u8>) {
    assert_eq!(raw.len() % width, 0, "not whole elements");
    let n = raw.len() / width;
    out.clear();
    out.resize(raw.len(), 0);
    for (i, e) in raw.chunks_exact(width).enumerate() {
        for (b, &byte) in e.iter().enumerate() {
            out[b * n + i] = byte;
        }
    }
}

/// The inverse of [`shuffle`].
pub fn unshuffle(planes: &[u8], width: usize, out: &mut Vec<u8>) {
    assert_eq!(planes.len() % width, 0, "not whole elements");
    let n = planes.len() / width;
    out.clear();
    out.resize(planes.len(), 0);
    for (i, e) in out.chunks_exact_mut(width).enumerate() {
        for (b, byte) in e.iter_mut().enumerate() {
            *byte = planes[b * n + i];
        }
    }
}

/// Encodes `raw` with `codec` at zstd `level` into `out` (cleared first); `scratch` is reused
/// between calls.
pub fn encode(
    codec: Codec,
    level: i32,
    raw: &[u8],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.clear();
    match codec {
        Codec::Raw => out.extend_from_slice(raw),
        Codec::Zstd => zstd::stream::copy_encode(raw, &mut *out, level)?,
        Codec::ZstdShuffle4 => {
            shuffle(raw, 4, scratch);
            zstd::stream::copy_encode(&scratch[..], &mut *out, level)?;
        }
    }
    Ok(())
}

/// Decodes `stored`, which must come out exactly `raw_len` bytes: `stored` itself when it is
/// raw, else decoded into `out`.
pub fn decode<'a>(
    codec: Codec,
    stored: &'a [u8],
    raw_len: usize,
    out: &'a mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> std::io::Result<&'a [u8]> {
    out.clear();
    scratch.clear();
    let decoded: &[u8] = match codec {
        Codec::Raw => stored,
        Codec::Zstd => {
            out.reserve(raw_len);
            zstd::stream::copy_decode(stored, &mut *out)?;
            out
        }
        Codec::ZstdShuffle4 => {
            scratch.reserve(raw_len);
            zstd::stream::copy_decode(stored, &mut *scratch)?;
            if scratch.len() == raw_len {
                unshuffle(scratch, 4, out);
            }
            out
        }
    };
    if decoded.len() != raw_len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "decoded {} bytes where {raw_len} were stored",
                decoded.len().max(scratch.len())
            ),
        ));
    }
    Ok(decoded)
}

/// The checksum of a chunk's raw bytes: CRC-32C (Castagnoli), hardware-accelerated where the
/// CPU has it.
pub fn checksum(raw: &[u8]) -> u32 {
    crc32c::crc32c(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_shuffling_helps_floats() {
        let values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.001).sin() * 0.02).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (mut out, mut back, mut s) = (Vec::new(), Vec::new(), Vec::new());
        let mut sizes = Vec::new();
        for codec in [Codec::Raw, Codec::Zstd, Codec::ZstdShuffle4] {
            encode(codec, 3, &raw, &mut out, &mut s).unwrap();
            sizes.push(out.len());
            let decoded = decode(codec, &out, raw.len(), &mut back, &mut s).unwrap();
            assert_eq!(decoded, raw, "{codec:?}");
        }
        assert!(sizes[2] < sizes[1] && sizes[1] < sizes[0], "{sizes:?}");
        // A wrong length is an error, not a short buffer.
        assert!(decode(Codec::ZstdShuffle4, &out, raw.len() + 4, &mut back, &mut s).is_err());
        assert!(decode(Codec::Raw, &raw, raw.len() - 1, &mut back, &mut s).is_err());
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
    }
}
