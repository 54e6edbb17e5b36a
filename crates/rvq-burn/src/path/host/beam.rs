//! The host path's step of a beam search ([`LevelPath::expand`](crate::path::LevelPath)):
//! per tile of whole vectors (one rayon task each), the `-2 e.r` products of every candidate
//! and code in one `gemm` ([`product`]), then, vector by vector, the `B` least costs
//! `(-2 r.e_c + (||e_c||^2 + penalty_c)) + (||r||^2 + base)` over its `B K` pairs (tiles of
//! the search's size, so the products stay in the core's cache), kept
//! sorted in a list of `B` (a strict `<`, so equal costs keep the lower `b K + c`, as the
//! tensor path's repeated argmin does).

use rayon::prelude::*;

use super::search::{HostCodebook, TILE_ELEMENTS, product, squared_norm};
use crate::path::Expansion;

/// The `beam` cheapest continuations of each vector's `beam` candidates in `candidates`
/// `[N B, D]` (row-major) with costs so far `base` `[N B]`, by `codebook` (whose norms hold
/// any penalty).
pub(super) fn expand(
    codebook: &HostCodebook,
    candidates: &[f32],
    base: &[f32],
    beam: usize,
) -> Expansion {
    let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
    let rows = candidates.len() / d;
    assert_eq!(base.len(), rows, "one base cost per candidate");
    assert!(
        rows.is_multiple_of(beam),
        "whole vectors of {beam} candidates"
    );
    let mut parents = vec![0u32; rows];
    let mut codes = vec![0u32; rows];
    if rows == 0 || k == 0 {
        return Expansion { parents, codes };
    }
    let tile_rows = (TILE_ELEMENTS / (k * beam)).max(1) * beam;
    let tiles: Vec<_> = candidates
        .chunks(tile_rows * d)
        .zip(base.chunks(tile_rows))
        .zip(
            parents
                .chunks_mut(tile_rows)
                .zip(codes.chunks_mut(tile_rows)),
        )
        .collect();
    tiles
        .into_par_iter()
        .for_each(|((tile, base), (parents, codes))| {
            expand_tile(codebook, tile, base, beam, parents, codes);
        });
    Expansion { parents, codes }
}

/// [`expand`] of one tile of whole vectors.
fn expand_tile(
    codebook: &HostCodebook,
    tile: &[f32],
    base: &[f32],
    beam: usize,
    parents: &mut [u32],
    codes: &mut [u32],
) {
    let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
    let m = base.len();
    let mut products = vec![0.0f32; k * m];
    product(codebook, tile, &mut products);
    let norms = codebook.norms();
    let mut best_cost = vec![f32::INFINITY; beam];
    let mut best_pair = vec![0usize; beam];
    for vector in 0..m / beam {
        best_cost.fill(f32::INFINITY);
        best_pair.fill(0);
        for b in 0..beam {
            let j = vector * beam + b;
            let start = squared_norm(&tile[j * d..(j + 1) * d]) + base[j];
            for (c, &norm) in norms.iter().enumerate() {
                let cost = (products[c * m + j] + norm) + start;
                if cost < best_cost[beam - 1] {
                    let mut at = beam - 1;
                    while at > 0 && cost < best_cost[at - 1] {
                        best_cost[at] = best_cost[at - 1];
                        best_pair[at] = best_pair[at - 1];
                        at -= 1;
                    }
                    best_cost[at] = cost;
                    best_pair[at] = b * k + c;
                }
            }
        }
        for (rank, &pair) in best_pair.iter().enumerate() {
            parents[vector * beam + rank] = (pair / k) as u32;
            codes[vector * beam + rank] = (pair % k) as u32;
        }
    }
}
