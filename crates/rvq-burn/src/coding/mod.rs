//! Codes to bytes: entropy models from the EMA counts (`model.rs`), the self-describing
//! stream format (`stream.rs`), and the quantizer's `try_compress` and `try_decompress`, which
//! join them to its `encode` and `decode`.

mod model;
mod stream;

use burn::tensor::{Bool, Device, Int, Tensor};

pub use self::model::{EntropyModels, LevelModel, MAX_CODED_CODEBOOK_SIZE, PRECISION};
pub use self::stream::{ABSENT, CodeStream, FORMAT_VERSION, MAGIC, MAX_CODES};
use crate::error::RvqError;
use crate::options::EncodeOptions;
use crate::quantizer::EmaResidualVectorQuantizer;
use crate::util::{host_ints, int_tensor};

impl EmaResidualVectorQuantizer {
    /// The entropy models of every level from the current EMA counts (read once per level,
    /// after pending updates are applied), smoothed by the configured
    /// [`CodebookRule`](crate::CodebookRule) as the codebooks are. Fails if a level has more
    /// than [`MAX_CODED_CODEBOOK_SIZE`] codes.
    pub fn entropy_models(&self) -> Result<EntropyModels, RvqError> {
        let config = self.config();
        EntropyModels::from_counts(
            &self.host_counts(),
            config.codebook_rule,
            config.epsilon,
            config.embedding_dim,
        )
    }

    /// Encodes `x` `[..., D]` with the first `num_levels` levels and entropy-codes the indices
    /// with the current EMA counts ([`EmaResidualVectorQuantizer::entropy_models`]).
    ///
    /// To code many inputs, build the models once and call [`EntropyModels::compress`].
    pub fn try_compress<const R: usize>(
        &self,
        x: Tensor<R>,
        num_levels: usize,
    ) -> Result<Vec<u8>, RvqError> {
        let shape = x.dims();
        let models = self.entropy_models()?;
        let codes = self.try_encode(x, num_levels)?;
        models.compress(&indices_to_host(codes)?, &shape)
    }

    /// [`EmaResidualVectorQuantizer::try_compress`] of the real positions of `x` alone (`mask`
    /// over its leading shape, true where a position is real): padded positions are not
    /// coded. The stream holds the real rows as a `[N_real, D]` tensor, in row-major order;
    /// the mask (the sequence lengths, typically) is the caller's to keep, as the real
    /// positions' places. Reads the mask back to the host once.
    pub fn try_compress_masked<const R: usize, const L: usize>(
        &self,
        x: Tensor<R>,
        num_levels: usize,
        mask: Tensor<L, Bool>,
    ) -> Result<Vec<u8>, RvqError> {
        let d = self.embedding_dim();
        let models = self.entropy_models()?;
        let codes = self.try_encode_masked(x, num_levels, mask)?;
        let real = codes.first().map_or(0, |level| level.dims()[0]);
        models.compress(&indices_to_host(codes)?, &[real, d])
    }

    /// Encodes `x` `[..., D]` by `options` ([`EncodeOptions`]: codes chosen for their bits
    /// under these same models, a beam search, a depth per vector) and entropy-codes the
    /// codes. With the default options the stream is [`EmaResidualVectorQuantizer::try_compress`]'s
    /// of every level, byte for byte (`max_levels` sets the levels). A per-vector depth
    /// writes a version 2 stream when some vector stops early.
    pub fn try_compress_with<const R: usize>(
        &self,
        x: Tensor<R>,
        options: &EncodeOptions,
    ) -> Result<Vec<u8>, RvqError> {
        let shape = x.dims();
        let models = self.entropy_models()?;
        let codes = self.encode_with_models(x, options, Some(&models))?;
        models.compress(&codes_to_host(codes), &shape)
    }

    /// Decodes a stream from [`EmaResidualVectorQuantizer::try_compress`] (same checkpoint):
    /// the indices of each coded level and the dequantized tensor of the original shape, on
    /// `device`. A stream with a depth per vector ([`EmaResidualVectorQuantizer::try_compress_with`])
    /// gives `-1` past each vector's depth, and its sum of the codes it has
    /// ([`EmaResidualVectorQuantizer::try_decode_partial`]). Fails on any bad stream (see
    /// [`StreamError`](crate::StreamError)) or if the stream's rank is not `R`.
    pub fn try_decompress<const R: usize>(
        &self,
        bytes: &[u8],
        device: &Device,
    ) -> Result<(Vec<Tensor<1, Int>>, Tensor<R>), RvqError> {
        let stream = self.entropy_models()?.decompress(bytes)?;
        let shape: [usize; R] = stream.shape.clone().try_into().map_err(|_| {
            RvqError::Stream(stream::malformed(format!(
                "stream holds a tensor of shape {:?}, expected rank {R}",
                stream.shape
            )))
        })?;
        let indices = indices_to_device(&stream.indices, device);
        let dequantized = match stream.has_depths() {
            true => self.try_decode_partial(&indices, shape)?,
            false => self.try_decode(&indices, shape)?,
        };
        Ok((indices, dequantized))
    }
}

/// Index tensors (one per level, as [`EmaResidualVectorQuantizer::encode`] gives them) to
/// host lists, for [`EntropyModels::compress`].
///
/// Fails on a negative index: a `-1` marks a padded position in a masked forward's indices,
/// and is no code (code the real positions alone with
/// [`EmaResidualVectorQuantizer::try_encode_masked`]).
pub fn indices_to_host(indices: Vec<Tensor<1, Int>>) -> Result<Vec<Vec<u32>>, RvqError> {
    indices
        .into_iter()
        .enumerate()
        .map(|(level, codes)| {
            let codes = host_ints(codes);
            match codes.iter().position(|&code| code < 0) {
                Some(position) => Err(RvqError::InvalidArgument {
                    argument: "indices",
                    value: format!("{} at level {level}, position {position}", codes[position]),
                    rule: "must be codes >= 0 (a -1 marks padding: code the real positions \
                           alone, with try_encode_masked)",
                }),
                None => Ok(codes.into_iter().map(|code| code as u32).collect()),
            }
        })
        .collect()
}

/// Host index lists (as [`CodeStream::indices`] holds them) to tensors on `device`, for
/// [`EmaResidualVectorQuantizer::decode`] ([`ABSENT`] becomes `-1`, for
/// [`EmaResidualVectorQuantizer::try_decode_partial`]).
pub fn indices_to_device(indices: &[Vec<u32>], device: &Device) -> Vec<Tensor<1, Int>> {
    indices
        .iter()
        .map(|codes| {
            let codes = codes
                .iter()
                .map(|&c| if c == ABSENT { -1 } else { i64::from(c) })
                .collect();
            int_tensor(codes, device)
        })
        .collect()
}

/// Codes from [`EmaResidualVectorQuantizer::try_encode_with`] (in range, or `-1` past a
/// vector's depth) to host lists for [`EntropyModels::compress`], `-1` as [`ABSENT`]. (For a
/// masked forward's indices, whose `-1` is padding, use [`indices_to_host`].)
pub fn codes_to_host(codes: Vec<Tensor<1, Int>>) -> Vec<Vec<u32>> {
    codes
        .into_iter()
        .map(|level| {
            host_ints(level)
                .into_iter()
                .map(|c| if c < 0 { ABSENT } else { c as u32 })
                .collect()
        })
        .collect()
}
