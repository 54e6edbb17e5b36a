//! The host path's search: the nearest code of every row, and the rest of a level's pass on
//! the same tile of rows while it is in cache.
//!
//! Per tile of rows `R` (one rayon task each), one single-threaded `gemm` product `-2 E R^T`
//! `[K, rows]` into the worker's own buffer, which stays in that core's cache for what
//! follows: the code norms added and the first minimum per row taken, code by code over the
//! tile's rows (a compare-and-select in AVX2 registers), then each row's code gathered, the
//! next residual written, the running sums and the squared error accumulated. The tensor
//! version writes the `[N, K]` product to memory, a second `[N, K]` tensor with the norms
//! added, and reads both back for the argmin: three times the memory traffic of the product.
//! [`nearest_by_column`] is the plain version the AVX2 one is tested equal to.

use std::cell::RefCell;

use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::path::Pricing;
use crate::util::host_floats;

/// Products per tile: 256 KiB of f32, half of a typical core's L2, so the product stays in
/// cache between the product and the argmin (the tile size was chosen by the `encode`
/// benchmark: README, Benchmarks).
pub(super) const TILE_ELEMENTS: usize = 1 << 16;

/// Fewest rows per tile: below this the product's packing of the codebook dominates.
const MIN_TILE_ROWS: usize = 16;

/// A codebook `[K, D]` on the host with its squared norms.
pub(crate) struct HostCodebook {
    codes: Vec<f32>,
    norms: Vec<f32>,
    pub(crate) num_embeddings: usize,
    pub(crate) embedding_dim: usize,
}

impl HostCodebook {
    /// Reads `codebook` `[K, D]` back (a copy on CPU backends).
    pub(crate) fn new(codebook: &Tensor<2>) -> Self {
        let [num_embeddings, embedding_dim] = codebook.dims();
        let codes = host_floats(codebook.clone());
        let norms = codes
            .chunks_exact(embedding_dim.max(1))
            .map(|code| code.iter().map(|v| v * v).sum())
            .collect();
        Self {
            codes,
            norms,
            num_embeddings,
            embedding_dim,
        }
    }

    /// [`HostCodebook::new`] with the costs `pricing` gives in place of the norms: the
    /// search then minimizes `||r - e_c||^2 + penalty_c`, or `-2 r.e_c + penalty_c` for a
    /// dot-product search.
    pub(crate) fn priced(codebook: &Tensor<2>, pricing: Pricing) -> Self {
        let mut priced = Self::new(codebook);
        if pricing.dot_product {
            priced.norms.fill(0.0);
        }
        if let Some(penalty) = pricing.penalty {
            let penalty = host_floats(penalty);
            assert_eq!(penalty.len(), priced.num_embeddings, "one penalty per code");
            priced
                .norms
                .iter_mut()
                .zip(&penalty)
                .for_each(|(norm, p)| *norm += p);
        }
        priced
    }

    /// The squared norms (with any penalty added), `[K]`.
    pub(super) fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// Code `index`, `[D]`.
    fn code(&self, index: usize) -> &[f32] {
        &self.codes[index * self.embedding_dim..(index + 1) * self.embedding_dim]
    }
}

/// What [`search`] writes besides the indices: the next residual `r - e_idx` always (into
/// `next`, or over the rows), and what is asked for here.
#[derive(Default)]
pub(crate) struct Outputs<'a> {
    /// Where the next residual goes, `[N, D]`, instead of over the rows.
    pub next: Option<&'a mut [f32]>,
    /// The running sums over levels: the chosen codes and the next residuals are added to
    /// them (copied into them on the first level, as the tensor path starts its sums).
    pub running: Option<Running<'a>>,
    /// Sum the squared next residuals.
    pub squared_error: bool,
}

/// The running sums of [`Outputs`].
pub(crate) struct Running<'a> {
    /// `sum_l q_l`, `[N, D]`.
    pub quantized: &'a mut [f32],
    /// `sum_l r_{l+1}`, `[N, D]`.
    pub residuals: &'a mut [f32],
    /// Whether this is the first level (the sums hold nothing yet).
    pub first: bool,
}

