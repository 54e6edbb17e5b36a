//! The quantizer's learned prior over its codes, as entropy models for coding them.
//!
//! The EMA counts of a level are a running histogram of its codes; smoothed by the layer's
//! [`CodebookRule`] as the layer smooths them for its codebook (Laplace: `p_k = (c_k + eps) /
//! (n + K eps)`; clamp: `p_k` proportional to `max(c_k, eps)`), they are the level's
//! categorical model. [`EntropyModels`] turns them into fixed-point tables of `2^24` (every
//! code gets at least one unit, so any index can be coded) by IEEE `f64` arithmetic in a fixed
//! order on the saved `f32` counts, so the tables, and the streams coded with them, are
//! bit-identical on every machine that loaded the same checkpoint. The coding itself is
//! `constriction`'s ANS coder (`coding/stream.rs`).

use constriction::stream::model::DefaultContiguousCategoricalEntropyModel;

use crate::config::CodebookRule;
use crate::error::{RvqError, StreamError};
use crate::util::{fnv1a64, fnv1a64_continue};

/// Bits of precision of the fixed-point probabilities: they sum to `2^PRECISION`.
pub const PRECISION: u32 = 24;

/// The largest codebook size that can be entropy coded: every code keeps at least `2^-24`
/// while at least `15/16` of the mass stays free to follow the counts.
pub const MAX_CODED_CODEBOOK_SIZE: usize = 1 << (PRECISION - 4);

/// One level's model: the smoothed probabilities and their fixed-point table.
#[derive(Debug, Clone)]
pub struct LevelModel {
    probabilities: Vec<f64>,
    fixed_point: Vec<u32>,
    coder_model: DefaultContiguousCategoricalEntropyModel,
}

impl LevelModel {
    /// The model of a level whose EMA counts are `counts` (`K` values), smoothed by `rule`
    /// with `epsilon`. `level` only names the level in errors.
    pub fn from_counts(
        level: usize,
        counts: &[f32],
        rule: CodebookRule,
        epsilon: f64,
    ) -> Result<Self, RvqError> {
        let size = counts.len();
        if size == 0 || size > MAX_CODED_CODEBOOK_SIZE {
            return Err(RvqError::Stream(StreamError::UnsupportedCodebookSize {
                level,
                size,
                max: MAX_CODED_CODEBOOK_SIZE,
            }));
        }
        if let Some(bad) = counts.iter().find(|c| !c.is_finite() || **c < 0.0) {
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.ema_count"),
                reason: format!("holds {bad}, expected finite counts >= 0 to build a code model"),
            });
        }
        let Some(probabilities) = rule.probabilities(counts, epsilon) else {
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.ema_count"),
                reason: "sums to zero and epsilon is zero: no code model".to_string(),
            });
        };
        let fixed_point = fixed_point_probabilities(&probabilities);
        let coder_model =
            DefaultContiguousCategoricalEntropyModel::from_nonzero_fixed_point_probabilities(
                &fixed_point,
                false,
            )
            .expect("the table sums to 2^24 with every entry >= 1");
        Ok(Self {
            probabilities,
            fixed_point,
            coder_model,
        })
    }

    /// `K`.
    pub fn size(&self) -> usize {
        self.probabilities.len()
    }

    /// The smoothed probabilities (Laplace: `(c_k + eps) / (n + K eps)`).
    pub fn probabilities(&self) -> &[f64] {
        &self.probabilities
    }

    /// The fixed-point table the coder uses: `K` entries >= 1 summing to `2^24`.
    pub fn fixed_point(&self) -> &[u32] {
        &self.fixed_point
    }

    /// What each code costs in a stream, in bits: `-log2` of its fixed-point probability
    /// (`PRECISION - log2 table_k`), the price the rate-distortion encoder puts on it
    /// ([`EncodeOptions`](crate::EncodeOptions)).
    pub fn code_lengths(&self) -> Vec<f64> {
        self.fixed_point
            .iter()
            .map(|&p| f64::from(PRECISION) - f64::from(p).log2())
            .collect()
    }

    pub(crate) fn coder_model(&self) -> &DefaultContiguousCategoricalEntropyModel {
        &self.coder_model
    }
}

/// Entropy models of every level of a quantizer, taken from its EMA counts at one moment.
///
/// Build once with [`EmaResidualVectorQuantizer::entropy_models`] (one host read of the counts
/// per level) and reuse for many streams; [`EntropyModels::compress`] and
/// [`EntropyModels::decompress`] code index lists on the host.
///
/// [`EmaResidualVectorQuantizer::entropy_models`]:
///     crate::EmaResidualVectorQuantizer::entropy_models
#[derive(Debug, Clone)]
pub struct EntropyModels {
    pub(super) levels: Vec<LevelModel>,
    pub(super) embedding_dim: usize,
    /// `fingerprints[n - 1]`: the fingerprint of the first `n` tables, hashed once here
    /// rather than on every stream.
    fingerprints: Vec<u64>,
}

