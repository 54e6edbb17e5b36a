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
//! codebook (counts one, sums equal to the codebook, so `c^ = 1`). Deriving it instead of
//! storing it a second time keeps the three consistent by construction, and is what makes the
//! statistics correct when several devices update them at once: `RunningState` averages the
//! pending per-thread values, and averaging counts and sums scales both by the same factor,
//! which cancels in the ratio, while averaging codebooks would not.

use burn::module::{Module, RunningState};
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor};

use crate::error::RvqError;
use crate::hash::SplitMix64;

/// One EMA codebook of `num_embeddings` vectors of dimension `embedding_dim`.
///
/// Its state is non-trainable: no optimizer sees a gradient for it, records save it, and it
/// changes only through [`EmaCodebook::ema_update`].
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
    /// Laplace smoothing constant.
    pub epsilon: f64,
}

/// The batch statistics of one level: which code each vector took, and per code how many
/// vectors and their sum.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Nearest code per vector, shape `[N]`.
    pub indices: Tensor<1, Int>,
    /// The chosen code vectors, shape `[N, D]` (no autodiff).
    pub quantized: Tensor<2>,
    /// Number of vectors per code in this batch, shape `[K]`.
    pub counts: Tensor<1>,
}

impl EmaCodebook {
    /// A codebook drawn uniformly from `[-1/K, 1/K]` (the reference's initializer), with
    /// counts one and sums equal to the codebook.
    pub fn init(
        num_embeddings: usize,
        embedding_dim: usize,
        epsilon: f64,
        device: &Device,
    ) -> Self {
        let device = device.clone().without_autodiff();
        let limit = 1.0 / num_embeddings.max(1) as f64;
        let codebook = Tensor::<2>::random(
            [num_embeddings, embedding_dim],
            Distribution::Uniform(-limit, limit),
            &device,
        );
        Self {
            ema_count: RunningState::new(Tensor::ones([num_embeddings], &device)),
            ema_weight: RunningState::new(codebook),
            num_embeddings,
            embedding_dim,
            epsilon,
        }
    }

    /// The current EMA statistics `(counts [K], sums [K, D])` on `device`, without autodiff.
    ///
    /// Reads with `value_sync`, so an update made earlier on this thread is seen, and moves the
    /// tensors to `device` (under `fork`/`to_device` the shared state may live elsewhere).
    pub fn statistics(&self, device: &Device) -> (Tensor<1>, Tensor<2>) {
        let device = device.clone().without_autodiff();
        let count = self
            .ema_count
            .value_sync()
            .without_autodiff()
            .to_device(&device);
        let weight = self
            .ema_weight
            .value_sync()
            .without_autodiff()
            .to_device(&device);
        (count, weight)
    }

