//! Configuration of the quantizer and its validation.

use burn::config::Config;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::RvqError;
use crate::util::unit_rows;

/// Codebook size: one for every level, or one per level.
///
/// Serialized as a plain number (`64`) or a list (`[16, 8, 4]`), as in the reference's
/// `num_embeddings` argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CodebookSizes {
    /// The same size `K` at every level.
    Uniform(usize),
    /// One size per level; the list must have `num_levels` entries.
    PerLevel(Vec<usize>),
}

impl CodebookSizes {
    /// The size of every level, for a quantizer of `num_levels` levels.
    ///
    /// A per-level list is returned as it is (its length is checked by
    /// [`EmaResidualVectorQuantizerConfig::validate`]).
    pub fn resolve(&self, num_levels: usize) -> Vec<usize> {
        match self {
            Self::Uniform(size) => vec![*size; num_levels],
            Self::PerLevel(sizes) => sizes.clone(),
        }
    }
}

impl From<usize> for CodebookSizes {
    fn from(size: usize) -> Self {
        Self::Uniform(size)
    }
}

impl From<Vec<usize>> for CodebookSizes {
    fn from(sizes: Vec<usize>) -> Self {
        Self::PerLevel(sizes)
    }
}

impl<const N: usize> From<[usize; N]> for CodebookSizes {
    fn from(sizes: [usize; N]) -> Self {
        Self::PerLevel(sizes.to_vec())
    }
}

/// Which execution path a quantizer's levels run on (see the crate docs, "Execution paths").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Execution {
    /// The fastest path for the device's backend, chosen at every call by its type: the host
    /// path on Burn's CPU backends (`flex`, `ndarray`, LibTorch's CPU device), the kernel path
    /// on Burn's CubeCL backend (`wgpu`), each with this crate's feature of the same name;
    /// Burn tensor operations elsewhere.
    #[default]
    Auto,
    /// Burn tensor operations on every backend: the plain version the fast paths are tested
    /// equal to (the same codes but for exact ties, the same counts, sums to rounding).
    TensorOps,
}

/// How a level's codebook is derived from its EMA statistics (counts `c_k`, sums `m_k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CodebookRule {
    /// `e_k = m_k / c^_k` with the Laplace-smoothed counts `c^_k = (c_k + eps) / (n + K eps) *
    /// n`, `n` the total count: the reference's rule, and EnCodec's and
    /// vector-quantize-pytorch's.
    #[default]
    Laplace,
    /// `e_k = m_k / max(c_k, eps)`, without smoothing: Mimi's (moshi `EuclideanCodebook`).
    Clamp,
}

impl CodebookRule {
    /// The codebook `[K, D]` from the counts `[K]` and sums `[K, D]`: `e_k = m_k / c^_k`.
    ///
    /// The order of operations is the reference's (and EnCodec's, and Mimi's for the clamp),
    /// so the result agrees to the rounding.
    pub(crate) fn codebook(self, counts: Tensor<1>, sums: Tensor<2>, epsilon: f64) -> Tensor<2> {
        if self == Self::Clamp {
            return sums.div(counts.clamp_min(epsilon).unsqueeze_dim(1));
        }
        let [k] = counts.dims();
        let total = counts.clone().sum(); // [1]
        let denominator = total.clone().add_scalar(k as f64 * epsilon); // [1]
        let smoothed = counts.add_scalar(epsilon).div(denominator).mul(total); // [K]
        sums.div(smoothed.unsqueeze_dim(1)) // [K, D] / [K, 1]
    }

    /// The divisors `c^_k` of [`CodebookRule::codebook`] on the host, in f32 in the same order
    /// (for checking a state before it is stored).
    #[cfg(feature = "pytorch")]
    pub(crate) fn divisors(self, counts: &[f32], epsilon: f64) -> Vec<f32> {
        let eps = epsilon as f32;
        match self {
            Self::Clamp => counts.iter().map(|&c| c.max(eps)).collect(),
            Self::Laplace => {
                let total: f32 = counts.iter().sum();
                let denominator = total + counts.len() as f32 * eps;
                counts
                    .iter()
                    .map(|&c| (c + eps) / denominator * total)
                    .collect()
            }
        }
    }

