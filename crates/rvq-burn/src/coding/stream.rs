//! Codes to bytes: the self-describing compressed stream.
//!
//! The indices of the first `n` levels are ANS-coded (`constriction`'s `DefaultAnsCoder`,
//! 32-bit words) with each level's [`LevelModel`](super::LevelModel), level by
//! level. The stream carries everything needed to check that it is decoded by the quantizer
//! state that wrote it:
//!
//! ```text
//! offset  bytes      field (little-endian)
//! 0       4          magic "RVQZ"
//! 4       1          format version (1)
//! 5       1          n, levels coded
//! 6       1          rank of the input shape
//! 7       1          reserved, 0
//! 8       4          D
//! 12      4 n        K of each coded level
//! ..      8 rank     input shape [..., D]
//! ..      8          fingerprint of the n probability tables
//! ..      8          W, payload words
//! ..      4 W        payload: ANS words
//! ..      8          FNV-1a checksum of every byte before it
//! ```
//!
//! Decoding checks, in order, length, magic, version, checksum (any flipped or lost byte),
//! configuration (`D`, `n`, each `K`), fingerprint (other counts, i.e. another checkpoint),
//! shape, and that the payload yields exactly the declared codes: a bad stream is an error,
//! never a panic or silently wrong indices.

use constriction::stream::Decode;
use constriction::stream::stack::DefaultAnsCoder;

use super::model::EntropyModels;
use crate::error::{RvqError, StreamError};
use crate::util::fnv1a64;

/// First four bytes of every stream.
pub const MAGIC: [u8; 4] = *b"RVQZ";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Streams may declare at most this many codes (levels x vectors, 1 GiB of indices), so that
/// a forged header cannot make the decoder run without end or exhaust memory. (A code can cost
/// next to nothing, e.g. at a level of one code, so the payload's size cannot bound it.)
pub const MAX_CODES: u64 = 1 << 28;

/// A decoded stream: the input shape and the indices of each coded level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeStream {
    /// The shape `[..., D]` of the input that was coded.
    pub shape: Vec<usize>,
    /// One list per coded level, each of `N = prod(shape[..rank-1])` indices.
    pub indices: Vec<Vec<u32>>,
    /// Size of the ANS payload in bits (the stream less its fixed header and checksum).
    pub payload_bits: u64,
}

impl CodeStream {
    /// Number of vectors `N`.
    pub fn num_vectors(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }
}

/// The decoded header.
struct Header {
    num_levels: usize,
    embedding_dim: usize,
    sizes: Vec<usize>,
    shape: Vec<usize>,
    fingerprint: u64,
    payload_words: usize,
    payload_start: usize,
}

/// Reads little-endian fields off a byte slice, reporting truncation.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const B: usize>(&mut self) -> Result<[u8; B], StreamError> {
        let end = self.at + B;
        let field = self.bytes.get(self.at..end).ok_or(StreamError::Truncated {
            needed: end,
            got: self.bytes.len(),
        })?;
        self.at = end;
        Ok(field.try_into().expect("slice of B bytes"))
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

pub(super) fn malformed(reason: impl Into<String>) -> StreamError {
    StreamError::Malformed {
        reason: reason.into(),
    }
}

fn mismatch(field: impl Into<String>, stream: usize, quantizer: usize) -> StreamError {
    StreamError::ConfigMismatch {
        field: field.into(),
        stream: stream.to_string(),
        quantizer: quantizer.to_string(),
    }
}

