//! The host path: on Burn's CPU backends (`flex`, `ndarray`) tensors live in host memory, and
//! a level's whole pass (nearest code, chosen code, next residual, squared error, running
//! sums, per-code counts and sums) is one pass over tiles of rows instead of some twenty
//! tensor operations, each a pass over memory of its own.
//!
//! Per tile of rows `R` (one rayon task each), one single-threaded `gemm` product `-2 E R^T`
//! `[K, rows]` into the worker's own buffer, which stays in that core's cache for what
//! follows: the code norms added and the first minimum per row taken, code by code over the
//! tile's rows (a compare-and-select in AVX2 registers), then each row's code gathered, the
//! next residual written, the running sums and the squared error accumulated. The tensor
//! version writes the `[N, K]` product to memory, a second `[N, K]` tensor with the norms
//! added, and reads both back for the argmin: three times the memory traffic of the product,
//! which on a 2-core machine cost as much as the product. The per-code sums follow in a
//! second pass, parallel over codes, each code's rows added in row order.
//!
//! What it gives equals the tensor path's: the same counts, per-code sums, next residuals
//! and running sums to the bit (the same additions in the same order), the same indices up
//! to ties that float rounding orders differently (a code at the same distance), and the
//! squared error to rounding (summed in `f64` per tile, then over tiles in order);
//! `path::tensor::tests`.

use std::cell::RefCell;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::{LevelBatch, LevelPath, RunningSums, Work, check_index_range};
use crate::error::RvqError;

/// Products per tile: 256 KiB of f32, half of one core's L2 on the machine measured (AMD
/// EPYC, 512 KiB L2 per core), so the product stays in cache between the product and the
/// argmin. Measured on `encode` (2 cores): 2^14 to 2^18 products per tile within 10 % on
/// the small shape; on medium and codec 2^16 the fastest, 2^14 and 2^18 10-20 % slower.
const TILE_ELEMENTS: usize = 1 << 16;

/// Fewest rows per tile: below this the product's packing of the codebook dominates.
const MIN_TILE_ROWS: usize = 16;

/// Fewest values (`N x D`) for which a pass over the rows is split into rayon tasks.
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// The host path ([`LevelPath`]) with its search bound: at most `max_elements` products per
/// tile (see [`search`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostPath {
    pub max_elements: usize,
}

/// The rows of a call on the host path, `[N, D]` row-major.
pub(crate) struct HostRows {
    /// The current residual.
    rows: Vec<f32>,
    /// Where a level writes the next residual while it still needs its input (per-code sums).
    spare: Vec<f32>,
    /// `(sum_l q_l, sum_l r_{l+1})`, when started for a forward, and how many levels they
    /// hold.
    running: Option<(Vec<f32>, Vec<f32>, usize)>,
    embedding_dim: usize,
    device: Device,
}

impl LevelPath for HostPath {
    type Rows = HostRows;

    fn start(&self, x: Tensor<2>, work: Work) -> HostRows {
        let [_, embedding_dim] = x.dims();
        let device = x.device();
        let rows = host_floats(x);
        let running = work
            .forward
            .then(|| (vec![0.0; rows.len()], vec![0.0; rows.len()], 0));
        HostRows {
            rows,
            spare: Vec::new(),
            running,
            embedding_dim,
            device,
        }
    }

    fn residual(&self, rows: &HostRows) -> Tensor<2> {
        float_tensor(rows.rows.clone(), rows.embedding_dim, &rows.device)
    }

    fn level(&self, codebook: Tensor<2>, rows: &mut HostRows, work: Work) -> LevelBatch {
        let codebook = HostCodebook::new(&codebook);
        let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
        // The per-code sums need the level's input after the search: the next residual
        // goes to the spare buffer then, else over the rows.
        let next = match work.sums {
            true => {
                rows.spare.resize(rows.rows.len(), 0.0);
                Some(rows.spare.as_mut_slice())
            }
            false => None,
        };
        let running =
            rows.running
                .as_mut()
                .filter(|_| work.forward)
                .map(|(quantized, residuals, levels)| {
                    *levels += 1;
                    Running {
                        quantized,
                        residuals,
                        first: *levels == 1,
                    }
                });
        let outputs = Outputs {
            subtract: true,
            next,
            running,
            squared_error: work.forward,
        };
        let (indices, squared_error) =
            search(&codebook, &mut rows.rows, outputs, self.max_elements);
        let counts = work.counts.then(|| counts(&indices, k));
        let sums = work.sums.then(|| {
            let sums = per_code_sums(&indices, &rows.rows, k, d);
            std::mem::swap(&mut rows.rows, &mut rows.spare);
            sums
        });
        let device = &rows.device;
        LevelBatch {
            indices: int_tensor(indices, device),
            counts: counts.map(|counts| Tensor::from_data(TensorData::new(counts, [k]), device)),
            sums: sums.map(|sums| float_tensor(sums, d, device)),
            squared_error: work.forward.then(|| {
                Tensor::from_data(TensorData::new(vec![squared_error as f32], [1]), device)
            }),
        }
    }

