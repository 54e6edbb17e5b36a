//! One level of the residual stack: an EMA codebook.
//!
//! The state is the two exponential moving averages the reference keeps per level: the EMA of
//! how many vectors each code was assigned (`ema_count_l{l}`) and the EMA of the sum of those
//! vectors (`ema_weight_l{l}`). The codebook (`codebook_l{l}`) is *derived* from them,
//!
//! ```text
//! n     = sum_k c_k
//! c^_k  = (c_k + eps) / (n + K*eps) * n        Laplace smoothing
//! e_k   = m_k / c^_k
//! ```
//!
//! which is exactly what the reference assigns after every update, and equals its initial
//! codebook (counts one, sums equal to the codebook, so `c^ = 1`). With
//! [`CodebookRule::Clamp`] (Mimi's) the divisor is `max(c_k, eps)` instead. The rule is
//! configuration, not state: records and streams do not carry it, so load them into a layer
//! configured with the rule they were made with. Deriving it instead of
//! storing it a second time keeps the three consistent by construction, and is what makes the
//! statistics correct when several devices update them at once: `RunningState` averages the
//! pending per-thread values, and averaging counts and sums scales both by the same factor,
//! which cancels in the ratio, while averaging codebooks would not.

use burn::module::{Module, RunningState};
use burn::tensor::{Bool, Device, Distribution, FloatDType, Tensor};

use crate::config::CodebookRule;
use crate::error::RvqError;
use crate::path::{LevelBatch, LevelPath, Work};
use crate::update::StepPlan;

/// One EMA codebook of `num_embeddings` vectors of dimension `embedding_dim`.
///
/// Its state is non-trainable: no optimizer sees a gradient for it, records save it, and it
/// changes only in training forwards of the quantizer and through
/// [`EmaCodebook::try_set_statistics`].
#[derive(Module, Debug)]
pub struct EmaCodebook {
    /// EMA of per-code assignment counts, shape `[K]` (reference: `ema_count_l{l}`).
    pub ema_count: RunningState<Tensor<1>>,
    /// EMA of per-code sums of assigned vectors, shape `[K, D]` (reference: `ema_weight_l{l}`).
    pub ema_weight: RunningState<Tensor<2>>,
    /// `K`.
    pub num_embeddings: usize,
    /// `D`.
    pub embedding_dim: usize,
    /// Smoothing constant of the counts.
    pub epsilon: f64,
    /// How the codebook is derived from the statistics.
    #[module(skip)]
    pub rule: CodebookRule,
}

impl EmaCodebook {
    /// A codebook drawn uniformly from `[-1/K, 1/K]` (the reference's initializer), with
    /// counts one and sums equal to the codebook.
    pub fn init(
        num_embeddings: usize,
        embedding_dim: usize,
        epsilon: f64,
        rule: CodebookRule,
        device: &Device,
    ) -> Self {
        let device = device.clone().without_autodiff();
        let limit = 1.0 / num_embeddings.max(1) as f64;
        // f32 whatever the device's default float type (see `statistics`).
        let codebook = Tensor::<2>::random(
            [num_embeddings, embedding_dim],
            Distribution::Uniform(-limit, limit),
            &device,
        )
        .cast(FloatDType::F32);
        let count = Tensor::<1>::ones([num_embeddings], &device).cast(FloatDType::F32);
        Self {
            ema_count: RunningState::new(count),
            ema_weight: RunningState::new(codebook),
            num_embeddings,
            embedding_dim,
            epsilon,
            rule,
        }
    }

    /// The current EMA statistics `(counts [K], sums [K, D])` on `device`, without autodiff,
    /// in f32.
    ///
    /// Reads with `value_sync`, so an update made earlier on this thread is seen, and moves the
    /// tensors to `device` (under `fork`/`to_device` the shared state may live elsewhere). The
    /// state is kept in f32 (sums of thousands of vectors lose their low bits in half
    /// precision); a record saved in another float type (Burn's loaders keep the file's) is
    /// read as f32 here, so every path computes in f32.
    pub fn statistics(&self, device: &Device) -> (Tensor<1>, Tensor<2>) {
        let device = device.clone().without_autodiff();
        let count = self
            .ema_count
            .value_sync()
            .without_autodiff()
            .to_device(&device)
            .cast(FloatDType::F32);
        let weight = self
            .ema_weight
            .value_sync()
            .without_autodiff()
            .to_device(&device)
            .cast(FloatDType::F32);
        (count, weight)
    }

    /// The codebook `[K, D]` derived from the statistics, on `device`, without autodiff.
    pub fn codebook(&self, device: &Device) -> Tensor<2> {
        let (count, weight) = self.statistics(device);
        codebook_from_statistics(count, weight, self.rule, self.epsilon)
    }