/// Nearest code of every row of `rows` `[N, D]` (row-major) by squared distance, the first
/// of equal distances, and what `outputs` asks for; returns the indices and the sum of the
/// squared next residuals (0 unless asked for). See the module docs.
///
/// Memory: one tile of products per worker thread, kept for the next call: `K x rows` with
/// `rows = max(2^16 / K, 16)` (256 KiB for K up to 4096), and never more than
/// `max_elements` products per tile.
///
/// # Panics
///
/// If `rows` or an output is not a whole number of rows of `D`, or an output is not as long
/// as `rows`.
pub(crate) fn search(
    codebook: &HostCodebook,
    rows: &mut [f32],
    outputs: Outputs<'_>,
    max_elements: usize,
) -> (Vec<i64>, f64) {
    let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
    assert!(d > 0 && rows.len().is_multiple_of(d), "rows of {d} values");
    let n = rows.len() / d;
    let mut indices = vec![0i64; n];
    if n == 0 || k == 0 {
        return (indices, 0.0);
    }
    let tile_rows = (TILE_ELEMENTS / k)
        .max(MIN_TILE_ROWS)
        .min(max_elements / k)
        .clamp(1, n);
    let tiles = n.div_ceil(tile_rows);
    let chunk = tile_rows * d;
    // Per-tile slices of each output (`None` where not asked for).
    fn per_tile(
        buffer: Option<&mut [f32]>,
        len: usize,
        chunk: usize,
        tiles: usize,
    ) -> Vec<Option<&mut [f32]>> {
        match buffer {
            Some(buffer) => {
                assert_eq!(buffer.len(), len, "outputs as long as the rows");
                buffer.chunks_mut(chunk).map(Some).collect()
            }
            None => (0..tiles).map(|_| None).collect(),
        }
    }
    let len = rows.len();
    let first = outputs
        .running
        .as_ref()
        .is_some_and(|running| running.first);
    let next_tiles = per_tile(outputs.next, len, chunk, tiles);
    let (quantized, residuals) = outputs
        .running
        .map(|running| (running.quantized, running.residuals))
        .unzip();
    let quantized_tiles = per_tile(quantized, len, chunk, tiles);
    let residual_tiles = per_tile(residuals, len, chunk, tiles);
    let squared_error = outputs.squared_error;
    let tiles: Vec<Tile<'_>> = rows
        .chunks_mut(chunk)
        .zip(indices.chunks_mut(tile_rows))
        .zip(next_tiles)
        .zip(quantized_tiles.into_iter().zip(residual_tiles))
        .map(|(((rows, indices), next), (quantized, residuals))| Tile {
            rows,
            indices,
            next,
            running: quantized
                .zip(residuals)
                .map(|(quantized, residuals)| Running {
                    quantized,
                    residuals,
                    first,
                }),
        })
        .collect();
    let pass = |tile: Tile<'_>| {
        TILE_BUFFERS.with_borrow_mut(|buffers| {
            search_tile(codebook, tile.rows, tile.indices, buffers);
        });
        finish_tile(codebook, tile, squared_error)
    };
    // One tile: no task to hand to rayon (small batches, where its dispatch would dominate).
    let errors: Vec<f64> = match tiles.len() {
        1 => tiles.into_iter().map(pass).collect(),
        _ => tiles.into_par_iter().map(pass).collect(),
    };
    // Tile by tile, in order: the same sum whatever the threads did.
    (indices, errors.into_iter().sum())
}

/// One tile of rows of [`search`] and its slices of the outputs.
struct Tile<'a> {
    rows: &'a mut [f32],
    indices: &'a mut [i64],
    next: Option<&'a mut [f32]>,
    running: Option<Running<'a>>,
}

/// After the search of a tile: each row's next residual `r - e_idx` (into `next`, else over
/// the row), added with the code to the running sums (copied on the first level), and its
/// squared norm summed.
fn finish_tile(codebook: &HostCodebook, tile: Tile<'_>, squared_error: bool) -> f64 {
    let Tile {
        rows: tile,
        indices,
        mut next,
        mut running,
    } = tile;
    let d = codebook.embedding_dim;
    let mut error = 0.0f64;
    for (row_index, (row, &index)) in tile.chunks_exact_mut(d).zip(indices.iter()).enumerate() {
        let code = codebook.code(index as usize);
        let range = row_index * d..(row_index + 1) * d;
        let out: &mut [f32] = match next.as_deref_mut() {
            Some(next) => {
                let out = &mut next[range.clone()];
                out.iter_mut()
                    .zip(row.iter().zip(code))
                    .for_each(|(o, (r, e))| *o = r - e);
                out
            }
            None => {
                row.iter_mut().zip(code).for_each(|(r, e)| *r -= e);
                row
            }
        };
        if let Some(running) = running.as_mut() {
            let quantized = &mut running.quantized[range.clone()];
            let residuals = &mut running.residuals[range];
            if running.first {
                quantized.copy_from_slice(code);
                residuals.copy_from_slice(out);
            } else {
                quantized
                    .iter_mut()
                    .zip(code)
                    .for_each(|(sum, e)| *sum += e);
                residuals
                    .iter_mut()
                    .zip(out.iter())
                    .for_each(|(sum, r)| *sum += r);
            }
        }
        if squared_error {
            error += f64::from(squared_norm(out));
        }
    }
    error
}