    /// The codebook `[K, D]` derived from the statistics, on `device`, without autodiff.
    pub fn codebook(&self, device: &Device) -> Tensor<2> {
        let (count, weight) = self.statistics(device);
        codebook_from_statistics(count, weight, self.epsilon)
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
        if counts.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.ema_count"),
                reason: "must hold finite values >= 0".into(),
            });
        }
        if counts.iter().map(|&c| c as f64).sum::<f64>() <= 0.0 {
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.ema_count"),
                reason: "must have a positive total".into(),
            });
        }
        if ema_weight.to_data().iter::<f32>().any(|w| !w.is_finite()) {
            return Err(RvqError::InvalidState {
                field: format!("levels.{level}.ema_weight"),
                reason: "must hold finite values".into(),
            });
        }
        self.store(ema_count.without_autodiff(), ema_weight.without_autodiff());
        Ok(())
    }

    /// Nearest code of every row of `residual` `[N, D]` by squared Euclidean distance.
    ///
    /// `codebook` `[K, D]` and `residual` must be on the same plain (non-autodiff) device.
    /// The distance matrix is formed in row chunks of at most `max_elements` entries.
    pub fn assign(codebook: &Tensor<2>, residual: Tensor<2>, max_elements: usize) -> Assignment {
        let [n, _] = residual.dims();
        let [k, _] = codebook.dims();
        let indices = nearest_indices(codebook, residual, max_elements);
        let quantized = codebook.clone().select(0, indices.clone());
        let device = codebook.device();
        // Per-code counts by scatter-add of integer ones, [K] <- N: exact, and GPUs add
        // integers atomically in hardware where float adds are emulated by compare-and-swap
        // loops (WGPU: 3.3 ms for float against the search's 0.9 ms, medium shape on an H200).
        let counts = Tensor::<1, Int>::zeros([k], &device)
            .select_assign(
                0,
                indices.clone(),
                Tensor::<1, Int>::ones([n], &device),
                IndexingUpdateOp::Add,
            )
            .float();
        Assignment {
            indices,
            quantized,
            counts,
        }
    }

    /// One EMA step with this batch's assignment (the reference's `_ema_update`):
    /// `c <- g c + (1 - g) N_k`, `m <- g m + (1 - g) S_k`. Returns the new statistics; store
    /// them with [`EmaCodebook::store`].
    ///
    /// `residual` `[N, D]` is the level's input, `assignment` what [`EmaCodebook::assign`]
    /// made of it, `count`/`weight` the statistics the assignment was made with.
    pub fn ema_step(
        count: Tensor<1>,
        weight: Tensor<2>,
        residual: Tensor<2>,
        assignment: &Assignment,
        decay: f64,
    ) -> (Tensor<1>, Tensor<2>) {
        let [k, d] = weight.dims();
        // Per-code sums of assigned vectors by scatter-add: [K, D] <- N rows of [D].
        let sums = Tensor::<2>::zeros([k, d], &weight.device()).select_assign(
            0,
            assignment.indices.clone(),
            residual,
            IndexingUpdateOp::Add,
        );
        let keep = decay;
        let take = 1.0 - decay;
        let count = count
            .mul_scalar(keep)
            .add(assignment.counts.clone().mul_scalar(take));
        let weight = weight.mul_scalar(keep).add(sums.mul_scalar(take));
        (count, weight)
    }

    /// Makes `(count, weight)` the level's state (applied when next read; see
    /// `RunningState`).
    pub fn store(&self, count: Tensor<1>, weight: Tensor<2>) {
        self.ema_count.update(count);
        self.ema_weight.update(weight);
    }

    /// Replaces the codes whose EMA count is below `threshold * n / K` by the batch vectors
    /// the current codebook represents worst, with a consistent state: count `n / K` (the
    /// uniform rate, above any threshold < 1) and sum `vector * n / K`, so the code *is* that
    /// vector and keeps it through the next EMA update. Returns the new statistics and how
    /// many codes were restarted.
    ///
    /// Reads the dead-code mask back to the host once. Deterministic: the same state and
    /// batch give the same restarts.
    pub fn restart_dead_codes(
        count: Tensor<1>,
        weight: Tensor<2>,
        residual: Tensor<2>,
        assignment: &Assignment,
        threshold: f64,
    ) -> (Tensor<1>, Tensor<2>, usize) {
        let [k, d] = weight.dims();
        let [n, _] = residual.dims();
        let device = weight.device();
        let uniform = count.clone().sum().div_scalar(k as f64); // [1]: n / K
        let dead_mask = count
            .clone()
            .lower(uniform.clone().mul_scalar(threshold).expand([k]));
        let dead: Vec<i64> = dead_mask
            .clone()
            .int()
            .into_data()
            .iter::<i64>()
            .enumerate()
            .filter(|(_, dead)| *dead != 0)
            .map(|(code, _)| code as i64)
            .collect();
        if dead.is_empty() || n == 0 {
            return (count, weight, 0);
        }
        // The rows with the largest quantization error, as many as there are dead codes
        // (cycled when the batch is smaller).
        let errors = residual
            .clone()
            .sub(assignment.quantized.clone())
            .powi_scalar(2)
            .sum_dim(1)
            .reshape([n]); // [N]
        // A non-finite batch is discarded by the caller; keep the sort well defined meanwhile.
        let errors = errors.clone().mask_fill(errors.is_nan(), -1.0);
        let take = dead.len().min(n);
        let (_, worst) = errors.topk_with_indices(take, 0); // [take]
        let worst: Vec<i64> = worst.into_data().iter::<i64>().collect();
        let rows: Vec<i64> = (0..dead.len()).map(|i| worst[i % take]).collect();
        let rows = int_tensor(rows, &device);
        let dead_codes = int_tensor(dead.clone(), &device);
        let vectors = residual.select(0, rows); // [dead, D]
        let new_sums = vectors.mul(uniform.clone().reshape([1, 1])); // [dead, D]
        let replacement = Tensor::<2>::zeros([k, d], &device).select_assign(
            0,
            dead_codes,
            new_sums,
            IndexingUpdateOp::Add,
        );
        let count = count.mask_where(dead_mask.clone(), uniform.expand([k]));
        let weight = weight.mask_where(dead_mask.reshape([k, 1]).expand([k, d]), replacement);
        (count, weight, dead.len())
    }

    /// k-means (Lloyd, `iterations` steps) of the rows of `data` `[N, D]` into `K` clusters,
    /// returned as a consistent EMA state `(counts = cluster sizes, sums = centroid x size)`.
    ///
    /// Centroids start on distinct rows chosen by a fixed hash (deterministic); a cluster
    /// that empties is re-seeded on another row. A cluster still empty at the end (possible
    /// when `N < K`) gets a data row with count 1, so no code is left at zero.
    pub fn kmeans(
        data: Tensor<2>,
        num_embeddings: usize,
        iterations: usize,
        max_elements: usize,
    ) -> (Tensor<1>, Tensor<2>) {
        let [n, d] = data.dims();
        let k = num_embeddings;
        let device = data.device();
        let seed_rows = |round: u64| int_tensor(sample_rows(n, k, round), &device);
        let mut centroids = data.clone().select(0, seed_rows(0));
        let statistics = |centroids: &Tensor<2>| {
            let indices = nearest_indices(centroids, data.clone(), max_elements);
            let counts = Tensor::<1>::zeros([k], &device).select_assign(
                0,
                indices.clone(),
                Tensor::ones([n], &device),
                IndexingUpdateOp::Add,
            );
            let sums = Tensor::<2>::zeros([k, d], &device).select_assign(
                0,
                indices,
                data.clone(),
                IndexingUpdateOp::Add,
            );
            (counts, sums)
        };
        for round in 1..=iterations as u64 {
            let (counts, sums) = statistics(&centroids);
            let empty = counts
                .clone()
                .lower_elem(0.5)
                .reshape([k, 1])
                .expand([k, d]);
            let means = sums.div(counts.clamp_min(1.0).reshape([k, 1]));
            let reseeded = data.clone().select(0, seed_rows(round));
            centroids = means.mask_where(empty, reseeded);
        }
        let (counts, sums) = statistics(&centroids);
        let empty = counts.clone().lower_elem(0.5);
        let counts = counts.mask_fill(empty.clone(), 1.0);
        let sums = sums.mask_where(empty.reshape([k, 1]).expand([k, d]), centroids);
        (counts, sums)
    }
}