    /// The prior over the codes the counts give under this rule, in f64: each code's divisor
    /// over their sum, `p_k = (c_k + eps) / (n + K eps)` (Laplace) or `max(c_k, eps) / sum_j
    /// max(c_j, eps)` (clamp). The entropy models code with it. `None` when the weights sum
    /// to zero.
    pub(crate) fn probabilities(self, counts: &[f32], epsilon: f64) -> Option<Vec<f64>> {
        // f32 -> f64 is exact and IEEE f64 arithmetic in a fixed order is deterministic, so
        // the result depends on the counts alone.
        let weights: Vec<f64> = counts
            .iter()
            .map(|&c| match self {
                Self::Laplace => f64::from(c) + epsilon,
                Self::Clamp => f64::from(c).max(epsilon),
            })
            .collect();
        let total: f64 = weights.iter().sum();
        (total > 0.0).then(|| weights.iter().map(|w| w / total).collect())
    }
}

/// When dead codes are found and restarted within a training step (with
/// `threshold_ema_dead_code > 0`). Either way a code is dead when its EMA count is below
/// `threshold_ema_dead_code * n / K`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum DeadCodeRule {
    /// After the EMA update, on the updated counts; a restarted code gets count `n / K` and a
    /// batch vector. Default.
    #[default]
    AfterUpdate,
    /// Mimi's rule (moshi `threshold_usage_ratio`): before the EMA update, on the counts the
    /// batch was assigned with; a restarted code gets count `replaced_usage_ratio * n / K`
    /// (`n` before the restart) and a batch vector, and the batch's statistics then enter by
    /// the EMA as for every code. Mimi draws the vectors at random; this crate takes the
    /// batch rows represented worst, so the vectors differ while the codes restarted and
    /// their counts do not.
    BeforeUpdate {
        /// Count of a restarted code relative to the mean count (moshi's
        /// `replaced_usage_ratio`, default 1). Finite and > 0.
        replaced_usage_ratio: f64,
    },
}