/// `sum_j v_j^2` in eight lanes (which the compiler can keep in one vector register), then
/// across them: a row's error to the rounding of f32, summed over rows in f64 by the caller.
pub(super) fn squared_norm(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Per-worker buffers of [`search_tile`], kept between calls: allocating them per tile
/// would hand them back to the allocator (and the pages to the kernel) every time.
#[derive(Default)]
struct TileBuffers {
    /// `[K, rows]` products, then distances.
    products: Vec<f32>,
    /// Best distance per row of the tile.
    best: Vec<f32>,
    /// Its code.
    best_code: Vec<u32>,
}

thread_local! {
    static TILE_BUFFERS: RefCell<TileBuffers> = RefCell::new(TileBuffers::default());
}

/// Writes the nearest code of each of the `m` rows of `tile` `[m, D]` into `indices`.
fn search_tile(
    codebook: &HostCodebook,
    tile: &[f32],
    indices: &mut [i64],
    buffers: &mut TileBuffers,
) {
    let k = codebook.num_embeddings;
    let m = indices.len();
    buffers.products.resize(k * m, 0.0);
    buffers.best.clear();
    buffers.best.resize(m, f32::INFINITY);
    buffers.best_code.clear();
    buffers.best_code.resize(m, 0);
    let products = &mut buffers.products[..k * m];
    product(codebook, tile, products);
    let (best, best_code) = (&mut buffers.best[..m], &mut buffers.best_code[..m]);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { nearest_by_column_avx2(products, &codebook.norms, best, best_code) };
    } else {
        nearest_by_column(products, &codebook.norms, best, best_code);
    }
    #[cfg(not(target_arch = "x86_64"))]
    nearest_by_column(products, &codebook.norms, best, best_code);
    for (index, &code) in indices.iter_mut().zip(best_code.iter()) {
        *index = i64::from(code);
    }
}

