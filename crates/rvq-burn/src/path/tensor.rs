//! The tensor path: a level's pass as Burn tensor operations, on any backend.
//!
//! The straightforward version of a level: a distance product and an argmin per chunk of rows,
//! a gather, a subtraction, scatter-adds (or 0/1 products, [`Search::dense`]) for the per-code
//! statistics. The other paths are tested equal to it.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::{Expansion, LevelPass, LevelPath, Pricing, Rows, RunningSums, Work, check_index_range};
use crate::error::RvqError;
use crate::util::host_ints;

/// How the tensor path searches and accumulates a batch: the memory bound of the `[N, K]`
/// intermediates and whether per-code statistics are scatter-adds or dense products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Search {
    /// Largest `rows x codes` intermediate formed at once.
    pub max_elements: usize,
    /// Per-code counts and sums as products of 0/1 assignment matrices instead of
    /// scatter-adds (see [`EmaResidualVectorQuantizerConfig::dense_statistics`]).
    ///
    /// [`EmaResidualVectorQuantizerConfig::dense_statistics`]:
    /// crate::EmaResidualVectorQuantizerConfig::dense_statistics
    pub dense: bool,
}

/// The tensor path ([`LevelPath`]) with its search settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorPath(pub Search);

/// The rows of a call on the tensor path (and the kernel path, which holds them alike).
pub(crate) struct TensorRows {
    residual: Tensor<2>,
    /// Started for a forward's output: keep the running sums.
    output: bool,
    /// The running sums, from the first level on.
    running: Option<RunningSums>,
}

impl Rows for TensorRows {
    fn start(x: Tensor<2>, work: Work) -> Self {
        Self {
            residual: x,
            output: work.output,
            running: None,
        }
    }

    fn residual(&self) -> Tensor<2> {
        self.residual.clone()
    }

    fn finish(self) -> Option<RunningSums> {
        self.running
    }

    fn subtract(&mut self, quantized: Tensor<2>) {
        let next = self.residual.clone().sub(quantized.clone());
        if self.output {
            self.running = Some(RunningSums::add(
                self.running.take(),
                quantized,
                next.clone(),
            ));
        }
        self.residual = next;
    }
}

/// What the kernel path's search epilogue reads from and gives back to the rows.
#[cfg(feature = "wgpu")]
impl TensorRows {
    /// Whether the rows keep the running sums (started for a forward's output).
    pub(crate) fn keeps_sums(&self) -> bool {
        self.output
    }

    /// The running sums so far (none before the first level).
    pub(crate) fn running(&self) -> Option<&RunningSums> {
        self.running.as_ref()
    }

    /// The rows after a level whose next residual `next` and, where kept, running sums
    /// `running` were computed elsewhere (the kernel path's search epilogue).
    pub(crate) fn advance(&mut self, next: Tensor<2>, running: Option<RunningSums>) {
        self.residual = next;
        if running.is_some() {
            self.running = running;
        }
    }
}

impl TensorRows {
    /// The rest of a level once its codes are known: the chosen codes gathered, the rows
    /// turned into the next residual, the squared error and the running sums, as tensor
    /// operations.
    pub(crate) fn finish_level(
        &mut self,
        codebook: Tensor<2>,
        indices: Tensor<1, Int>,
        counts: Option<Tensor<1>>,
        sums: Option<Tensor<2>>,
        work: Work,
    ) -> LevelPass {
        let quantized = codebook.select(0, indices.clone()); // [N, D]
        let next = self.residual.clone().sub(quantized.clone()); // r - q
        let squared_error = work.output.then(|| next.clone().powi_scalar(2).sum());
        if self.output && work.output {
            self.running = Some(RunningSums::add(
                self.running.take(),
                quantized,
                next.clone(),
            ));
        }
        self.residual = next;
        LevelPass {
            indices,
            counts,
            sums,
            squared_error,
        }
    }
}

/// Checks every index of `indices` `[M, N]` (level `l`'s codes in row `l`) against its
/// level's codebook size: two reductions over all levels and one read back of every level's
/// minimum and maximum.
pub(crate) fn check_indices(
    codebooks: &[Tensor<2>],
    indices: &Tensor<2, Int>,
) -> Result<(), RvqError> {
    // [M, 2]: each level's minimum and maximum.
    let bounds = Tensor::cat(
        vec![indices.clone().min_dim(1), indices.clone().max_dim(1)],
        1,
    );
    let bounds: Vec<i64> = bounds.into_data().iter::<i64>().collect();
    check_index_range(
        bounds.chunks(2).map(|pair| (pair[0], pair[1])),
        codebooks.iter().map(|codebook| codebook.dims()[0]),
    )
}

