//! Codebook metrics, computed from a batch's per-code counts.
//!
//! The reference (helia-edge `EmaResidualVectorQuantizer`) reports, per level `l` (1-based) and
//! for the batch alone:
//!
//! ```text
//! p_k        = N_k / N                               code histogram
//! H          = -sum_k p_k log2(p_k + 1e-10)          bits per index (entropy lower bound)
//! perplexity = 2^H
//! usage      = |{k : N_k > 0}| / K
//! ```
//!
//! and the aggregates `rvq_perplexity_mean`, `rvq_usage_mean` (means over levels) and
//! `rvq_bits_per_index_sum` (sum over levels). Batch perplexity depends on the batch size
//! (a batch of 64 vectors cannot use more than 64 codes); for a batch-independent view use
//! [`CodebookHealth`], from the EMA counts.

use std::collections::BTreeMap;

/// The metrics of one level for one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelMetrics {
    /// `2^H`: the effective number of codes used (reference: `rvq_l{l}_perplexity`).
    pub perplexity: f64,
    /// Share of the codes used at least once (reference: `rvq_l{l}_usage`).
    pub usage: f64,
    /// Entropy `H` of the code histogram in bits (reference: `rvq_l{l}_bits_per_index`).
    pub bits_per_index: f64,
}

impl LevelMetrics {
    /// The metrics of a code histogram (counts per code, any non-negative numbers).
    ///
    /// An empty histogram (no vectors) gives perplexity 1, usage 0 and 0 bits.
    pub fn from_counts(counts: &[f32]) -> Self {
        let total: f64 = counts.iter().map(|&c| c as f64).sum();
        let num_codes = counts.len().max(1) as f64;
        if total <= 0.0 {
            return Self {
                perplexity: 1.0,
                usage: 0.0,
                bits_per_index: 0.0,
            };
        }
        let bits_per_index = -counts
            .iter()
            .map(|&c| {
                let p = c as f64 / total;
                p * (p + 1e-10).log2()
            })
            .sum::<f64>();
        let used = counts.iter().filter(|&&c| c > 0.0).count() as f64;
        Self {
            perplexity: bits_per_index.exp2(),
            usage: used / num_codes,
            bits_per_index,
        }
    }
}

/// Batch-independent health of one level, from its EMA counts (not from one batch, whose
/// perplexity cannot exceed the batch size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodebookHealth {
    /// Entropy of the EMA count distribution divided by `log K`: 1 when every code is used
    /// equally, 0 when one code takes everything (1 for `K = 1`).
    pub ema_entropy: f64,
    /// Share of codes whose EMA count is at least `threshold * n / K` (`n` the sum of the
    /// counts): the codes that are alive at that threshold.
    pub active_share: f64,
    /// The threshold used, relative to uniform usage.
    pub threshold: f64,
}

impl CodebookHealth {
    /// Health of a level with EMA counts `counts` at `threshold` (relative to uniform usage).
    pub fn from_ema_counts(counts: &[f32], threshold: f64) -> Self {
        let k = counts.len().max(1) as f64;
        let total: f64 = counts.iter().map(|&c| c.max(0.0) as f64).sum();
        if total <= 0.0 {
            return Self {
                ema_entropy: 0.0,
                active_share: 0.0,
                threshold,
            };
        }
        let entropy: f64 = -counts
            .iter()
            .map(|&c| c.max(0.0) as f64 / total)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
        let ema_entropy = if k > 1.0 { entropy / k.ln() } else { 1.0 };
        let floor = threshold * total / k;
        let active = counts.iter().filter(|&&c| c as f64 >= floor).count() as f64;
        Self {
            ema_entropy,
            active_share: active / k,
            threshold,
        }
    }
}

/// Per-level and aggregate metrics of one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RvqMetrics {
    /// One entry per level that ran, in order.
    pub levels: Vec<LevelMetrics>,
    /// The step's EMA update was skipped because the input held a NaN or an infinity.
    pub update_skipped: bool,
}

impl RvqMetrics {
    /// Mean perplexity over levels (reference: `rvq_perplexity_mean`).
    pub fn perplexity_mean(&self) -> f64 {
        self.mean(|level| level.perplexity)
    }