/// `-2 E T^T` into `products` `[K, m]` for the `m` rows of `tile` `[m, D]`: one
/// single-threaded `gemm` product.
pub(super) fn product(codebook: &HostCodebook, tile: &[f32], products: &mut [f32]) {
    let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
    let m = tile.len() / d;
    assert_eq!(products.len(), k * m, "K x m products");
    // SAFETY: `products` holds k x m values (row stride m, column stride 1); `codes` is
    // k x d (row stride d, column stride 1); `tile` m x d is read as its transpose d x m
    // (row stride 1, column stride d). The three do not overlap.
    unsafe {
        gemm::gemm(
            k,
            m,
            d,
            products.as_mut_ptr(),
            1,
            m as isize,
            false,
            codebook.codes.as_ptr(),
            1,
            d as isize,
            tile.as_ptr(),
            d as isize,
            1,
            0.0,
            -2.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// For each column `j` of `products` `[K, m]` (`-2 e_c.r_j`), the first code `c` with the
/// least `||e_c||^2 - 2 e_c.r_j`, into `best_code` (`best` starts at infinity). Code by code
/// over the columns; strict `<` keeps the first minimum, like argmin (a NaN distance never
/// wins). The portable version of [`nearest_by_column_avx2`].
fn nearest_by_column(products: &[f32], norms: &[f32], best: &mut [f32], best_code: &mut [u32]) {
    let m = best.len();
    for (code, (row, &norm)) in products.chunks_exact(m).zip(norms).enumerate() {
        let code = code as u32;
        for ((best, best_code), &product) in best.iter_mut().zip(best_code.iter_mut()).zip(row) {
            let distance = norm + product;
            let closer = distance < *best;
            *best = if closer { distance } else { *best };
            *best_code = if closer { code } else { *best_code };
        }
    }
}

/// [`nearest_by_column`] with AVX2 intrinsics: the best distances and codes of 32 columns
/// stay in registers while the codes stream past (four independent compare-and-blend
/// chains), then 8 columns at a time, then one by one. Left to the compiler, the loop became
/// masked stores (`vmaskmovps`), which are microcoded and slow on AMD cores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nearest_by_column_avx2(
    products: &[f32],
    norms: &[f32],
    best: &mut [f32],
    best_code: &mut [u32],
) {
    let m = best.len();
    assert!(products.len() >= norms.len() * m && best_code.len() == m);
    let mut column = 0;
    while column + 32 <= m {
        sweep_avx2::<4>(products, norms, column, best, best_code);
        column += 32;
    }
    while column + 8 <= m {
        sweep_avx2::<1>(products, norms, column, best, best_code);
        column += 8;
    }
    if column < m {
        for (code, (row, &norm)) in products.chunks_exact(m).zip(norms).enumerate() {
            for j in column..m {
                let distance = norm + row[j];
                if distance < best[j] {
                    best[j] = distance;
                    best_code[j] = code as u32;
                }
            }
        }
    }
}

/// Columns `column..column + 8 CHAINS` of [`nearest_by_column_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sweep_avx2<const CHAINS: usize>(
    products: &[f32],
    norms: &[f32],
    column: usize,
    best: &mut [f32],
    best_code: &mut [u32],
) {
    use std::arch::x86_64::*;

    let m = best.len();
    assert!(column + 8 * CHAINS <= m && products.len() >= norms.len() * m);
    let mut distance = [_mm256_set1_ps(f32::INFINITY); CHAINS];
    let mut code = [_mm256_setzero_si256(); CHAINS];
    for (index, (row, &norm)) in products.chunks_exact(m).zip(norms).enumerate() {
        let norm = _mm256_set1_ps(norm);
        let index = _mm256_set1_epi32(index as i32);
        for c in 0..CHAINS {
            // SAFETY: column + 8 c + 8 <= m = row.len() (asserted above).
            let product = unsafe { _mm256_loadu_ps(row.as_ptr().add(column + 8 * c)) };
            let candidate = _mm256_add_ps(norm, product);
            let closer = _mm256_cmp_ps::<_CMP_LT_OQ>(candidate, distance[c]);
            distance[c] = _mm256_blendv_ps(distance[c], candidate, closer);
            code[c] = _mm256_blendv_epi8(code[c], index, _mm256_castps_si256(closer));
        }
    }
    for c in 0..CHAINS {
        // SAFETY: column + 8 c + 8 <= m = best.len() = best_code.len() (asserted above).
        unsafe {
            _mm256_storeu_ps(best.as_mut_ptr().add(column + 8 * c), distance[c]);
            _mm256_storeu_si256(
                best_code.as_mut_ptr().add(column + 8 * c).cast::<__m256i>(),
                code[c],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    /// The AVX2 column argmin and the portable one agree on every column count (blocks of
    /// 32, of 8, the tail), on ties (the first code) and on NaN distances (never taken).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_and_portable_argmin_agree() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut hash = SplitMix64::new(11);
        for m in [1, 7, 8, 9, 31, 32, 33, 45, 64, 70] {
            let k = 13;
            // Coarse values (multiples of 1/8): many ties between codes.
            let mut products: Vec<f32> = (0..k * m)
                .map(|_| (hash.next_u64() % 16) as f32 / 8.0)
                .collect();
            products[3 * m] = f32::NAN;
            let norms: Vec<f32> = (0..k).map(|c| (c % 3) as f32 / 8.0).collect();
            let mut portable = (vec![f32::INFINITY; m], vec![0u32; m]);
            nearest_by_column(&products, &norms, &mut portable.0, &mut portable.1);
            let mut vector = (vec![f32::INFINITY; m], vec![0u32; m]);
            // SAFETY: AVX2 checked above.
            unsafe { nearest_by_column_avx2(&products, &norms, &mut vector.0, &mut vector.1) };
            assert_eq!(portable, vector, "{m} columns");
            for (j, &code) in portable.1.iter().enumerate() {
                let distance = |c: usize| norms[c] + products[c * m + j];
                let least = (0..k)
                    .map(distance)
                    .filter(|d| !d.is_nan())
                    .fold(f32::INFINITY, f32::min);
                let first = (0..k).find(|&c| distance(c) == least).unwrap();
                assert_eq!(code as usize, first, "{m} columns, column {j}");
            }
        }
    }
}
