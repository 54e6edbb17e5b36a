//! What a training step does to a level's state, chosen once per forward ([`StepPlan`]) and
//! applied by every level's step (`EmaCodebook::step`): the EMA update (or, in data-parallel
//! mode, its first steps' replacement by the batch statistics), the k-means init, and the
//! restart of dead codes (from batch vectors, or by splitting busy codes in data-parallel
//! mode).

use burn::tensor::{Bool, IndexingUpdateOp, Tensor, TensorData};

use crate::codebook::codebook_from_statistics;
use crate::config::{CodebookRule, DeadCodeRule, EmaResidualVectorQuantizerConfig};
use crate::hash::SplitMix64;
use crate::path::host::int_tensor;
use crate::path::{LevelBatch, LevelPath, Work};

/// Below this count a code counts as empty during the data-parallel init (counts there are
/// numbers of vectors, averaged over devices: 0, or at least 1 / devices).
const EMPTY_CODE_COUNT: f64 = 1e-6;

/// What one training step does to every level's state besides the assignment.
pub(crate) struct StepPlan {
    /// `[1]`, true when the batch holds a NaN or an infinity: then every state change of the
    /// step is discarded on the device (no read back), and the output reports it.
    pub non_finite: Tensor<1, Bool>,
    /// Initialize each level by k-means (this many Lloyd iterations) on its input first.
    pub kmeans_iterations: Option<usize>,
    /// How the batch statistics enter the state.
    pub rule: Rule,
    /// Which codes are restarted, and how.
    pub restart: Option<Restart>,
}

/// How a step's per-code counts and sums enter the state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Rule {
    /// `c <- g c + (1 - g) N_k`, `m <- g m + (1 - g) S_k` (the reference's `_ema_update`).
    Ema { decay: f64 },
    /// The batch's counts and sums replace the state: a Lloyd step from the codebook the
    /// assignment was made with (the data-parallel init). Averaged over devices, a code
    /// becomes exactly the mean of the vectors that chose it on any device; a code no vector
    /// chose gets count 0 and the zero vector, split off a busy code at the next init step
    /// (k-means init) or by the dead-code restarts, if either is on.
    Replace,
}

/// Which codes a step restarts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Restart {
    /// The codes whose EMA count is below `threshold` times the uniform rate take the batch
    /// vectors represented worst: after the update (`before_update: None`), or before it with
    /// count `ratio` times the uniform rate (`Some(ratio)`, Mimi's rule).
    BatchVectors {
        threshold: f64,
        before_update: Option<f64>,
    },
    /// Before the assignment, the codes whose synchronized count is below
    /// `absolute + rate * n / K` are split off the busiest codes (data-parallel mode, where
    /// every device must make the same change); `salt` varies the offsets.
    Split { absolute: f64, rate: f64, salt: u64 },
}

/// The options a [`StepPlan`] is made from (the quantizer's copy of its configuration).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlanConfig {
    pub ema_decay: f64,
    pub kmeans_init: bool,
    pub kmeans_iterations: usize,
    pub threshold_ema_dead_code: f64,
    pub dead_code_check_every: usize,
    pub dead_code_rule: DeadCodeRule,
    pub data_parallel: bool,
}

impl From<&EmaResidualVectorQuantizerConfig> for PlanConfig {
    fn from(config: &EmaResidualVectorQuantizerConfig) -> Self {
        Self {
            ema_decay: config.ema_decay,
            kmeans_init: config.kmeans_init,
            kmeans_iterations: config.kmeans_iterations,
            threshold_ema_dead_code: config.threshold_ema_dead_code,
            dead_code_check_every: config.dead_code_check_every,
            dead_code_rule: config.dead_code_rule,
            data_parallel: config.data_parallel,
        }
    }
}