impl EntropyModels {
    /// Codes `indices` (the first `n = indices.len()` levels, `N` each) of an input of shape
    /// `[..., D]` into a stream.
    ///
    /// Fails if `n` is not in `1..=M`, `shape` does not end in `D`, a list does not hold
    /// `N = prod(shape[..rank-1])` indices, or an index is outside its level's codebook.
    pub fn compress(&self, indices: &[Vec<u32>], shape: &[usize]) -> Result<Vec<u8>, RvqError> {
        let num_levels = indices.len();
        if num_levels == 0 || num_levels > self.levels.len() {
            return Err(RvqError::LevelCount {
                requested: num_levels,
                available: self.levels.len(),
            });
        }
        if shape.last() != Some(&self.embedding_dim) || shape.len() > usize::from(u8::MAX) {
            return Err(RvqError::InputDim {
                expected: self.embedding_dim,
                shape: shape.to_vec(),
            });
        }
        let num_vectors: usize = shape[..shape.len() - 1].iter().product();
        for (level, (codes, model)) in indices.iter().zip(&self.levels).enumerate() {
            if codes.len() != num_vectors {
                return Err(RvqError::IndicesLength {
                    level,
                    expected: num_vectors,
                    got: codes.len(),
                });
            }
            if let Some(&bad) = codes.iter().find(|&&c| c as usize >= model.size()) {
                let min = codes.iter().min().copied().unwrap_or(bad);
                let max = codes.iter().max().copied().unwrap_or(bad);
                return Err(RvqError::IndexOutOfRange {
                    level,
                    min: i64::from(min),
                    max: i64::from(max),
                    num_embeddings: model.size(),
                });
            }
        }
        if (num_levels * num_vectors) as u64 > MAX_CODES {
            return Err(malformed(format!(
                "{} codes, expected at most {MAX_CODES} per stream",
                num_levels * num_vectors
            ))
            .into());
        }

        let mut coder = DefaultAnsCoder::new();
        // ANS is a stack: code the last symbol first, so decoding runs level by level, in order.
        let symbols = indices.iter().zip(&self.levels).flat_map(|(codes, model)| {
            let model = model.coder_model();
            codes.iter().map(move |&code| (code as usize, model))
        });
        coder
            .encode_symbols_reverse(symbols)
            .expect("every index has a nonzero probability");
        let payload = coder.into_compressed().expect("Vec backend never fails");

        let mut bytes =
            Vec::with_capacity(48 + 4 * num_levels + 8 * shape.len() + 4 * payload.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(FORMAT_VERSION);
        bytes.push(num_levels as u8);
        bytes.push(shape.len() as u8);
        bytes.push(0);
        bytes.extend_from_slice(&(self.embedding_dim as u32).to_le_bytes());
        for model in &self.levels[..num_levels] {
            bytes.extend_from_slice(&(model.size() as u32).to_le_bytes());
        }
        for &dim in shape {
            bytes.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        bytes.extend_from_slice(&self.fingerprint(num_levels).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        for word in &payload {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let checksum = fnv1a64(bytes.iter().copied());
        bytes.extend_from_slice(&checksum.to_le_bytes());
        Ok(bytes)
    }

    /// Decodes a stream written by [`EntropyModels::compress`] with the same tables.
    ///
    /// Refuses streams that declare more than [`MAX_CODES`] codes; use
    /// [`EntropyModels::decompress_limited`] to accept fewer from untrusted sources (the work
    /// and memory of decoding grow with the declared count, which a forged header sets).
    pub fn decompress(&self, bytes: &[u8]) -> Result<CodeStream, RvqError> {
        self.decompress_limited(bytes, MAX_CODES)
    }

    /// [`EntropyModels::decompress`], refusing streams that declare more than `max_codes`
    /// codes (levels x vectors) before decoding any.
    pub fn decompress_limited(&self, bytes: &[u8], max_codes: u64) -> Result<CodeStream, RvqError> {
        let header = read_header(bytes, max_codes.min(MAX_CODES))?;
        self.check_header(&header)?;
        let num_vectors: usize = header.shape[..header.shape.len() - 1].iter().product();

        let payload: Vec<u32> = bytes
            [header.payload_start..header.payload_start + 4 * header.payload_words]
            .chunks_exact(4)
            .map(|word| u32::from_le_bytes(word.try_into().expect("4 bytes")))
            .collect();
        let mut coder = DefaultAnsCoder::from_compressed(payload)
            .map_err(|_| malformed("the payload ends in a zero word"))?;
        let mut indices = Vec::with_capacity(header.num_levels);
        for model in &self.levels[..header.num_levels] {
            let model = model.coder_model();
            // Grown as decoded, not reserved from the header's claim.
            let mut codes = Vec::with_capacity(num_vectors.min(1 << 20));
            for symbol in coder.decode_iid_symbols(num_vectors, model) {
                let symbol = symbol.map_err(|_| malformed("the payload cannot be decoded"))?;
                codes.push(symbol as u32);
            }
            indices.push(codes);
        }
        if !coder.is_empty() {
            return Err(malformed(format!(
                "payload words are left after the {} declared codes",
                num_vectors * header.num_levels
            ))
            .into());
        }
        Ok(CodeStream {
            shape: header.shape,
            indices,
            payload_bits: 32 * header.payload_words as u64,
        })
    }

    fn check_header(&self, header: &Header) -> Result<(), StreamError> {
        if header.embedding_dim != self.embedding_dim {
            return Err(mismatch("D", header.embedding_dim, self.embedding_dim));
        }
        if header.num_levels > self.levels.len() {
            return Err(mismatch("levels", header.num_levels, self.levels.len()));
        }
        for (level, (&size, model)) in header.sizes.iter().zip(&self.levels).enumerate() {
            if size != model.size() {
                return Err(mismatch(format!("K of level {level}"), size, model.size()));
            }
        }
        let fingerprint = self.fingerprint(header.num_levels);
        if header.fingerprint != fingerprint {
            return Err(StreamError::ModelMismatch {
                stream: header.fingerprint,
                quantizer: fingerprint,
            });
        }
        Ok(())
    }
}

fn read_header(bytes: &[u8], max_codes: u64) -> Result<Header, StreamError> {
    let mut reader = Reader { bytes, at: 0 };
    let magic = reader.take::<4>()?;
    if magic != MAGIC {
        return Err(StreamError::BadMagic { found: magic });
    }
    let version = reader.u8()?;
    if version != FORMAT_VERSION {
        return Err(StreamError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let num_levels = usize::from(reader.u8()?);
    let rank = usize::from(reader.u8()?);
    let _reserved = reader.u8()?;
    let embedding_dim = reader.u32()? as usize;
    let sizes = (0..num_levels)
        .map(|_| reader.u32().map(|k| k as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let shape = (0..rank)
        .map(|_| reader.u64())
        .collect::<Result<Vec<_>, _>>()?;
    let fingerprint = reader.u64()?;
    let payload_words = reader.u64()?;
    let payload_start = reader.at;
    let declared = (payload_words as u128) * 4 + payload_start as u128 + 8;
    if declared > bytes.len() as u128 {
        return Err(StreamError::Truncated {
            needed: usize::try_from(declared).unwrap_or(usize::MAX),
            got: bytes.len(),
        });
    }
    let declared = declared as usize;
    if declared < bytes.len() {
        return Err(StreamError::TrailingBytes {
            declared,
            got: bytes.len(),
        });
    }
    let stored = u64::from_le_bytes(bytes[declared - 8..].try_into().expect("8 bytes"));
    let computed = fnv1a64(bytes[..declared - 8].iter().copied());
    // Under cargo-fuzz (`--cfg fuzzing`) the checksum is not enforced, so that the fuzzer
    // reaches the checks and the decoder behind it instead of stopping here.
    if stored != computed && !cfg!(fuzzing) {
        return Err(StreamError::Checksum { stored, computed });
    }
    // Past the checksum the bytes are as written; what follows guards against a stream
    // forged with a valid checksum.
    if num_levels == 0 {
        return Err(malformed("0 levels coded, expected at least 1"));
    }
    if shape.last().map(|&d| d as usize) != Some(embedding_dim) {
        return Err(malformed(format!(
            "shape {shape:?} does not end in D = {embedding_dim}"
        )));
    }
    let num_codes = shape[..rank - 1]
        .iter()
        .try_fold(num_levels as u64, |acc, &dim| acc.checked_mul(dim));
    if num_codes.is_none_or(|codes| codes > max_codes) {
        return Err(malformed(format!(
            "shape {shape:?} x {num_levels} levels declares more than {max_codes} codes"
        )));
    }
    Ok(Header {
        num_levels,
        embedding_dim,
        sizes,
        shape: shape.iter().map(|&d| d as usize).collect(),
        fingerprint,
        payload_words: payload_words as usize,
        payload_start,
    })
}