    /// Replaces the statistics (e.g. to import a trained codebook).
    ///
    /// Counts must be finite and >= 0 with a positive total, sums finite; shapes `[K]` and
    /// `[K, D]`. `level` only names the tensors in errors.
    pub fn try_set_statistics(
        &self,
        level: usize,
        ema_count: Tensor<1>,
        ema_weight: Tensor<2>,
    ) -> Result<(), RvqError> {
        let (k, d) = (self.num_embeddings, self.embedding_dim);
        check_shape(level, "ema_count", &[k], &ema_count.dims())?;
        check_shape(level, "ema_weight", &[k, d], &ema_weight.dims())?;
        let counts: Vec<f32> = ema_count.to_data().iter::<f32>().collect();
        let sums: Vec<f32> = ema_weight.to_data().iter::<f32>().collect();
        if let Err(problem) = check_statistics(&counts, &sums) {
            let (field, reason) = match problem {
                BadStatistics::Count { .. } => ("ema_count", "must hold finite values >= 0"),
                BadStatistics::ZeroTotal => ("ema_count", "must have a positive total"),
                BadStatistics::Sum { .. } => ("ema_weight", "must hold finite values"),
            };
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.{field}"),
                reason: reason.into(),
            });
        }
        // Kept in f32, whatever float type the statistics came in.
        self.store(
            ema_count.without_autodiff().cast(FloatDType::F32),
            ema_weight.without_autodiff().cast(FloatDType::F32),
        );
        // Apply it now: left pending under this thread, it would be averaged with the first
        // updates of other threads (Burn's multi-device workers) instead of replacing the state.
        let _ = self.ema_count.valid();
        let _ = self.ema_weight.valid();
        Ok(())
    }

    /// Makes `(count, weight)` the level's state (applied when next read; see
    /// `RunningState`).
    pub(crate) fn store(&self, count: Tensor<1>, weight: Tensor<2>) {
        self.ema_count.update(count);
        self.ema_weight.update(weight);
    }

    /// This level's step over a batch on `path`: read the state, (k-means init or split codes,)
    /// assign the rows and turn them into the next residual, and, in a training step (`plan`),
    /// update and store the state. `work` is what an evaluation pass needs; a training pass
    /// does all of it.
    pub(crate) fn step<P: LevelPath>(
        &self,
        index: usize,
        path: &P,
        rows: &mut P::Rows,
        plan: Option<&StepPlan>,
        work: Work,
        device: &Device,
    ) -> LevelStep {
        let state = self.statistics(device);
        let Some(plan) = plan else {
            let codebook = codebook_from_statistics(state.0, state.1, self.rule, self.epsilon);
            return LevelStep {
                batch: path.level(codebook, rows, work),
                restarted: 0,
            };
        };
        let (count, weight, split) =
            plan.prepare(path, rows, index, state.clone(), self.rule, self.epsilon);
        let codebook =
            codebook_from_statistics(count.clone(), weight.clone(), self.rule, self.epsilon);
        let input = plan.restarts_from_batch().then(|| path.residual(rows));
        let batch = path.level(codebook, rows, Work::TRAINING);
        let residuals = input.map(|input| (input, path.residual(rows)));
        let (count, weight, restarted) = plan.update((count, weight), &batch, residuals);
        self.store_if_finite((count, weight), state, &plan.non_finite);
        LevelStep {
            batch,
            restarted: split + restarted,
        }
    }

    /// Stores new statistics, or keeps `old` ones when the batch held a NaN or an infinity
    /// (`skip`, decided on the device: no read back), so such a batch never enters the state.
    fn store_if_finite(
        &self,
        (count, weight): (Tensor<1>, Tensor<2>),
        (old_count, old_weight): (Tensor<1>, Tensor<2>),
        skip: &Tensor<1, Bool>,
    ) {
        let [k, d] = weight.dims();
        let count = count.mask_where(skip.clone().expand([k]), old_count);
        let weight = weight.mask_where(skip.clone().reshape([1, 1]).expand([k, d]), old_weight);
        self.store(count, weight);
    }
}

/// What makes EMA statistics unusable: the first offending count or sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BadStatistics {
    /// A count is negative or not finite (index, value).
    Count { at: usize, value: f32 },
    /// The counts sum to zero: no codebook can be derived.
    ZeroTotal,
    /// A sum is not finite (flat index into `[K, D]`, value).
    Sum { at: usize, value: f32 },
}

/// Counts finite and >= 0 with a positive total, sums finite: what every state given to a
/// level must satisfy (`try_set_statistics`, the PyTorch import).
pub(crate) fn check_statistics(counts: &[f32], sums: &[f32]) -> Result<(), BadStatistics> {
    if let Some((at, &value)) = counts
        .iter()
        .enumerate()
        .find(|(_, c)| !c.is_finite() || **c < 0.0)
    {
        return Err(BadStatistics::Count { at, value });
    }
    if counts.iter().map(|&c| f64::from(c)).sum::<f64>() <= 0.0 {
        return Err(BadStatistics::ZeroTotal);
    }
    if let Some((at, &value)) = sums.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(BadStatistics::Sum { at, value });
    }
    Ok(())
}

/// What a level's step gives back.
pub(crate) struct LevelStep {
    /// The level's pass over the batch.
    pub batch: LevelBatch,
    /// Codes restarted (or split off busy codes) by this step.
    pub restarted: usize,
}

/// The codebook by `rule`: `e_k = m_k / c^_k` with the Laplace-smoothed counts
/// `c^_k = (c_k + eps) / (n + K eps) * n`, or `e_k = m_k / max(c_k, eps)` (Mimi's clamp).
///
/// The order of operations is the reference's (and EnCodec's, and Mimi's for the clamp), so
/// the result agrees to the rounding.
pub(crate) fn codebook_from_statistics(
    count: Tensor<1>,
    weight: Tensor<2>,
    rule: CodebookRule,
    epsilon: f64,
) -> Tensor<2> {
    if rule == CodebookRule::Clamp {
        return weight.div(count.clamp_min(epsilon).unsqueeze_dim(1));
    }
    let [k] = count.dims();
    let total = count.clone().sum(); // [1]
    let denominator = total.clone().add_scalar(k as f64 * epsilon); // [1]
    let smoothed = count.add_scalar(epsilon).div(denominator).mul(total); // [K]
    weight.div(smoothed.unsqueeze_dim(1)) // [K, D] / [K, 1]
}

fn check_shape(
    level: usize,
    name: &str,
    expected: &[usize],
    got: &[usize],
) -> Result<(), RvqError> {
    if expected == got {
        Ok(())
    } else {
        Err(RvqError::StateShape {
            field: format!("levels.{level}.{name}"),
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}