impl EntropyModels {
    /// Models from per-level EMA counts, smoothed by `rule` with `epsilon`, for vectors of
    /// dimension `embedding_dim` (recorded in streams).
    pub fn from_counts(
        counts: &[Vec<f32>],
        rule: CodebookRule,
        epsilon: f64,
        embedding_dim: usize,
    ) -> Result<Self, RvqError> {
        let levels: Vec<LevelModel> = counts
            .iter()
            .enumerate()
            .map(|(level, counts)| LevelModel::from_counts(level, counts, rule, epsilon))
            .collect::<Result<_, _>>()?;
        // One pass over the tables: the hash after level n is the fingerprint of n levels.
        let fingerprints = levels
            .iter()
            .scan(fnv1a64([]), |hash, level| {
                let bytes = (level.size() as u64).to_le_bytes().into_iter();
                let table = level.fixed_point.iter().flat_map(|p| p.to_le_bytes());
                *hash = fnv1a64_continue(*hash, bytes.chain(table));
                Some(*hash)
            })
            .collect();
        Ok(Self {
            levels,
            embedding_dim,
            fingerprints,
        })
    }

    /// The per-level models.
    pub fn levels(&self) -> &[LevelModel] {
        &self.levels
    }

    /// `D`.
    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    /// Codebook size of every level.
    pub fn sizes(&self) -> Vec<usize> {
        self.levels.iter().map(LevelModel::size).collect()
    }

    /// A 64-bit fingerprint (FNV-1a) of the fixed-point tables of the first `num_levels`
    /// levels (`1..=M`): a stream records it, and decoding with other tables is refused.
    ///
    /// # Panics
    ///
    /// If `num_levels` is 0 or more than the number of levels.
    pub fn fingerprint(&self, num_levels: usize) -> u64 {
        self.fingerprints[num_levels - 1]
    }

    /// Cross-entropy in bits of `indices` (the first `indices.len()` levels) under the
    /// smoothed EMA probabilities: the size an ideal coder would reach with this model.
    ///
    /// # Panics
    ///
    /// If there are more index lists than levels or an index is out of range.
    pub fn cross_entropy_bits(&self, indices: &[Vec<u32>]) -> f64 {
        indices
            .iter()
            .zip(&self.levels)
            .map(|(codes, level)| {
                codes
                    .iter()
                    .map(|&code| -level.probabilities[code as usize].log2())
                    .sum::<f64>()
            })
            .sum()
    }
}

/// Quantizes probabilities (summing to 1) to integers >= 1 that sum to `2^PRECISION`:
/// `1 + floor(p_k (2^P - K))`, then the units left over go to the largest fractional parts
/// (ties to the lower index). Deterministic: f64 products and a total order.
pub(super) fn fixed_point_probabilities(probabilities: &[f64]) -> Vec<u32> {
    let size = probabilities.len();
    let target = 1u64 << PRECISION;
    let free = (target - size as u64) as f64;
    let scaled: Vec<f64> = probabilities.iter().map(|p| p * free).collect();
    let mut table: Vec<u32> = scaled.iter().map(|s| 1 + s.floor() as u32).collect();
    let assigned: u64 = table.iter().map(|&p| u64::from(p)).sum();
    if assigned < target {
        let mut order: Vec<usize> = (0..size).collect();
        order.sort_by(|&a, &b| {
            let fraction = |k: usize| scaled[k] - scaled[k].floor();
            fraction(b).total_cmp(&fraction(a)).then(a.cmp(&b))
        });
        for &k in order.iter().cycle().take((target - assigned) as usize) {
            table[k] += 1;
        }
    } else {
        // Rounding of the f64 probabilities can put the floors a unit over the total: take
        // it back from the largest entry (the lowest index among equals), which stays >= 1.
        for _ in 0..assigned - target {
            let largest = (0..size)
                .max_by(|&a, &b| table[a].cmp(&table[b]).then(b.cmp(&a)))
                .expect("non-empty table");
            table[largest] -= 1;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_tables_sum_to_the_precision_and_keep_every_code() {
        let cases: Vec<Vec<f64>> = vec![
            vec![1.0],
            vec![0.5, 0.5],
            vec![1.0 - 1e-12, 1e-12],
            (0..1000)
                .map(|k| 1.0 / 1000.0 + (k as f64 - 499.5) * 1e-9)
                .collect(),
            {
                let raw: Vec<f64> = (0..4096).map(|k| ((k * 7919) % 97) as f64 + 1e-5).collect();
                let total: f64 = raw.iter().sum();
                raw.iter().map(|r| r / total).collect()
            },
        ];
        for probabilities in cases {
            let table = fixed_point_probabilities(&probabilities);
            assert_eq!(table.len(), probabilities.len());
            assert_eq!(
                table.iter().map(|&p| u64::from(p)).sum::<u64>(),
                1 << PRECISION
            );
            assert!(table.iter().all(|&p| p >= 1));
            for (p, q) in probabilities.iter().zip(&table) {
                let exact = p * f64::from(1u32 << PRECISION);
                assert!((f64::from(*q) - exact).abs() <= probabilities.len() as f64 + 2.0);
            }
        }
    }

    #[test]
    fn codebooks_too_large_to_code_are_refused() {
        let counts = vec![vec![1.0f32; MAX_CODED_CODEBOOK_SIZE + 1]];
        let error =
            EntropyModels::from_counts(&counts, CodebookRule::Laplace, 1e-5, 4).unwrap_err();
        assert!(error.to_string().contains("1048577"), "{error}");
    }
}
