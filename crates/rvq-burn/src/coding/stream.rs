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
//! 4       1          format version (1: every vector has n codes; 2: a depth per vector)
//! 5       1          n, levels coded
//! 6       1          rank of the input shape
//! 7       1          reserved, 0
//! 8       4          D
//! 12      4 n        K of each coded level
//! ..      8 rank     input shape [..., D]
//! ..      8          fingerprint of the n probability tables
//! ..      4 n        version 2 only: how many vectors stop after 1, 2, ..., n levels
//! ..      8          W, payload words
//! ..      4 W        payload: ANS words
//! ..      8          FNV-1a checksum of every byte before it
//! ```
//!
//! Version 2 is written only when some vector stops before level `n` (codes from
//! [`EncodeOptions`](crate::EncodeOptions) with a per-vector depth; [`ABSENT`] past it). Its
//! payload codes every vector's depth first, with the table that the header's depth counts
//! give (the same fixed-point rounding as the code tables), then, level by level, the codes
//! of the vectors that reach that level. Version 1 streams decode as before.
//!
//! Decoding checks, in order, length, magic, version, checksum (any flipped or lost byte),
//! configuration (`D`, `n`, each `K`), fingerprint (other counts, i.e. another checkpoint),
//! shape, the depth counts (they must sum to the vectors, and the decoded depths must match
//! them), and that the payload yields exactly the declared codes: a bad stream is an error,
//! never a panic or silently wrong indices.

use constriction::stream::Decode;
use constriction::stream::model::DefaultContiguousCategoricalEntropyModel;
use constriction::stream::stack::DefaultAnsCoder;

use super::model::{EntropyModels, fixed_point_probabilities};
use crate::error::{RvqError, StreamError};
use crate::util::fnv1a64;

/// First four bytes of every stream.
pub const MAGIC: [u8; 4] = *b"RVQZ";
/// The newest format version this crate writes; it reads every version from 1 to this.
pub const FORMAT_VERSION: u8 = 2;
/// The version of streams whose vectors all have the same number of codes.
const FIXED_DEPTH_VERSION: u8 = 1;
/// In a [`CodeStream`]'s indices (and given to [`EntropyModels::compress`]): no code, past a
/// vector's depth.
pub const ABSENT: u32 = u32::MAX;
/// Streams may declare at most this many codes (levels x vectors, 1 GiB of indices), so that
/// a forged header cannot make the decoder run without end or exhaust memory. (A code can cost
/// next to nothing, e.g. at a level of one code, so the payload's size cannot bound it.)
pub const MAX_CODES: u64 = 1 << 28;

/// A decoded stream: the input shape and the indices of each coded level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeStream {
    /// The shape `[..., D]` of the input that was coded.
    pub shape: Vec<usize>,
    /// One list per coded level, each of `N = prod(shape[..rank-1])` indices; [`ABSENT`] past
    /// a vector's depth.
    pub indices: Vec<Vec<u32>>,
    /// Size of the ANS payload in bits (the stream less its fixed header and checksum).
    pub payload_bits: u64,
}

impl CodeStream {
    /// Number of vectors `N`.
    pub fn num_vectors(&self) -> usize {
        self.shape[..self.shape.len() - 1].iter().product()
    }

    /// Whether some vector has fewer codes than the levels coded (a version 2 stream).
    pub fn has_depths(&self) -> bool {
        self.indices.iter().any(|level| level.contains(&ABSENT))
    }
}