    fn finish(&self, rows: HostRows) -> Option<RunningSums> {
        let (d, device) = (rows.embedding_dim, &rows.device);
        rows.running.map(|(quantized, residuals, _)| RunningSums {
            quantized: float_tensor(quantized, d, device),
            residuals: float_tensor(residuals, d, device),
        })
    }

    fn decode(
        &self,
        codebooks: Vec<Tensor<2>>,
        indices: &[Tensor<1, Int>],
    ) -> Result<Tensor<2>, RvqError> {
        let device = indices[0].device();
        let codes: Vec<Vec<i64>> = indices.iter().cloned().map(host_ints).collect();
        let sizes: Vec<usize> = codebooks.iter().map(|c| c.dims()[0]).collect();
        check_index_range(
            codes.iter().map(|level| {
                let min = level.iter().copied().min().unwrap_or(0);
                let max = level.iter().copied().max().unwrap_or(0);
                (min, max)
            }),
            sizes.into_iter(),
        )?;
        let d = codebooks[0].dims()[1];
        let codebooks: Vec<Vec<f32>> = codebooks.into_iter().map(host_floats).collect();
        Ok(float_tensor(decode(&codebooks, &codes, d), d, &device))
    }
}

/// The values of a float tensor, row-major, on the host, as f32 whatever its float dtype
/// (converted in bulk). Takes an f32 tensor's buffer without a copy where the tensor holds it
/// alone.
pub(crate) fn host_floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    match tensor.into_data().try_into_vec_as::<f32>() {
        Ok(values) => values,
        Err(error) => unreachable!("every float dtype converts to f32: {error:?}"),
    }
}

/// The values of an integer tensor on the host, as i64 whatever its integer dtype (converted
/// in bulk: an element-by-element iterator cost a fifth of `decode`'s time on large batches).
pub(crate) fn host_ints(tensor: Tensor<1, Int>) -> Vec<i64> {
    match tensor.into_data().try_into_vec_as::<i64>() {
        Ok(values) => values,
        Err(error) => unreachable!("every integer dtype converts to i64: {error:?}"),
    }
}

/// Rows of `d` values, row-major, as a `[N, d]` tensor on `device`.
fn float_tensor(values: Vec<f32>, d: usize, device: &Device) -> Tensor<2> {
    let n = values.len() / d.max(1);
    Tensor::from_data(TensorData::new(values, [n, d]), device)
}

/// Integers as a `[N]` tensor on `device`.
pub(crate) fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// `sum_l codebooks[l][codes[l][i]]` for every row `i`, `[N, D]` row-major, in parallel over
/// rows, each sum taken level by level like the tensor path's `q_0 + q_1 + ...` (the same
/// floats). `codebooks[l]` is `[K_l, D]` row-major; the codes must be in range.
fn decode(codebooks: &[Vec<f32>], codes: &[Vec<i64>], embedding_dim: usize) -> Vec<f32> {
    let d = embedding_dim;
    let n = codes.first().map_or(0, Vec::len);
    let mut out = vec![0.0f32; n * d];
    const ROWS_PER_TASK: usize = 256;
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .enumerate()
        .for_each(|(task, block)| {
            let first_row = task * ROWS_PER_TASK;
            for (offset, row) in block.chunks_exact_mut(d).enumerate() {
                let i = first_row + offset;
                for (level, (codebook, level_codes)) in codebooks.iter().zip(codes).enumerate() {
                    let index = level_codes[i] as usize;
                    let code = &codebook[index * d..(index + 1) * d];
                    if level == 0 {
                        row.copy_from_slice(code);
                    } else {
                        row.iter_mut().zip(code).for_each(|(sum, e)| *sum += e);
                    }
                }
            }
        });
    out
}