    /// Mean usage over levels (reference: `rvq_usage_mean`).
    pub fn usage_mean(&self) -> f64 {
        self.mean(|level| level.usage)
    }

    /// Sum of bits per index over levels: the entropy lower bound of one coded vector
    /// (reference: `rvq_bits_per_index_sum`).
    pub fn bits_per_index_sum(&self) -> f64 {
        self.levels.iter().map(|level| level.bits_per_index).sum()
    }

    /// Every metric under the reference's name (`rvq_l1_perplexity`, ...,
    /// `rvq_bits_per_index_sum`), ready to log.
    pub fn named(&self) -> BTreeMap<String, f64> {
        let mut named = BTreeMap::new();
        for (index, level) in self.levels.iter().enumerate() {
            let l = index + 1;
            named.insert(format!("rvq_l{l}_perplexity"), level.perplexity);
            named.insert(format!("rvq_l{l}_usage"), level.usage);
            named.insert(format!("rvq_l{l}_bits_per_index"), level.bits_per_index);
        }
        named.insert("rvq_perplexity_mean".into(), self.perplexity_mean());
        named.insert("rvq_usage_mean".into(), self.usage_mean());
        named.insert("rvq_bits_per_index_sum".into(), self.bits_per_index_sum());
        named.insert(
            "rvq_update_skipped".into(),
            if self.update_skipped { 1.0 } else { 0.0 },
        );
        named
    }

    fn mean(&self, value: impl Fn(&LevelMetrics) -> f64) -> f64 {
        if self.levels.is_empty() {
            return 0.0;
        }
        self.levels.iter().map(value).sum::<f64>() / self.levels.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_histogram_has_full_perplexity() {
        let metrics = LevelMetrics::from_counts(&[2.0, 2.0, 2.0, 2.0]);
        assert!((metrics.perplexity - 4.0).abs() < 1e-6);
        assert!((metrics.bits_per_index - 2.0).abs() < 1e-6);
        assert_eq!(metrics.usage, 1.0);
    }

    #[test]
    fn one_code_has_perplexity_one() {
        let metrics = LevelMetrics::from_counts(&[0.0, 5.0, 0.0, 0.0]);
        assert!((metrics.perplexity - 1.0).abs() < 1e-6);
        assert!(metrics.bits_per_index.abs() < 1e-6);
        assert_eq!(metrics.usage, 0.25);
    }

    #[test]
    fn health_is_normalized_entropy_and_share_above_threshold() {
        let uniform = CodebookHealth::from_ema_counts(&[3.0; 8], 0.1);
        assert!((uniform.ema_entropy - 1.0).abs() < 1e-12);
        assert_eq!(uniform.active_share, 1.0);
        // Uniform rate here is 10 / 4 = 2.5; at threshold 0.5 a code needs 1.25.
        let skewed = CodebookHealth::from_ema_counts(&[7.0, 1.0, 2.0, 0.0], 0.5);
        assert_eq!(skewed.active_share, 0.5);
        assert!(skewed.ema_entropy > 0.0 && skewed.ema_entropy < 1.0);
        let collapsed = CodebookHealth::from_ema_counts(&[5.0, 0.0, 0.0, 0.0], 0.1);
        assert_eq!(collapsed.ema_entropy, 0.0);
        assert_eq!(collapsed.active_share, 0.25);
    }

    #[test]
    fn aggregates_are_mean_mean_and_sum() {
        let metrics = RvqMetrics {
            levels: vec![
                LevelMetrics::from_counts(&[1.0, 1.0]),
                LevelMetrics::from_counts(&[1.0, 0.0]),
            ],
            update_skipped: false,
        };
        let named = metrics.named();
        assert!((named["rvq_perplexity_mean"] - 1.5).abs() < 1e-6);
        assert!((named["rvq_usage_mean"] - 0.75).abs() < 1e-12);
        assert!((named["rvq_bits_per_index_sum"] - 1.0).abs() < 1e-6);
        assert_eq!(named.len(), 2 * 3 + 4);
    }
}
