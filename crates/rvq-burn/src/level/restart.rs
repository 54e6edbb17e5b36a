//! Restarts of dead codes: from the vectors of the batch the codebook represented worst, or,
//! in data-parallel mode, by splitting the busiest codes of the synchronized state.

use burn::tensor::{IndexingUpdateOp, Tensor, TensorData};

use super::Statistics;
use crate::config::EmaResidualVectorQuantizerConfig;
use crate::util::{SplitMix64, int_tensor};

/// A level's input rows and the residual its pass left, `[N, D]` each: what restarts from
/// batch vectors choose from.
pub(crate) struct Residuals {
    /// The level's input.
    pub input: Tensor<2>,
    /// The residual the level's assignment left.
    pub next: Tensor<2>,
}

/// Statistics after a change that may restart codes, and how many it restarted.
pub(crate) struct Restarted {
    /// The new statistics.
    pub statistics: Statistics,
    /// Codes restarted (or split off busy codes).
    pub restarted: usize,
}

impl Restarted {
    fn none(counts: Tensor<1>, sums: Tensor<2>) -> Self {
        Self {
            statistics: Statistics { counts, sums },
            restarted: 0,
        }
    }
}

/// Replaces the codes whose EMA count is below `threshold * n / K` by the rows of the level's
/// input the codebook represented worst (the largest rows of the residual it left),
/// with a consistent state: count `n / K` (the uniform rate, above any threshold < 1), or
/// `ratio * n / K` with `replaced: Some(ratio)` (Mimi's rule, computed in Mimi's order of
/// operations so the same codes fall below the threshold), and sum `vector * count`, so the
/// code *is* that vector. Returns the new statistics and how many codes were restarted.
///
/// Reads the dead-code mask back to the host, and, when there are dead codes, the rows
/// that replace them. Deterministic: the same state and
/// batch give the same restarts.
pub(crate) fn restart_dead_codes(
    statistics: Statistics,
    residuals: &Residuals,
    threshold: f64,
    replaced: Option<f64>,
) -> Restarted {
    let Statistics {
        counts: count,
        sums: weight,
    } = statistics;
    let (residual, next_residual) = (residuals.input.clone(), residuals.next.clone());
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
        return Restarted::none(count, weight);
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
    Restarted {
        statistics: Statistics {
            counts: count,
            sums: weight,
        },
        restarted: dead.len(),
    }
}

/// Splits the busiest codes into the codes whose count is below `absolute + rate * n / K`
/// (`n` the total count; LBG splitting), deciding everything from the statistics alone, so
/// that every device holding the same synchronized state makes the same change.
///
/// The dead codes, in index order, are paired with the live codes in order of decreasing
/// count (cycling when there are more dead codes than live ones). A live code split into
/// `m` dead codes shares its count and sum equally among itself and them: its vector
/// stays, and each dead code becomes that vector plus a fixed offset of 1 % of the
/// codebook's RMS norm along a direction hashed from `(salt, code)`. The next assignment
/// divides the busy code's vectors between the copies. Returns the new statistics and
/// the number of codes restarted. Reads the counts back to the host once.
pub(crate) fn split_codes(
    statistics: Statistics,
    config: &EmaResidualVectorQuantizerConfig,
    (absolute, rate): (f64, f64),
    salt: u64,
) -> Restarted {
    let [k, d] = statistics.sums.dims();
    let device = statistics.sums.device();
    let counts: Vec<f32> = statistics.counts.to_data().iter::<f32>().collect();
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    let threshold = absolute + rate * total / k as f64;
    let dead: Vec<usize> = (0..k).filter(|&c| (counts[c] as f64) < threshold).collect();
    let mut live: Vec<usize> = (0..k)
        .filter(|&c| (counts[c] as f64) >= threshold)
        .collect();
    if dead.is_empty() || live.is_empty() {
        return Restarted {
            statistics,
            restarted: 0,
        };
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
    let codebook = statistics.codebook(config);
    let weight = statistics.sums;
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
    Restarted {
        statistics: Statistics {
            counts: count,
            sums: weight,
        },
        restarted: dead_len,
    }
}