/// Configuration of an [`EmaResidualVectorQuantizer`](crate::EmaResidualVectorQuantizer).
///
/// The defaults are those of the reference layer (helia-edge 0.6.2
/// `EmaResidualVectorQuantizer`); every option beyond it is off by default.
#[derive(Config, Debug)]
pub struct EmaResidualVectorQuantizerConfig {
    /// Number of residual levels `M` (reference: `num_levels`). Must be at least 1.
    pub num_levels: usize,
    /// Codebook size `K`, one for all levels or one per level (reference: `num_embeddings`).
    /// Every size must be at least 1.
    pub num_embeddings: CodebookSizes,
    /// Dimension `D` of the vectors to quantize (reference: `embedding_dim`). At least 1.
    pub embedding_dim: usize,
    /// Weight of the commitment loss `beta * mean((sg(q) - r)^2)`. Must be finite and > 0.
    /// Default: 0.25.
    #[config(default = 0.25)]
    pub beta: f64,
    /// Decay `g` of the exponential moving averages of counts and sums, in `[0, 1]`
    /// (1 freezes the codebook). Default: 0.99.
    #[config(default = 0.99)]
    pub ema_decay: f64,
    /// Smoothing constant of the EMA counts (see `codebook_rule`). Must be finite and > 0.
    /// Default: 1e-5.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// How the codebook is derived from the EMA statistics. Default:
    /// [`CodebookRule::Laplace`] (the reference's); [`CodebookRule::Clamp`] is Mimi's.
    #[config(default = "CodebookRule::Laplace")]
    pub codebook_rule: CodebookRule,
    /// Largest distance matrix (rows x codes) computed at once on the tensor path; a batch
    /// with more `N x K` entries is searched in row chunks, so memory stays bounded for large
    /// `N`. The host path works in small tiles anyway, one per worker thread (2^16
    /// distances, or 16 rows of codebooks over 4096 codes), and this only caps them further;
    /// the kernel path never forms the matrix. Does not change any result. Must be at least
    /// 1. Default: 2^24 (64 MiB of f32).
    #[config(default = 16777216)]
    pub max_distance_elements: usize,
    /// On the tensor path, accumulate each batch's per-code counts and sums as products of
    /// 0/1 assignment matrices (in blocks, within `max_distance_elements`) instead of
    /// scatter-adds. Same values up to the order of float additions, and deterministic. For
    /// the tensor path on GPUs, where scatter-adds can dominate a training step (README,
    /// Benchmarks); on CPUs the scatter-add is the faster one. The host and kernel paths
    /// accumulate in their own passes and ignore it. Default: false.
    #[config(default = false)]
    pub dense_statistics: bool,
    /// Initialize every level's codebook by k-means on the first training batch, level by
    /// level, with a consistent EMA state (counts = cluster sizes, sums = centroid x count).
    /// Default: false (the reference's uniform init).
    #[config(default = false)]
    pub kmeans_init: bool,
    /// Lloyd iterations of the k-means init. Must be >= 1. Default: 10.
    #[config(default = 10)]
    pub kmeans_iterations: usize,
    /// Dead-code restart threshold, relative to uniform usage: a code whose EMA count is below
    /// `threshold_ema_dead_code * n / K` (`n` the sum of the level's EMA counts, `K` its size)
    /// is replaced by a vector of the current batch. Being a rate, it does not depend on the
    /// batch size or the number of devices. In `[0, 1)`; 0 disables. Default: 0.
    #[config(default = 0.0)]
    pub threshold_ema_dead_code: f64,
    /// Look for dead codes every this many training steps. Must be >= 1. Default: 1.
    #[config(default = 1)]
    pub dead_code_check_every: usize,
    /// When in a step dead codes are found and restarted. Default:
    /// [`DeadCodeRule::AfterUpdate`]; [`DeadCodeRule::BeforeUpdate`] is Mimi's. Not with
    /// `data_parallel`, whose restarts split busy codes.
    #[config(default = "DeadCodeRule::AfterUpdate")]
    pub dead_code_rule: DeadCodeRule,
    /// Quantizer dropout: probability that a training batch is quantized with a random number
    /// of levels, drawn uniformly from `quantize_dropout_min_levels..=num_levels`, so that one
    /// model serves every bitrate (SoundStream). In `[0, 1]`. Default: 0.
    #[config(default = 0.0)]
    pub quantize_dropout: f64,
    /// The fewest levels quantizer dropout draws, in `1..=num_levels`. Default: 1.
    #[config(default = 1)]
    pub quantize_dropout_min_levels: usize,
    /// Data-parallel mode, for training on several devices at once (Burn's
    /// `ExecutionStrategy::multi`, or `ddp`). Every state change is then a function of the
    /// synchronized state and of per-code counts and sums of the batch, which is what makes
    /// Burn's averaging of the devices' updates give the state one device would reach on the
    /// union of their batches (README, "Several devices"):
    ///
    /// - the first training step *replaces* the initial statistics by the batch's per-code
    ///   counts and sums (a Lloyd step from the initial codebook; a code no vector chose
    ///   becomes the zero vector with count 0), so the initial state, which averaging would
    ///   not scale with the batch statistics, leaves no trace;
    /// - with `kmeans_init`, the k-means init is that Lloyd step repeated over the first
    ///   `kmeans_iterations` training steps (one iteration per step, on the union of the
    ///   devices' batches), codes left empty being split off the busiest codes;
    /// - dead-code restarts split the busiest codes of the synchronized state (LBG
    ///   splitting: the dead code takes half of the busiest code's counts and sums and a
    ///   small deterministic offset) instead of taking vectors of one device's batch.
    ///
    /// Costs one read of the step counter back to the host per training step (and one of
    /// the counts on the steps that split codes). Leave off on one device to keep the
    /// reference's behaviour. Default: false.
    #[config(default = false)]
    pub data_parallel: bool,
    /// The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the
    /// Rotation Trick", arXiv 2410.06424): the input's gradient passes through the rotation
    /// and rescaling that carries each input vector onto its quantized sum (built from
    /// Householder reflections, nothing of size `D x D` per vector), instead of the identity
    /// of the straight-through estimator. Still one estimator, on the sum of the levels; the
    /// forward value is unchanged (bit for bit). Default: false (the reference's estimator).
    #[config(default = false)]
    pub rotation_trick: bool,
    /// Dimension of the codebooks' space, when it differs from `embedding_dim`: a learned
    /// projection (a linear layer with bias, trainable like any parameter) takes the input
    /// into it before the first level and another takes the sum of the codes back out
    /// (vector-quantize-pytorch's `codebook_dim`, ViT-VQGAN's factorized codes). The EMA
    /// state, the commitment loss and the straight-through estimator live in the codebooks'
    /// space; codes, `decode` and the output are in the model's. At least 1; equal to
    /// `embedding_dim` means no projection, as in vector-quantize-pytorch. Default: none.
    #[config(default = "None")]
    pub codebook_dim: Option<usize>,
    /// Cosine-similarity codebooks (vector-quantize-pytorch's `use_cosine_sim`): the residual
    /// entering each level is L2-normalized and searched against L2-normalized codes by dot
    /// product; the EMA runs on the normalized rows and the codebook is the normalized
    /// smoothed mean; the level's code (of unit length) is subtracted from the
    /// unnormalized residual; the commitment loss compares the normalized residual with its
    /// code. k-means init and dead-code restarts use the normalized rows. Default: false.
    #[config(default = false)]
    pub cosine_similarity: bool,
    /// Which execution path the levels run on. Does not change any result beyond float
    /// rounding (see [`Execution`]). Default: [`Execution::Auto`].
    #[config(default = "Execution::Auto")]
    pub execution: Execution,
}