impl LevelPath for TensorPath {
    type Rows = TensorRows;

    fn level_priced(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut TensorRows,
        work: Work,
    ) -> LevelPass {
        let [k, _] = codebook.dims();
        let search = self.0;
        let residual = rows.residual();
        let indices =
            nearest_indices_priced(&codebook, pricing, residual.clone(), search.max_elements);
        let counts = work.counts.then(|| per_code_counts(&indices, k, search));
        let sums = work
            .sums
            .then(|| per_code_sums(&indices, residual, k, search));
        rows.finish_level(codebook, indices, counts, sums, work)
    }

    fn expand(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        candidates: Tensor<2>,
        base: &[f32],
        beam: usize,
    ) -> Expansion {
        expand(
            &codebook,
            pricing,
            candidates,
            base,
            beam,
            self.0.max_elements,
        )
    }

    fn decode(
        &self,
        codebooks: Vec<Tensor<2>>,
        indices: &[Tensor<1, Int>],
    ) -> Result<Tensor<2>, RvqError> {
        check_indices(&codebooks, &Tensor::stack(indices.to_vec(), 0))?;
        Ok(codebooks
            .into_iter()
            .zip(indices)
            .map(|(codebook, level_indices)| codebook.select(0, level_indices.clone()))
            .reduce(|a, b| a.add(b))
            .expect("at least one level"))
    }
}

