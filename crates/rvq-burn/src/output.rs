//! What a forward pass returns.

use burn::tensor::{Bool, DType, FloatDType, IndexingUpdateOp, Int, Tensor};

use crate::metrics::{LevelMetrics, RvqMetrics};

/// The result of [`EmaResidualVectorQuantizer::forward`](crate::EmaResidualVectorQuantizer::forward).
#[derive(Debug, Clone)]
pub struct RvqOutput<const R: usize> {
    /// `x + sg(q_sum - x)`: numerically the sum of the chosen code vectors, with the gradient
    /// of the identity with respect to `x`. Same shape as the input.
    pub quantized: Tensor<R>,
    /// Per level that ran, the index of the chosen code for every input vector, shape `[N]`
    /// with `N` the product of all input dimensions but the last (row-major order); `-1` at
    /// the positions a [`Mask`](crate::options::Mask) marks as padding.
    pub indices: Vec<Tensor<1, Int>>,
    /// Total commitment loss `sum_l beta * mean((sg(q_l) - r_l)^2)`, shape `[1]`. On an
    /// autodiff device it carries the gradient of every level's term to the input.
    pub loss: Tensor<1>,
    /// Each level's commitment loss, shape `[1]` each, without autodiff (for logging).
    pub level_losses: Vec<Tensor<1>>,
    /// Per level, how many input vectors took each code, shape `[K_l]` each: the batch
    /// histogram the metrics are computed from.
    pub code_counts: Vec<Tensor<1>>,
    /// Per level that ran, how many dead codes this step restarted (0 unless
    /// `threshold_ema_dead_code` is set and this was a checked training step). When
    /// `update_skipped` reports a non-finite batch, the state kept none of them.
    pub restarted_codes: Vec<usize>,
    /// In a training step that would update the EMA statistics: `[1]`, true when the input
    /// held a NaN or an infinity and the update was skipped (the state is unchanged).
    /// `None` when no update was attempted (evaluation, frozen, `update_ema = false`).
    pub update_skipped: Option<Tensor<1, Bool>>,
}

impl RvqOutput<2> {
    /// The output of the real rows `real` `[N_real]` of a batch of `n` rows, put back in
    /// place: zero output (without gradient) and code `-1` at the other rows.
    pub(crate) fn scatter_rows(self, real: &Tensor<1, Int>, n: usize) -> Self {
        let [_, d] = self.quantized.dims();
        let zeros = Tensor::<2>::zeros([n, d], &self.quantized.device());
        let quantized = zeros.select_assign(0, real.clone(), self.quantized, IndexingUpdateOp::Add);
        let indices = self
            .indices
            .into_iter()
            .map(|codes| {
                Tensor::<1, Int>::full([n], -1, &codes.device()).select_assign(
                    0,
                    real.clone(),
                    codes,
                    IndexingUpdateOp::Assign,
                )
            })
            .collect();
        Self {
            quantized,
            indices,
            ..self
        }
    }

    /// The output for an input of `shape` and `dtype`: the quantized rows reshaped, in that
    /// dtype (the losses stay f32).
    pub(crate) fn into_shape<const R: usize>(
        self,
        shape: [usize; R],
        dtype: DType,
    ) -> RvqOutput<R> {
        // A float tensor's dtype is a float dtype.
        let quantized = self.quantized.reshape(shape).cast(FloatDType::from(dtype));
        RvqOutput {
            quantized,
            indices: self.indices,
            loss: self.loss,
            level_losses: self.level_losses,
            code_counts: self.code_counts,
            restarted_codes: self.restarted_codes,
            update_skipped: self.update_skipped,
        }
    }
}

impl<const R: usize> RvqOutput<R> {
    /// Per-level and aggregate codebook metrics of this batch (reference names through
    /// [`RvqMetrics::named`]).
    ///
    /// Reads the code histograms back to the host once (one synchronization on a GPU).
    pub fn metrics(&self) -> RvqMetrics {
        if self.code_counts.is_empty() {
            return RvqMetrics {
                levels: Vec::new(),
                update_skipped: false,
            };
        }
        let sizes: Vec<usize> = self.code_counts.iter().map(|c| c.dims()[0]).collect();
        let mut parts = self.code_counts.clone();
        if let Some(skipped) = &self.update_skipped {
            parts.push(skipped.clone().float());
        }
        // One read back: the histograms, then the skip flag.
        let all: Vec<f32> = Tensor::cat(parts, 0).into_data().iter::<f32>().collect();
        let mut offset = 0;
        let levels = sizes
            .iter()
            .map(|&size| {
                let level = LevelMetrics::from_counts(&all[offset..offset + size]);
                offset += size;
                level
            })
            .collect();
        let update_skipped = self.update_skipped.is_some() && all[offset] != 0.0;
        RvqMetrics {
            levels,
            update_skipped,
        }
    }
}