impl EmaResidualVectorQuantizerConfig {
    /// The codebook `[K, D]` that EMA counts `[K]` and sums `[K, D]` give under this
    /// configuration: its codebook rule, then each code over its length for cosine codebooks.
    pub(crate) fn codebook(&self, counts: Tensor<1>, sums: Tensor<2>) -> Tensor<2> {
        let codebook = self.codebook_rule.codebook(counts, sums, self.epsilon);
        match self.cosine_similarity {
            true => unit_rows(codebook),
            false => codebook,
        }
    }

    /// The codebook size of every level.
    pub fn sizes(&self) -> Vec<usize> {
        self.num_embeddings.resolve(self.num_levels)
    }

    /// Dimension of the codebooks' space: `codebook_dim` if set, else `embedding_dim`.
    pub fn codebook_space_dim(&self) -> usize {
        self.codebook_dim.unwrap_or(self.embedding_dim)
    }

    /// Whether the input is projected into the codebooks' space and back
    /// (`codebook_dim` set and not `embedding_dim`).
    pub fn has_projection(&self) -> bool {
        self.codebook_space_dim() != self.embedding_dim
    }

    /// Checks every rule; the error names the parameter, the value and the rule broken.
    pub fn validate(&self) -> Result<(), RvqError> {
        fn invalid(parameter: &'static str, value: String, rule: &'static str) -> RvqError {
            RvqError::InvalidConfig {
                parameter,
                value,
                rule,
            }
        }
        if self.num_levels < 1 {
            return Err(invalid(
                "num_levels",
                self.num_levels.to_string(),
                "must be >= 1",
            ));
        }
        if self.embedding_dim < 1 {
            return Err(invalid(
                "embedding_dim",
                self.embedding_dim.to_string(),
                "must be >= 1",
            ));
        }
        if self.codebook_dim == Some(0) {
            return Err(invalid(
                "codebook_dim",
                "0".to_string(),
                "must be >= 1 (or absent: no projection)",
            ));
        }
        let sizes = self.sizes();
        if sizes.len() != self.num_levels {
            return Err(invalid(
                "num_embeddings",
                format!("{sizes:?} ({} sizes)", sizes.len()),
                "must hold one size per level (num_levels sizes)",
            ));
        }
        if let Some(size) = sizes.iter().find(|&&size| size < 1) {
            return Err(invalid(
                "num_embeddings",
                format!("{size} (in {sizes:?})"),
                "must be >= 1 at every level",
            ));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(invalid(
                "beta",
                self.beta.to_string(),
                "must be finite and > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return Err(invalid(
                "ema_decay",
                self.ema_decay.to_string(),
                "must lie in [0, 1]",
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(invalid(
                "epsilon",
                self.epsilon.to_string(),
                "must be finite and > 0",
            ));
        }
        if self.kmeans_iterations < 1 {
            return Err(invalid(
                "kmeans_iterations",
                self.kmeans_iterations.to_string(),
                "must be >= 1",
            ));
        }
        if !(0.0..1.0).contains(&self.threshold_ema_dead_code) {
            return Err(invalid(
                "threshold_ema_dead_code",
                self.threshold_ema_dead_code.to_string(),
                "must lie in [0, 1) (a share of the uniform usage rate; 0 disables)",
            ));
        }
        if self.dead_code_check_every < 1 {
            return Err(invalid(
                "dead_code_check_every",
                self.dead_code_check_every.to_string(),
                "must be >= 1",
            ));
        }
        if let DeadCodeRule::BeforeUpdate {
            replaced_usage_ratio,
        } = self.dead_code_rule
        {
            if !(replaced_usage_ratio.is_finite() && replaced_usage_ratio > 0.0) {
                return Err(invalid(
                    "dead_code_rule",
                    format!("BeforeUpdate {{ replaced_usage_ratio: {replaced_usage_ratio} }}"),
                    "needs a finite replaced_usage_ratio > 0",
                ));
            }
            if self.data_parallel {
                return Err(invalid(
                    "dead_code_rule",
                    format!("BeforeUpdate {{ replaced_usage_ratio: {replaced_usage_ratio} }}"),
                    "is not available with data_parallel = true (its restarts split busy codes)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.quantize_dropout) {
            return Err(invalid(
                "quantize_dropout",
                self.quantize_dropout.to_string(),
                "must lie in [0, 1]",
            ));
        }
        if !(1..=self.num_levels).contains(&self.quantize_dropout_min_levels) {
            return Err(invalid(
                "quantize_dropout_min_levels",
                self.quantize_dropout_min_levels.to_string(),
                "must lie in 1..=num_levels",
            ));
        }
        if self.max_distance_elements < 1 {
            return Err(invalid(
                "max_distance_elements",
                self.max_distance_elements.to_string(),
                "must be >= 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EmaResidualVectorQuantizerConfig {
        EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4)
    }

    fn with(
        change: impl FnOnce(&mut EmaResidualVectorQuantizerConfig),
    ) -> EmaResidualVectorQuantizerConfig {
        let mut config = config();
        change(&mut config);
        config
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let config = config();
        assert_eq!(config.beta, 0.25);
        assert_eq!(config.ema_decay, 0.99);
        assert_eq!(config.epsilon, 1e-5);
        assert_eq!(config.sizes(), vec![8, 8]);
        // Everything beyond the reference is off.
        assert!(!config.kmeans_init);
        assert_eq!(config.threshold_ema_dead_code, 0.0);
        assert_eq!(config.quantize_dropout, 0.0);
        assert_eq!(config.codebook_rule, CodebookRule::Laplace);
        assert_eq!(config.dead_code_rule, DeadCodeRule::AfterUpdate);
        assert_eq!(config.codebook_dim, None);
        assert!(!config.cosine_similarity && !config.has_projection());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn every_rule_names_its_parameter_and_value() {
        let cases = [
            (with(|c| c.num_levels = 0), "num_levels", "0"),
            (with(|c| c.embedding_dim = 0), "embedding_dim", "0"),
            (with(|c| c.num_embeddings = 0.into()), "num_embeddings", "0"),
            (
                with(|c| c.num_embeddings = vec![8, 8, 8].into()),
                "num_embeddings",
                "[8, 8, 8]",
            ),
            (
                with(|c| c.num_embeddings = vec![8, 0].into()),
                "num_embeddings",
                "0 (in [8, 0])",
            ),
            (config().with_codebook_dim(Some(0)), "codebook_dim", "0"),
            (config().with_beta(0.0), "beta", "0"),
            (config().with_beta(f64::NAN), "beta", "NaN"),
            (config().with_ema_decay(1.5), "ema_decay", "1.5"),
            (config().with_ema_decay(-0.1), "ema_decay", "-0.1"),
            (config().with_epsilon(0.0), "epsilon", "0"),
            (
                config().with_max_distance_elements(0),
                "max_distance_elements",
                "0",
            ),
            (
                config().with_dead_code_rule(DeadCodeRule::BeforeUpdate {
                    replaced_usage_ratio: 0.0,
                }),
                "dead_code_rule",
                "BeforeUpdate { replaced_usage_ratio: 0 }",
            ),
            (
                config()
                    .with_data_parallel(true)
                    .with_dead_code_rule(DeadCodeRule::BeforeUpdate {
                        replaced_usage_ratio: 1.0,
                    }),
                "dead_code_rule",
                "BeforeUpdate { replaced_usage_ratio: 1 }",
            ),
        ];
        for (config, parameter, value) in cases {
            let error = config.validate().unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(&format!("`{parameter}` = {value}")),
                "{message}"
            );
            assert!(
                matches!(error, RvqError::InvalidConfig { parameter: p, .. } if p == parameter)
            );
        }
    }

    #[test]
    fn sizes_serialize_as_number_or_list() {
        let json = serde_json::to_string(&config()).unwrap();
        assert!(json.contains("\"num_embeddings\":8"), "{json}");
        let per_level = with(|c| c.num_embeddings = [16, 8].into());
        let json = serde_json::to_string(&per_level).unwrap();
        assert!(json.contains("\"num_embeddings\":[16,8]"), "{json}");
        let back: EmaResidualVectorQuantizerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.sizes(), vec![16, 8]);
    }
}