impl StepPlan {
    /// The plan of a training step: `step` is the number of EMA steps taken so far (`None`
    /// when nothing in `config` is keyed to it, so it was not read), `non_finite` whether the
    /// batch holds a NaN or an infinity.
    pub(crate) fn new(config: &PlanConfig, step: Option<u64>, non_finite: Tensor<1, Bool>) -> Self {
        let restart_due = config.threshold_ema_dead_code > 0.0
            && step.is_none_or(|s| (s + 1) % config.dead_code_check_every as u64 == 0);
        let rate = restart_due.then_some(config.threshold_ema_dead_code);
        let ema = Rule::Ema {
            decay: config.ema_decay,
        };
        if !config.data_parallel {
            return Self {
                non_finite,
                kmeans_iterations: (config.kmeans_init && step == Some(0))
                    .then_some(config.kmeans_iterations),
                rule: ema,
                restart: rate.map(|threshold| Restart::BatchVectors {
                    threshold,
                    before_update: match config.dead_code_rule {
                        DeadCodeRule::AfterUpdate => None,
                        DeadCodeRule::BeforeUpdate {
                            replaced_usage_ratio,
                        } => Some(replaced_usage_ratio),
                    },
                }),
            };
        }
        // Data-parallel: the first step (the first `kmeans_iterations` with k-means init)
        // replaces the state; from the second of them on, the codes left empty are split off
        // busy ones; after them, the dead codes by the restart threshold are.
        let replace_steps = match config.kmeans_init {
            true => config.kmeans_iterations as u64,
            false => 1,
        };
        let replace = step.filter(|&s| s < replace_steps);
        let split_below = match replace {
            Some(0) => None,
            Some(_) => Some((EMPTY_CODE_COUNT, 0.0)),
            None => rate.map(|rate| (0.0, rate)),
        };
        Self {
            non_finite,
            kmeans_iterations: None,
            rule: match replace {
                Some(_) => Rule::Replace,
                None => ema,
            },
            restart: split_below.map(|(absolute, rate)| Restart::Split {
                absolute,
                rate,
                salt: replace.unwrap_or(0),
            }),
        }
    }

    /// Whether a level's step must keep its input rows for [`StepPlan::update`] (restarts
    /// from batch vectors).
    pub(crate) fn restarts_from_batch(&self) -> bool {
        matches!(self.restart, Some(Restart::BatchVectors { .. }))
    }

    /// The statistics level `level` starts its step from: its state `(count, weight)`, its
    /// k-means init on the level's input `rows`, or the state with busy codes split into dead
    /// ones; and how many codes were split.
    pub(crate) fn prepare<P: LevelPath>(
        &self,
        path: &P,
        rows: &P::Rows,
        level: usize,
        (count, weight): (Tensor<1>, Tensor<2>),
        rule: CodebookRule,
        epsilon: f64,
    ) -> (Tensor<1>, Tensor<2>, usize) {
        let [k, _] = weight.dims();
        if let Some(iterations) = self.kmeans_iterations {
            // Level by level: this level's input comes from the initialized levels before it.
            let (count, weight) = kmeans(path, path.residual(rows), k, iterations);
            return (count, weight, 0);
        }
        match self.restart {
            Some(Restart::Split {
                absolute,
                rate,
                salt,
            }) => {
                let salt = SplitMix64::new(salt ^ ((level as u64) << 48)).next_u64();
                split_codes(count, weight, (rule, epsilon), (absolute, rate), salt)
            }
            _ => (count, weight, 0),
        }
    }

    /// The statistics after the step: the batch's entered by the rule into `(count, weight)`
    /// (what the assignment was made with), then, if the plan says so, dead codes restarted
    /// from the level's input and the residual it left (`residuals`). Returns how many codes
    /// were restarted.
    pub(crate) fn update(
        &self,
        (count, weight): (Tensor<1>, Tensor<2>),
        batch: &LevelBatch,
        residuals: Option<(Tensor<2>, Tensor<2>)>,
    ) -> (Tensor<1>, Tensor<2>, usize) {
        let counts = batch.counts.clone().expect("a training pass counts");
        let sums = batch.sums.clone().expect("a training pass sums");
        // Mimi's rule: restart on the state the batch was assigned with, then the EMA.
        let (count, weight, restarted_before) = match (self.restart, &residuals) {
            (
                Some(Restart::BatchVectors {
                    threshold,
                    before_update: Some(ratio),
                }),
                Some((residual, next_residual)),
            ) => restart_dead_codes(
                count,
                weight,
                (residual.clone(), next_residual.clone()),
                threshold,
                Some(ratio),
            ),
            _ => (count, weight, 0),
        };
        let (count, weight) = match self.rule {
            Rule::Ema { decay } => (
                count.mul_scalar(decay).add(counts.mul_scalar(1.0 - decay)),
                weight.mul_scalar(decay).add(sums.mul_scalar(1.0 - decay)),
            ),
            Rule::Replace => (counts, sums),
        };
        match (self.restart, residuals) {
            (
                Some(Restart::BatchVectors {
                    threshold,
                    before_update: None,
                }),
                Some(residuals),
            ) => restart_dead_codes(count, weight, residuals, threshold, None),
            _ => (count, weight, restarted_before),
        }
    }
}