/// Rows per block of the dense accumulation: long enough for the products to run at speed,
/// short enough that the blocks give the device parallel work (README, Benchmarks).
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
pub(crate) fn per_code_sums(
    indices: &Tensor<1, Int>,
    rows: Tensor<2>,
    k: usize,
    search: Search,
) -> Tensor<2> {
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

/// Index of the nearest code for every row, `argmin_k ||r - e_k||^2`: a product and an
/// argmin per chunk of at most `max_elements` distances.
///
/// `||r||^2` is the same for every code of a row and is left out of the comparison; this keeps
/// the argmin and avoids the cancellation that adding it brings for inputs far from the origin.
#[cfg(test)]
pub(crate) fn nearest_indices(
    codebook: &Tensor<2>,
    residual: Tensor<2>,
    max_elements: usize,
) -> Tensor<1, Int> {
    nearest_indices_priced(codebook, Pricing::default(), residual, max_elements)
}

/// `||e_c||^2 (+ penalty_c)`, or `penalty_c` alone (zeros without one) for a dot-product
/// search, `[1, K]`: what every path adds to `-2 r.e_c` for a cost.
pub(crate) fn code_norms(codebook: &Tensor<2>, pricing: Pricing) -> Tensor<2> {
    let [k, _] = codebook.dims();
    let norms = match (pricing.dot_product, pricing.norms) {
        (false, Some(norms)) => norms.reshape([1, k]),
        (false, None) => codebook.clone().powi_scalar(2).sum_dim(1).reshape([1, k]),
        (true, _) => Tensor::zeros([1, k], &codebook.device()),
    };
    match pricing.penalty {
        Some(penalty) => norms.add(penalty.reshape([1, k])),
        None => norms,
    }
}

/// [`nearest_indices`] with the costs `pricing` gives.
pub(crate) fn nearest_indices_priced(
    codebook: &Tensor<2>,
    pricing: Pricing,
    residual: Tensor<2>,
    max_elements: usize,
) -> Tensor<1, Int> {
    let [n, _] = residual.dims();
    let [k, _] = codebook.dims();
    // -2 e^T, [D, K]: scaling by a power of two is exact, so folding it into the (small)
    // codebook gives the same distances as scaling the [N, K] product, one pass cheaper.
    let codebook_t = codebook.clone().transpose().mul_scalar(-2.0);
    let norms = code_norms(codebook, pricing); // [1, K]
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

/// One level of a beam search as tensor operations ([`LevelPath::expand`]): per chunk of
/// vectors (at most `max_elements` costs), the `[rows, K]` costs
/// `(-2 r.e_c + (||e_c||^2 + penalty_c)) + (||r||^2 + base)` seen as `[vectors, B K]`, and
/// `B` argmins, each pick set to infinity before the next (ties to the lower `b K + c`).
pub(crate) fn expand(
    codebook: &Tensor<2>,
    pricing: Pricing,
    candidates: Tensor<2>,
    base: &[f32],
    beam: usize,
    max_elements: usize,
) -> Expansion {
    let [rows, _] = candidates.dims();
    let [k, _] = codebook.dims();
    let n = rows / beam;
    let device = candidates.device();
    let codebook_t = codebook.clone().transpose().mul_scalar(-2.0); // [D, K]
    let norms = code_norms(codebook, pricing); // [1, K]
    let base = Tensor::<1>::from_data(TensorData::new(base.to_vec(), [rows]), &device);
    let start = candidates
        .clone()
        .powi_scalar(2)
        .sum_dim(1)
        .add(base.reshape([rows, 1])); // [rows, 1]
    let width = beam * k;
    let columns = Tensor::<1, Int>::arange(0..width as i64, &device).reshape([1, width]);
    let vectors_per_chunk = (max_elements / width.max(1)).max(1);
    let mut picks = Vec::with_capacity(rows);
    for first in (0..n).step_by(vectors_per_chunk) {
        let m = vectors_per_chunk.min(n - first);
        let range = first * beam..(first + m) * beam;
        #[allow(clippy::single_range_in_vec_init)] // rows of the chunk
        let mut costs = candidates
            .clone()
            .slice([range.clone()])
            .matmul(codebook_t.clone())
            .add(norms.clone())
            .add(start.clone().slice([range]))
            .reshape([m, width]);
        let mut ranks = Vec::with_capacity(beam);
        for _ in 0..beam {
            let pick = costs.clone().argmin(1); // [m, 1]
            let taken = columns
                .clone()
                .expand([m, width])
                .equal(pick.clone().expand([m, width]));
            costs = costs.mask_fill(taken, f32::INFINITY);
            ranks.push(pick);
        }
        picks.extend(host_ints(Tensor::cat(ranks, 1).reshape([m * beam])));
    }
    Expansion {
        parents: picks.iter().map(|&p| (p as usize / k) as u32).collect(),
        codes: picks.iter().map(|&p| (p as usize % k) as u32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::path::host::{HostPath, HostRows};
    use crate::util::{SplitMix64, host_floats, host_ints};

    fn tensor(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
    }

    /// The host path's pass equals the tensor path's: the nearest code (the same index, or,
    /// where float rounding orders two codes differently, one at the same distance), and, for
    /// the codes it chose, exactly what the tensor operations give: counts, per-code sums,
    /// next residuals and running sums to the bit; the squared error to rounding. Two levels
    /// in a row (the running sums start, then add), over shapes whose tiles are not whole
    /// blocks of 8 or 32 rows, bounds below one tile, K = 1 and N = 1.
    #[test]
    fn host_pass_equals_tensor_pass() {
        let device = Device::flex();
        let mut hash = SplitMix64::new(5);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        for (n, d, k, max_elements) in [
            (1, 3, 1, 1),
            (37, 5, 7, 16),
            (500, 16, 64, 1 << 24),
            (500, 16, 64, 640),
            (300, 64, 256, 1000),
            (45, 3, 300, 1 << 24),
            (70, 4, 9, 90),
            (1000, 8, 5, 1 << 24),
        ] {
            let search = Search {
                max_elements,
                dense: false,
            };
            let host = HostPath { max_elements };
            let what = format!("shape {n}x{d}, K = {k}, bound {max_elements}");
            let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
            let mut rows = HostRows::start(tensor(&x, [n, d], &device), Work::TRAINING);
            let mut residual = tensor(&x, [n, d], &device);
            let mut running: Option<RunningSums> = None;
            for level in 0..2 {
                let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
                let codebook = tensor(&codes, [k, d], &device);
                let batch = host.level(codebook.clone(), &mut rows, Work::TRAINING);
                let indices = batch.indices.clone();
                let got = host_ints(indices.clone());
                let want = host_ints(nearest_indices(&codebook, residual.clone(), max_elements));
                let input = host_floats(residual.clone());
                let distance = |row: usize, code: i64| -> f64 {
                    (0..d)
                        .map(|j| {
                            let e = codes[code as usize * d + j] as f64;
                            (input[row * d + j] as f64 - e).powi(2)
                        })
                        .sum()
                };
                for (row, (g, w)) in got.iter().zip(&want).enumerate() {
                    let (dg, dw) = (distance(row, *g), distance(row, *w));
                    assert!(
                        g == w || (dg - dw).abs() <= 1e-5 * dw.max(1.0),
                        "{what}, level {level}, row {row}: host code {g} at {dg}, tensor {w} at {dw}"
                    );
                }
                // The tensor operations for the host's codes.
                let quantized = codebook.select(0, indices.clone());
                let next = residual.clone().sub(quantized.clone());
                let counts = per_code_counts(&indices, k, search);
                let sums = per_code_sums(&indices, residual.clone(), k, search);
                assert_eq!(
                    batch.counts.unwrap().into_data(),
                    counts.into_data(),
                    "{what}"
                );
                assert_eq!(batch.sums.unwrap().into_data(), sums.into_data(), "{what}");
                assert_eq!(rows.residual().into_data(), next.to_data(), "{what}");
                let error = host_floats(batch.squared_error.unwrap())[0] as f64;
                let want_error = host_floats(next.clone().powi_scalar(2).sum())[0] as f64;
                assert!(
                    (error - want_error).abs() <= 1e-6 * want_error.max(1e-12),
                    "{what}: squared error {error} vs {want_error}"
                );
                running = Some(RunningSums::add(running, quantized, next.clone()));
                residual = next;
            }
            let got = rows.finish().unwrap();
            let want = running.unwrap();
            assert_eq!(
                got.quantized.into_data(),
                want.quantized.into_data(),
                "{what}"
            );
            assert_eq!(
                got.residuals.into_data(),
                want.residuals.into_data(),
                "{what}"
            );
        }
    }

    /// The tensor path's own pass is what its parts give, and the dense statistics equal
    /// the scatter-adds (counts exactly, sums to rounding).
    #[test]
    fn dense_statistics_equal_scatter_adds() {
        let device = Device::flex();
        let mut hash = SplitMix64::new(9);
        let mut uniform = move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let (n, d, k) = (1300, 6, 37);
        let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
        let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
        let codebook = tensor(&codes, [k, d], &device);
        let scatter = TensorPath(Search {
            max_elements: 1 << 24,
            dense: false,
        });
        let dense = TensorPath(Search {
            max_elements: 4000,
            dense: true,
        });
        let level = |path: &TensorPath| {
            let mut rows = TensorRows::start(tensor(&x, [n, d], &device), Work::TRAINING);
            path.level(codebook.clone(), &mut rows, Work::TRAINING)
        };
        let (a, b) = (level(&scatter), level(&dense));
        assert_eq!(host_ints(a.indices), host_ints(b.indices));
        assert_eq!(a.counts.unwrap().into_data(), b.counts.unwrap().into_data());
        let (sa, sb) = (host_floats(a.sums.unwrap()), host_floats(b.sums.unwrap()));
        for (x, y) in sa.iter().zip(&sb) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    /// Of codes at the same distance, the host and tensor paths take the first, like
    /// `argmin` (the kernel path: `kernel::tests`).
    #[test]
    fn equal_codes_resolve_to_the_first() {
        let device = Device::flex();
        let (n, d) = (41, 2);
        // Codes 2 and 5 are the same point, nearest to every row; the others far away.
        let mut codes = vec![9.0f32; 7 * d];
        codes[2 * d..3 * d].copy_from_slice(&[0.25, -0.5]);
        codes[5 * d..6 * d].copy_from_slice(&[0.25, -0.5]);
        let codebook = tensor(&codes, [7, d], &device);
        let rows: Vec<f32> = (0..n * d).map(|i| (i % 5) as f32 * 0.01).collect();
        let x = tensor(&rows, [n, d], &device);
        for max_elements in [1 << 24, 7] {
            let host = HostPath { max_elements };
            let mut state = HostRows::start(x.clone(), Work::CODES);
            let indices = host
                .level(codebook.clone(), &mut state, Work::CODES)
                .indices;
            assert_eq!(host_ints(indices), vec![2; n], "host, bound {max_elements}");
        }
        let indices = nearest_indices(&codebook, x, 1 << 24);
        assert_eq!(host_ints(indices), vec![2; n], "tensor");
    }
}