/// `count` row indices in `0..n` from a fixed hash of `(round, i)`: distinct while
/// `count <= n`.
fn sample_rows(n: usize, count: usize, round: u64) -> Vec<i64> {
    let mut hash =
        SplitMix64::new(round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    let mut next = move || hash.next_u64();
    // A partial Fisher-Yates shuffle of 0..n gives distinct rows; past n, rows repeat.
    let mut rows: Vec<usize> = (0..n).collect();
    (0..count)
        .map(|i| {
            let slot = i % n;
            if i < n {
                let j = slot + (next() % (n - slot) as u64) as usize;
                rows.swap(slot, j);
            }
            rows[slot] as i64
        })
        .collect()
}

fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(burn::tensor::TensorData::new(values, [len]), device)
}

/// `e_k = m_k / c^_k` with the Laplace-smoothed counts `c^_k = (c_k + eps) / (n + K eps) * n`.
///
/// The order of operations is the reference's, so the result agrees to the rounding.
pub fn codebook_from_statistics(count: Tensor<1>, weight: Tensor<2>, epsilon: f64) -> Tensor<2> {
    let [k] = count.dims();
    let total = count.clone().sum(); // [1]
    let denominator = total.clone().add_scalar(k as f64 * epsilon); // [1]
    let smoothed = count.add_scalar(epsilon).div(denominator).mul(total); // [K]
    weight.div(smoothed.unsqueeze_dim(1)) // [K, D] / [K, 1]
}

/// Index of the nearest code for every row: `argmin_k ||r - e_k||^2`.
///
/// `||r||^2` is the same for every code of a row and is left out of the comparison; this keeps
/// the argmin and avoids the cancellation that adding it brings for inputs far from the origin.
fn nearest_indices(
    codebook: &Tensor<2>,
    residual: Tensor<2>,
    max_elements: usize,
) -> Tensor<1, Int> {
    let [n, _] = residual.dims();
    let [k, _] = codebook.dims();
    // -2 e^T, [D, K]: scaling by a power of two is exact, so folding it into the (small)
    // codebook gives the same distances as scaling the [N, K] product, one pass cheaper.
    let codebook_t = codebook.clone().transpose().mul_scalar(-2.0);
    let norms = codebook.clone().powi_scalar(2).sum_dim(1).reshape([1, k]); // [1, K]
    let search = |rows: Tensor<2>| -> Tensor<1, Int> {
        let [m, _] = rows.dims();
        // ||e||^2 - 2 r.e : [m, D] x [D, K] -> [m, K]
        let distances = rows.matmul(codebook_t.clone()).add(norms.clone());
        distances.argmin(1).reshape([m])
    };
    let rows_per_chunk = (max_elements / k.max(1)).max(1);
    if n <= rows_per_chunk {
        return search(residual);
    }
    let chunks: Vec<Tensor<1, Int>> = (0..n)
        .step_by(rows_per_chunk)
        .map(|start| {
            let end = (start + rows_per_chunk).min(n);
            #[allow(clippy::single_range_in_vec_init)] // rows start..end of [N, D]
            search(residual.clone().slice([start..end]))
        })
        .collect();
    Tensor::cat(chunks, 0)
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
