//! The k-means init of a level's codebook, on the level's input rows of the first training
//! batch, with every assignment run on the call's execution path.

use burn::tensor::Tensor;

use super::Statistics;
use crate::path::{LevelPath, Pricing, Rows, Work};
use crate::util::{SplitMix64, int_tensor, unit_rows};

/// k-means (Lloyd, `iterations` steps) of the rows of `data` `[N, D]` into `K` clusters,
/// returned as a consistent EMA state (counts = cluster sizes, sums = centroid x size).
/// With `cosine` (rows of unit length), spherical k-means: rows assigned by dot product and
/// centroids L2-normalized, as vector-quantize-pytorch's `kmeans(use_cosine_sim=True)`.
///
/// Centroids start on distinct rows chosen by a fixed hash (deterministic); a cluster
/// that empties is re-seeded on another row. A cluster still empty at the end (possible
/// when `N < K`) gets a data row with count 1, so no code is left at zero.
pub(crate) fn kmeans<P: LevelPath>(
    path: &P,
    data: Tensor<2>,
    num_embeddings: usize,
    iterations: usize,
    cosine: bool,
) -> Statistics {
    let [n, d] = data.dims();
    let k = num_embeddings;
    let device = data.device();
    let seed_rows = |round: u64| int_tensor(sample_rows(n, k, round), &device);
    let mut centroids = data.clone().select(0, seed_rows(0));
    // One assignment of the data to `centroids`: the counts and sums per centroid.
    let statistics = |centroids: &Tensor<2>| {
        let mut rows = P::Rows::start(data.clone(), Work::STATISTICS);
        let pricing = match cosine {
            true => Pricing::DOT_PRODUCT,
            false => Pricing::default(),
        };
        let pass = path.level_priced(centroids.clone(), pricing, &mut rows, Work::STATISTICS);
        (
            pass.counts.expect("counts asked for"),
            pass.sums.expect("sums asked for"),
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
        let means = match cosine {
            true => unit_rows(means),
            false => means,
        };
        let reseeded = data.clone().select(0, seed_rows(round));
        centroids = means.mask_where(empty, reseeded);
    }
    let (counts, sums) = statistics(&centroids);
    let empty = counts.clone().lower_elem(0.5);
    let counts = counts.mask_fill(empty.clone(), 1.0);
    let sums = sums.mask_where(empty.reshape([k, 1]).expand([k, d]), centroids);
    Statistics { counts, sums }
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