/// Replaces the codes whose EMA count is below `threshold * n / K` by the rows of `residual`
/// (a level's input) the codebook represented worst (the largest rows of `next_residual`),
/// with a consistent state: count `n / K` (the uniform rate, above any threshold < 1), or
/// `ratio * n / K` with `replaced: Some(ratio)` (Mimi's rule, computed in Mimi's order of
/// operations so the same codes fall below the threshold), and sum `vector * count`, so the
/// code *is* that vector. Returns the new statistics and how many codes were restarted.
///
/// Reads the dead-code mask back to the host, and, when there are dead codes, the rows
/// that replace them. Deterministic: the same state and
/// batch give the same restarts.
fn restart_dead_codes(
    count: Tensor<1>,
    weight: Tensor<2>,
    (residual, next_residual): (Tensor<2>, Tensor<2>),
    threshold: f64,
    replaced: Option<f64>,
) -> (Tensor<1>, Tensor<2>, usize) {
    let [k, d] = weight.dims();
    let [n, _] = residual.dims();
    let device = weight.device();
    let total = count.clone().sum(); // [1]
    let (limit, uniform) = match replaced {
        None => {
            let uniform = total.div_scalar(k as f64); // n / K
            (uniform.clone().mul_scalar(threshold), uniform)
        }
        // moshi: `ratio * cluster_usage.sum() / codebook_size`.
        Some(ratio) => (
            total.clone().mul_scalar(threshold).div_scalar(k as f64),
            total.mul_scalar(ratio).div_scalar(k as f64),
        ),
    };
    let dead_mask = count.clone().lower(limit.expand([k]));
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
    // Sorted on the host (N values read back on a step that restarts): Burn's top-k on WGPU
    // compiles kernels per k, which on a software Vulkan driver costs seconds a restart.
    let errors: Vec<f32> = next_residual
        .powi_scalar(2)
        .sum_dim(1)
        .into_data()
        .iter::<f32>()
        .collect(); // [N]
    let take = dead.len().min(n);
    let mut order: Vec<usize> = (0..n).collect();
    // Largest error first, ties by row; a non-finite batch is discarded by the caller, NaN
    // sorts last meanwhile.
    let key = |row: usize| match errors[row] {
        e if e.is_nan() => -1.0,
        e => e,
    };
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let worst: Vec<i64> = order[..take].iter().map(|&row| row as i64).collect();
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
fn split_codes(
    count: Tensor<1>,
    weight: Tensor<2>,
    (rule, epsilon): (CodebookRule, f64),
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
        let mut hash = SplitMix64::new(salt ^ (code as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for _ in 0..d {
            let sign = if hash.next_u64() >> 63 == 1 {
                1.0
            } else {
                -1.0
            };
            offsets.push(sign / (d as f32).sqrt());
        }
    }
    let codebook = codebook_from_statistics(count, weight.clone(), rule, epsilon);
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
fn kmeans<P: LevelPath>(
    path: &P,
    data: Tensor<2>,
    num_embeddings: usize,
    iterations: usize,
) -> (Tensor<1>, Tensor<2>) {
    let [n, d] = data.dims();
    let k = num_embeddings;
    let device = data.device();
    let seed_rows = |round: u64| int_tensor(sample_rows(n, k, round), &device);
    let mut centroids = data.clone().select(0, seed_rows(0));
    // One assignment of the data to `centroids`: the counts and sums per centroid.
    let statistics = |centroids: &Tensor<2>| {
        let mut rows = path.start(data.clone(), Work::STATISTICS);
        let batch = path.level(centroids.clone(), &mut rows, Work::STATISTICS);
        (
            batch.counts.expect("counts asked for"),
            batch.sums.expect("sums asked for"),
        )
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