/// A codebook `[K, D]` on the host with its squared norms.
pub(crate) struct HostCodebook {
    codes: Vec<f32>,
    norms: Vec<f32>,
    num_embeddings: usize,
    embedding_dim: usize,
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

    /// Code `index`, `[D]`.
    fn code(&self, index: usize) -> &[f32] {
        &self.codes[index * self.embedding_dim..(index + 1) * self.embedding_dim]
    }
}

/// What [`search`] writes besides the indices.
#[derive(Default)]
pub(crate) struct Outputs<'a> {
    /// Write the next residual `r - e_idx`: into `next`, or over the rows.
    pub subtract: bool,
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
    let subtract = outputs.subtract;
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
        match subtract {
            true => finish_tile(codebook, tile, squared_error),
            false => 0.0,
        }
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
fn squared_norm(values: &[f32]) -> f32 {
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

/// Sum of the rows `[N, D]` that took each code, `[K, D]`: in parallel over blocks of codes,
/// each code's rows added in row order from zero, as a sequential scatter-add does.
fn per_code_sums(indices: &[i64], rows: &[f32], k: usize, d: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; k * d];
    if rows.len() < PARALLEL_ELEMENTS {
        for (row, &index) in rows.chunks_exact(d).zip(indices) {
            let sum = &mut sums[index as usize * d..(index as usize + 1) * d];
            sum.iter_mut().zip(row).for_each(|(s, r)| *s += r);
        }
        return sums;
    }
    // Each task scans every index for its codes: a few passes over [N] integers, against
    // the [N, D] rows read once in all.
    let codes_per_task = k.div_ceil(4 * rayon::current_num_threads()).max(1);
    sums.par_chunks_mut(codes_per_task * d)
        .enumerate()
        .for_each(|(task, block)| {
            let first = task * codes_per_task;
            let codes = first..first + block.len() / d;
            for (row, &index) in rows.chunks_exact(d).zip(indices) {
                let index = index as usize;
                if codes.contains(&index) {
                    let sum = &mut block[(index - first) * d..(index - first + 1) * d];
                    sum.iter_mut().zip(row).for_each(|(s, r)| *s += r);
                }
            }
        });
    sums
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
    let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
    let m = indices.len();
    buffers.products.resize(k * m, 0.0);
    buffers.best.clear();
    buffers.best.resize(m, f32::INFINITY);
    buffers.best_code.clear();
    buffers.best_code.resize(m, 0);
    let products = &mut buffers.products[..k * m];
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

/// Number of rows per code, `[K]` (exact: integer counts below 2^24 are exact in f32).
pub(crate) fn counts(indices: &[i64], num_embeddings: usize) -> Vec<f32> {
    let mut counts = vec![0u32; num_embeddings];
    for &index in indices {
        counts[index as usize] += 1;
    }
    counts.into_iter().map(|c| c as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host decode is the tensor path's `select` + `add`, level by level, to the bit;
    /// over several tasks' worth of rows and codebooks of different sizes.
    #[test]
    fn decode_equals_select_and_add() {
        let device = Device::flex();
        let (n, d) = (600, 5);
        let sizes = [7, 3, 11];
        let mut hash = crate::hash::SplitMix64::new(3);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let codebooks: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&k| (0..k * d).map(|_| uniform() * 3.0).collect())
            .collect();
        let codes: Vec<Vec<i64>> = sizes
            .iter()
            .enumerate()
            .map(|(l, &k)| (0..n).map(|i| ((i * 7 + l * 3) % k) as i64).collect())
            .collect();
        let expected = codebooks
            .iter()
            .zip(&codes)
            .zip(sizes)
            .map(|((codebook, level_codes), k)| {
                let codebook = Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(codebook.clone(), [k, d]),
                    &device,
                );
                let indices = Tensor::<1, Int>::from_data(
                    burn::tensor::TensorData::new(level_codes.clone(), [n]),
                    &device,
                );
                codebook.select(0, indices)
            })
            .reduce(|a, b| a.add(b))
            .unwrap();
        let got = decode(&codebooks, &codes, d);
        assert_eq!(
            burn::tensor::TensorData::new(got, [n, d]),
            expected.into_data()
        );
    }

    /// The AVX2 column argmin and the portable one agree on every column count (blocks of
    /// 32, of 8, the tail), on ties (the first code) and on NaN distances (never taken).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_and_portable_argmin_agree() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut hash = crate::hash::SplitMix64::new(11);
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
