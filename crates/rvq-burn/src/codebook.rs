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
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::RvqError;
use crate::hash::SplitMix64;
use crate::host::{self, HostCodebook, SearchOutputs, host_floats, in_host_memory};

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
        // Apply it now: left pending under this thread, it would be averaged with the first
        // updates of other threads (Burn's multi-device workers) instead of replacing the state.
        let _ = self.ema_count.valid();
        let _ = self.ema_weight.valid();
        Ok(())
    }

    /// Nearest code of every row of `residual` `[N, D]` by squared Euclidean distance.
    ///
    /// `codebook` `[K, D]` and `residual` must be on the same plain (non-autodiff) device.
    /// The distance matrix is formed in row chunks of at most `max_elements` entries.
    pub fn assign(codebook: &Tensor<2>, residual: Tensor<2>, search: Search) -> Assignment {
        let device = residual.device();
        if in_host_memory(&device) {
            let mut rows = host_floats(residual);
            return host_assignment(codebook, &mut rows, false, search, &device);
        }
        let [k, _] = codebook.dims();
        let indices = nearest_indices(codebook, residual, search.max_elements);
        let quantized = codebook.clone().select(0, indices.clone());
        let counts = per_code_counts(&indices, k, search);
        Assignment {
            indices,
            quantized,
            counts,
        }
    }

    /// [`EmaCodebook::assign`] on a CPU device for rows already on the host, `[N, D]`
    /// row-major, which it replaces by their residuals `r - q` (the next level's input).
    /// Returns the assignment and the residuals as a tensor. One pass over tiles of rows
    /// instead of a search, a gather, a subtraction and a scatter-add (see [`crate::host`]);
    /// the same counts, codes and residuals as the tensor operations.
    pub(crate) fn assign_on_host(
        codebook: &Tensor<2>,
        rows: &mut [f32],
        search: Search,
        device: &Device,
    ) -> (Assignment, Tensor<2>) {
        let [_, d] = codebook.dims();
        let assignment = host_assignment(codebook, rows, true, search, device);
        let next = Tensor::from_data(TensorData::new(rows.to_vec(), [rows.len() / d, d]), device);
        (assignment, next)
    }

    /// The nearest codes of rows already on the host (CPU devices), `[N, D]` row-major,
    /// which it replaces by their residuals: one level of `encode` in one pass.
    pub(crate) fn encode_on_host(
        codebook: &Tensor<2>,
        rows: &mut [f32],
        search: Search,
    ) -> Tensor<1, Int> {
        let outputs = SearchOutputs {
            subtract: true,
            quantized: None,
        };
        let host_codebook = HostCodebook::new(codebook);
        let indices = host::search(&host_codebook, rows, outputs, search.max_elements);
        int_tensor(indices, &codebook.device())
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
        search: Search,
    ) -> (Tensor<1>, Tensor<2>) {
        let [k, _] = weight.dims();
        let sums = per_code_sums(&assignment.indices, residual, k, search);
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

    /// The data-parallel init step: the batch's per-code counts and sums *replace* the
    /// state (a Lloyd step from the codebook the assignment was made with). Averaged over
    /// devices, a code becomes exactly the mean of the vectors that chose it on any device; a
    /// code no vector chose gets count 0 and the zero vector (the initial codebook lies within
    /// 1/K of zero), and is split off a busy code at the next init step or restarted.
    pub fn replace_step(
        residual: Tensor<2>,
        assignment: &Assignment,
        search: Search,
    ) -> (Tensor<1>, Tensor<2>) {
        let [k] = assignment.counts.dims();
        let sums = per_code_sums(&assignment.indices, residual, k, search);
        (assignment.counts.clone(), sums)
    }

    /// Splits the busiest codes into the codes whose count is below
    /// `absolute + rate * n / K` (`n` the total count; LBG splitting), deciding everything from `(count, weight)` alone, so that every device
    /// holding the same synchronized state makes the same change.
    ///
    /// The dead codes, in index order, are paired with the live codes in order of decreasing
    /// count (cycling when there are more dead codes than live ones). A live code split into
    /// `m` dead codes shares its count and sum equally among itself and them: its vector
    /// stays, and each dead code becomes that vector plus a fixed offset of 1 % of the
    /// codebook's RMS norm along a direction hashed from `(salt, code)`. The next assignment
    /// divides the busy code's vectors between the copies. Returns the new statistics and
    /// the number of codes restarted. Reads the counts back to the host once.
    pub fn split_codes(
        count: Tensor<1>,
        weight: Tensor<2>,
        epsilon: f64,
        (absolute, rate): (f64, f64),
        salt: u64,
    ) -> (Tensor<1>, Tensor<2>, usize) {
        let [k, d] = weight.dims();
        let device = weight.device();
        let counts: Vec<f32> = count.to_data().iter::<f32>().collect();
        let total: f64 = counts.iter().map(|&c| c as f64).sum();
        let threshold = absolute + rate * total / k as f64;
        let dead: Vec<usize> = (0..k).filter(|&c| (counts[c] as f64) < threshold).collect();
        let mut live: Vec<usize> = (0..k)
            .filter(|&c| (counts[c] as f64) >= threshold)
            .collect();
        if dead.is_empty() || live.is_empty() {
            return (count, weight, 0);
        }
        // Busiest first; ties by index, so the order is a function of the counts alone.
        live.sort_by(|&a, &b| counts[b].total_cmp(&counts[a]).then(a.cmp(&b)));
        let parents: Vec<usize> = (0..dead.len()).map(|i| live[i % live.len()]).collect();
        let mut shares = vec![1usize; k];
        for &parent in &parents {
            shares[parent] += 1;
        }
        let mut new_counts = counts.clone();
        let mut scale = vec![1.0f32; k];
        for &parent in &parents {
            new_counts[parent] = counts[parent] / shares[parent] as f32;
            scale[parent] = 1.0 / shares[parent] as f32;
        }
        let mut dead_mask = vec![0i64; k];
        for (&code, &parent) in dead.iter().zip(&parents) {
            new_counts[code] = new_counts[parent];
            dead_mask[code] = 1;
        }
        // Offsets: random signs / sqrt(D), from a fixed hash of (salt, code).
        let mut offsets = Vec::with_capacity(dead.len() * d);
        for &code in &dead {
            let mut hash =
                SplitMix64::new(salt ^ (code as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for _ in 0..d {
                let sign = if hash.next_u64() >> 63 == 1 {
                    1.0
                } else {
                    -1.0
                };
                offsets.push(sign / (d as f32).sqrt());
            }
        }
        let codebook = codebook_from_statistics(count, weight.clone(), epsilon);
        let rms = codebook
            .clone()
            .powi_scalar(2)
            .sum()
            .div_scalar(k as f64)
            .sqrt()
            .add_scalar(1e-12)
            .mul_scalar(0.01); // [1]
        let dead_len = dead.len();
        let float = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(values, shape), &device)
        };
        let offsets = float(offsets, [dead_len, d]).mul(rms.reshape([1, 1]));
        let child_counts: Vec<f32> = dead.iter().map(|&code| new_counts[code]).collect();
        let parent_rows = codebook.select(
            0,
            int_tensor(parents.iter().map(|&p| p as i64).collect(), &device),
        );
        let child_sums = parent_rows
            .add(offsets)
            .mul(float(child_counts, [dead_len, 1]));
        let dead_codes = int_tensor(dead.iter().map(|&c| c as i64).collect(), &device);
        let replacement = Tensor::<2>::zeros([k, d], &device).select_assign(
            0,
            dead_codes,
            child_sums,
            IndexingUpdateOp::Add,
        );
        let dead_rows = int_tensor(dead_mask, &device)
            .equal_elem(1)
            .reshape([k, 1])
            .expand([k, d]);
        let weight = weight
            .mul(float(scale, [k, 1]))
            .mask_where(dead_rows, replacement);
        let count = Tensor::<1>::from_data(TensorData::new(new_counts, [k]), &device);
        (count, weight, dead_len)
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
        search: Search,
    ) -> (Tensor<1>, Tensor<2>) {
        let [n, d] = data.dims();
        let k = num_embeddings;
        let device = data.device();
        let seed_rows = |round: u64| int_tensor(sample_rows(n, k, round), &device);
        let mut centroids = data.clone().select(0, seed_rows(0));
        let statistics = |centroids: &Tensor<2>| {
            let indices = nearest_indices(centroids, data.clone(), search.max_elements);
            let counts = per_code_counts(&indices, k, search);
            let sums = per_code_sums(&indices, data.clone(), k, search);
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

/// The assignment of `rows` `[N, D]` (host, row-major) on a CPU device; with `subtract`,
/// `rows` become the residuals.
fn host_assignment(
    codebook: &Tensor<2>,
    rows: &mut [f32],
    subtract: bool,
    search: Search,
    device: &Device,
) -> Assignment {
    let [k, d] = codebook.dims();
    let n = rows.len() / d.max(1);
    let mut quantized = vec![0.0f32; rows.len()];
    let outputs = SearchOutputs {
        subtract,
        quantized: Some(&mut quantized),
    };
    let indices = host::search(
        &HostCodebook::new(codebook),
        rows,
        outputs,
        search.max_elements,
    );
    let counts = host::counts(&indices, k);
    Assignment {
        counts: Tensor::from_data(TensorData::new(counts, [k]), device),
        quantized: Tensor::from_data(TensorData::new(quantized, [n, d]), device),
        indices: int_tensor(indices, device),
    }
}

pub(crate) fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
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

/// How a level searches and accumulates a batch: the memory bound of the `[N, K]`
/// intermediates and whether per-code statistics are scatter-adds or dense products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Search {
    /// Largest `rows x codes` intermediate formed at once.
    pub max_elements: usize,
    /// Per-code counts and sums as products of 0/1 assignment matrices instead of
    /// scatter-adds (see [`EmaResidualVectorQuantizerConfig::dense_statistics`]).
    ///
    /// [`EmaResidualVectorQuantizerConfig::dense_statistics`]:
    /// crate::EmaResidualVectorQuantizerConfig::dense_statistics
    pub dense: bool,
}

/// Rows per block of the dense accumulation: long enough for the products to run at speed,
/// short enough that the blocks give the device parallel work (measured on an H200, WGPU:
/// blocks of 512 rows 1.2 ms where one [K, N] x [N, D] product takes 7.6 ms, medium shape).
const DENSE_BLOCK_ROWS: usize = 512;

/// Number of vectors assigned to each code, `[K]`.
fn per_code_counts(indices: &Tensor<1, Int>, k: usize, search: Search) -> Tensor<1> {
    let [n] = indices.dims();
    let device = indices.device();
    if search.dense {
        return dense_accumulate(indices, None, k, search.max_elements).0;
    }
    // Scatter-add of integer ones, [K] <- N: exact.
    Tensor::<1, Int>::zeros([k], &device)
        .select_assign(
            0,
            indices.clone(),
            Tensor::<1, Int>::ones([n], &device),
            IndexingUpdateOp::Add,
        )
        .float()
}

/// Sum of the rows assigned to each code, `[K, D]`.
fn per_code_sums(indices: &Tensor<1, Int>, rows: Tensor<2>, k: usize, search: Search) -> Tensor<2> {
    let [_, d] = rows.dims();
    if search.dense {
        return dense_accumulate(indices, Some(rows), k, search.max_elements)
            .1
            .expect("rows given");
    }
    // Scatter-add: [K, D] <- N rows of [D].
    Tensor::<2>::zeros([k, d], &rows.device()).select_assign(
        0,
        indices.clone(),
        rows,
        IndexingUpdateOp::Add,
    )
}

/// Counts (and sums of `rows`) per code as products of 0/1 assignment matrices: the batch in
/// chunks of at most `max_elements / K` rows (memory bound), each chunk padded to blocks of
/// [`DENSE_BLOCK_ROWS`] rows (padding rows point at no code), one batched product
/// `[B, K, L] x [B, L, D]` per chunk summed over its blocks. No atomics: deterministic, and
/// fast where a device's scatter-add is not.
fn dense_accumulate(
    indices: &Tensor<1, Int>,
    rows: Option<Tensor<2>>,
    k: usize,
    max_elements: usize,
) -> (Tensor<1>, Option<Tensor<2>>) {
    let [n] = indices.dims();
    let device = indices.device();
    let d = rows.as_ref().map_or(0, |r| r.dims()[1]);
    let chunk_rows = (max_elements / k.max(1)).max(1);
    let codes = Tensor::<1, Int>::arange(0..k as i64, &device)
        .float()
        .reshape([1, k, 1]);
    let mut counts = Tensor::<1>::zeros([k], &device);
    let mut sums = rows.as_ref().map(|_| Tensor::<2>::zeros([k, d], &device));
    for start in (0..n).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(n);
        let len = end - start;
        let block = DENSE_BLOCK_ROWS.min(len);
        let blocks = len.div_ceil(block);
        let pad = blocks * block - len;
        #[allow(clippy::single_range_in_vec_init)] // rows start..end
        let mut chunk_indices = indices.clone().slice([start..end]).float();
        if pad > 0 {
            // Index K matches no code.
            chunk_indices = Tensor::cat(
                vec![chunk_indices, Tensor::full([pad], k as f64, &device)],
                0,
            );
        }
        let shape = [blocks, k, block];
        let one_hot = codes
            .clone()
            .expand(shape)
            .equal(chunk_indices.reshape([blocks, 1, block]).expand(shape))
            .float(); // [B, K, L]
        counts = counts.add(one_hot.clone().sum_dim(2).sum_dim(0).reshape([k]));
        if let (Some(rows), Some(total)) = (&rows, sums.as_mut()) {
            #[allow(clippy::single_range_in_vec_init)] // rows start..end
            let mut chunk = rows.clone().slice([start..end]);
            if pad > 0 {
                chunk = Tensor::cat(vec![chunk, Tensor::zeros([pad, d], &device)], 0);
            }
            let products = one_hot.matmul(chunk.reshape([blocks, block, d])); // [B, K, D]
            *total = total.clone().add(products.sum_dim(0).reshape([k, d]));
        }
    }
    (counts, sums)
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
    let device = residual.device();
    if in_host_memory(&device) {
        let mut rows = host_floats(residual);
        let outputs = SearchOutputs {
            subtract: false,
            quantized: None,
        };
        let indices = host::search(
            &HostCodebook::new(codebook),
            &mut rows,
            outputs,
            max_elements,
        );
        return int_tensor(indices, &device);
    }
    tensor_nearest_indices(codebook, residual, max_elements)
}

/// The search with Burn tensor operations (GPU backends): a product and an argmin per chunk.
fn tensor_nearest_indices(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused host search picks the nearest code of the tensor search: the same index,
    /// or, where float rounding orders two codes differently, one at the same distance.
    #[test]
    fn host_search_equals_tensor_search() {
        let device = Device::flex();
        let mut hash = SplitMix64::new(5);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        for (n, d, k, max_elements) in [
            (1, 3, 1, 1),
            (37, 5, 7, 16),
            (500, 16, 64, 1 << 24),
            (500, 16, 64, 640),
            (300, 64, 256, 1000),
            // Tiles whose row count is not a multiple of the 8- and 32-column blocks.
            (45, 3, 300, 1 << 24),
            (70, 4, 9, 90),
            (1000, 8, 5, 1 << 24),
        ] {
            let rows: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
            let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
            let residual = Tensor::<2>::from_data(TensorData::new(rows.clone(), [n, d]), &device);
            let codebook = Tensor::<2>::from_data(TensorData::new(codes.clone(), [k, d]), &device);
            let host: Vec<i64> = nearest_indices(&codebook, residual.clone(), max_elements)
                .into_data()
                .iter::<i64>()
                .collect();
            let tensor: Vec<i64> = tensor_nearest_indices(&codebook, residual, max_elements)
                .into_data()
                .iter::<i64>()
                .collect();
            let distance = |row: usize, code: i64| -> f64 {
                (0..d)
                    .map(|j| {
                        (rows[row * d + j] as f64 - codes[code as usize * d + j] as f64).powi(2)
                    })
                    .sum()
            };
            for (row, (h, t)) in host.iter().zip(&tensor).enumerate() {
                let (dh, dt) = (distance(row, *h), distance(row, *t));
                assert!(
                    h == t || (dh - dt).abs() <= 1e-5 * dt.max(1.0),
                    "shape {n}x{d}, K = {k}: row {row}: host code {h} at {dh}, tensor code {t} at {dt}"
                );
            }

            // The rest of the host assignment is exactly what the tensor operations give
            // for the same indices: the chosen codes, the counts, the residuals.
            let search = Search {
                max_elements,
                dense: false,
            };
            let mut host_rows = rows.clone();
            let (assignment, next) =
                EmaCodebook::assign_on_host(&codebook, &mut host_rows, search, &device);
            let indices = assignment.indices.clone();
            let quantized = codebook.clone().select(0, indices.clone());
            assert_eq!(assignment.quantized.to_data(), quantized.to_data());
            assert_eq!(
                assignment.counts.to_data(),
                per_code_counts(&indices, k, search).to_data()
            );
            let residual = Tensor::<2>::from_data(TensorData::new(rows.clone(), [n, d]), &device);
            let expected_next = residual.sub(quantized).into_data();
            assert_eq!(next.into_data(), expected_next);
            assert_eq!(TensorData::new(host_rows, [n, d]), expected_next);
        }
    }

    /// Of codes at the same distance, every path takes the first, like `argmin`.
    #[test]
    fn equal_codes_resolve_to_the_first() {
        let device = Device::flex();
        let (n, d) = (41, 2);
        // Codes 2 and 5 are the same point, nearest to every row; the others far away.
        let mut codes = vec![9.0f32; 7 * d];
        codes[2 * d..3 * d].copy_from_slice(&[0.25, -0.5]);
        codes[5 * d..6 * d].copy_from_slice(&[0.25, -0.5]);
        let codebook = Tensor::<2>::from_data(TensorData::new(codes, [7, d]), &device);
        let rows: Vec<f32> = (0..n * d).map(|i| (i % 5) as f32 * 0.01).collect();
        let residual = Tensor::<2>::from_data(TensorData::new(rows, [n, d]), &device);
        for indices in [
            nearest_indices(&codebook, residual.clone(), 1 << 24),
            nearest_indices(&codebook, residual.clone(), 7),
            tensor_nearest_indices(&codebook, residual.clone(), 1 << 24),
        ] {
            let indices: Vec<i64> = indices.into_data().iter::<i64>().collect();
            assert_eq!(indices, vec![2; n]);
        }
    }
}