/// The decoded header.
struct Header {
    num_levels: usize,
    embedding_dim: usize,
    sizes: Vec<usize>,
    shape: Vec<usize>,
    fingerprint: u64,
    /// Version 2: vectors per depth `1..=n`.
    depth_counts: Option<Vec<u32>>,
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
    /// `[..., D]` into a stream. A vector may stop early: [`ABSENT`] at every level past its
    /// depth (at least one level), written as a version 2 stream; otherwise version 1.
    ///
    /// Fails if `n` is not in `1..=M`, `shape` does not end in `D`, a list does not hold
    /// `N = prod(shape[..rank-1])` indices, an index is outside its level's codebook, or a
    /// vector has no first code or a code after an absent one.
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
            let in_range = |c: u32| (c as usize) < model.size() || (level > 0 && c == ABSENT);
            if let Some(&bad) = codes.iter().find(|&&c| !in_range(c)) {
                let signed = |c: u32| if c == ABSENT { -1 } else { i64::from(c) };
                let min = codes
                    .iter()
                    .map(|&c| signed(c))
                    .min()
                    .unwrap_or(signed(bad));
                let max = codes
                    .iter()
                    .map(|&c| signed(c))
                    .max()
                    .unwrap_or(signed(bad));
                return Err(RvqError::IndexOutOfRange {
                    level,
                    min,
                    max,
                    num_embeddings: model.size(),
                });
            }
        }
        let depths = depths(indices, num_vectors)?;
        if (num_levels * num_vectors) as u64 > MAX_CODES {
            return Err(malformed(format!(
                "{} codes, expected at most {MAX_CODES} per stream",
                num_levels * num_vectors
            ))
            .into());
        }
        let depth_counts = depths.as_ref().map(|depths| {
            let mut counts = vec![0u32; num_levels];
            depths.iter().for_each(|&depth| counts[depth - 1] += 1);
            counts
        });

        let mut coder = DefaultAnsCoder::new();
        // ANS is a stack: code the last symbol first, so decoding runs in order: the depths,
        // then level by level.
        let symbols = indices.iter().zip(&self.levels).flat_map(|(codes, model)| {
            let model = model.coder_model();
            codes
                .iter()
                .filter(|&&code| code != ABSENT)
                .map(move |&code| (code as usize, model))
        });
        coder
            .encode_symbols_reverse(symbols)
            .expect("every index has a nonzero probability");
        if let (Some(depths), Some(counts)) = (&depths, &depth_counts) {
            let model = depth_model(counts, num_vectors);
            coder
                .encode_iid_symbols_reverse(depths.iter().map(|&depth| depth - 1), &model)
                .expect("every depth has a nonzero probability");
        }
        let payload = coder.into_compressed().expect("Vec backend never fails");

        let mut bytes =
            Vec::with_capacity(48 + 8 * num_levels + 8 * shape.len() + 4 * payload.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(match depths {
            Some(_) => FORMAT_VERSION,
            None => FIXED_DEPTH_VERSION,
        });
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
        for &count in depth_counts.iter().flatten() {
            bytes.extend_from_slice(&count.to_le_bytes());
        }
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
        let undecodable = |_| malformed("the payload cannot be decoded");
        // Each vector's depth (version 2), checked against the header's counts.
        let depths: Option<Vec<usize>> = match &header.depth_counts {
            None => None,
            Some(counts) => {
                let model = depth_model(counts, num_vectors);
                let mut depths = Vec::with_capacity(num_vectors.min(1 << 20));
                let mut decoded = vec![0u32; counts.len()];
                for symbol in coder.decode_iid_symbols(num_vectors, &model) {
                    let symbol = symbol.map_err(undecodable)?;
                    decoded[symbol] += 1;
                    depths.push(symbol + 1);
                }
                if &decoded != counts {
                    return Err(malformed(format!(
                        "the payload's depths {decoded:?} are not the header's {counts:?}"
                    ))
                    .into());
                }
                Some(depths)
            }
        };
        let mut indices = Vec::with_capacity(header.num_levels);
        for (level, model) in self.levels[..header.num_levels].iter().enumerate() {
            let model = model.coder_model();
            // Grown as decoded, not reserved from the header's claim.
            let mut codes = Vec::with_capacity(num_vectors.min(1 << 20));
            match &depths {
                None => {
                    for symbol in coder.decode_iid_symbols(num_vectors, model) {
                        codes.push(symbol.map_err(undecodable)? as u32);
                    }
                }
                Some(depths) => {
                    for &depth in depths {
                        codes.push(match depth > level {
                            true => coder.decode_symbol(model).map_err(undecodable)? as u32,
                            false => ABSENT,
                        });
                    }
                }
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

/// Each vector's depth (its codes before the first [`ABSENT`]), or `None` when every vector
/// has a code at every level. Fails if a vector has no first code or a code after an absent
/// one.
fn depths(indices: &[Vec<u32>], num_vectors: usize) -> Result<Option<Vec<usize>>, RvqError> {
    if !indices.iter().any(|level| level.contains(&ABSENT)) {
        return Ok(None);
    }
    (0..num_vectors)
        .map(|i| {
            let depth = indices
                .iter()
                .position(|level| level[i] == ABSENT)
                .unwrap_or(indices.len());
            match indices[depth..].iter().position(|level| level[i] != ABSENT) {
                None => Ok(depth),
                Some(after) => Err(RvqError::InvalidArgument {
                    argument: "indices",
                    value: format!(
                        "code {} at level {}, position {i}, after an absent code",
                        indices[depth + after][i],
                        depth + after
                    ),
                    rule: "must stop at a vector's depth: once absent, absent at every later \
                           level",
                }),
            }
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The categorical model of the depths `1..=n` (symbols `0..n`) from their counts over
/// `num_vectors` vectors (counts that sum to it), every depth at least one unit.
fn depth_model(counts: &[u32], num_vectors: usize) -> DefaultContiguousCategoricalEntropyModel {
    let probabilities: Vec<f64> = counts
        .iter()
        .map(|&count| f64::from(count) / num_vectors as f64)
        .collect();
    DefaultContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(
        fixed_point_probabilities(&probabilities),
        false,
    )
    .expect("the table sums to 2^24 with every entry >= 1")
}

fn read_header(bytes: &[u8], max_codes: u64) -> Result<Header, StreamError> {
    let mut reader = Reader { bytes, at: 0 };
    let magic = reader.take::<4>()?;
    if magic != MAGIC {
        return Err(StreamError::BadMagic { found: magic });
    }
    let version = reader.u8()?;
    if !(FIXED_DEPTH_VERSION..=FORMAT_VERSION).contains(&version) {
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
    let depth_counts = match version {
        FIXED_DEPTH_VERSION => None,
        _ => Some(
            (0..num_levels)
                .map(|_| reader.u32())
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
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
    if let Some(counts) = &depth_counts {
        let vectors = num_codes.map_or(0, |codes| codes / num_levels as u64);
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if total != vectors {
            return Err(malformed(format!(
                "depth counts {counts:?} sum to {total}, expected the {vectors} vectors"
            )));
        }
    }
    Ok(Header {
        num_levels,
        embedding_dim,
        sizes,
        shape: shape.iter().map(|&d| d as usize).collect(),
        fingerprint,
        depth_counts,
        payload_words: payload_words as usize,
        payload_start,
    })
}
