//! The host path: on Burn's CPU backends (`flex`, `ndarray`, LibTorch's CPU device) tensors
//! live in host memory, and a level's whole pass (nearest code, chosen code, next residual,
//! squared error, running sums, per-code counts and sums) is one pass over tiles of rows
//! (`host/search.rs`) instead of some twenty tensor operations, each a pass over
//! memory of its own. The per-code sums follow in a second pass, parallel over codes, each
//! code's rows added in row order.
//!
//! What it gives equals the tensor path's: the same counts, per-code sums, next residuals
//! and running sums to the bit (the same additions in the same order), the same indices up
//! to ties that float rounding orders differently (a code at the same distance), and the
//! squared error to rounding (summed in `f64` per tile, then over tiles in order);
//! `path::tensor::tests`.

mod beam;
mod search;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use self::search::{HostCodebook, Outputs, Running, search};
use super::{Expansion, LevelPass, LevelPath, Pricing, Rows, RunningSums, Work, check_index_range};
use crate::error::RvqError;
use crate::util::{float_tensor, host_floats, host_ints, int_tensor};

/// Fewest values (`N x D`) for which a pass over the rows is split into rayon tasks.
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// The host path ([`LevelPath`]) with its search bound: at most `max_elements` products per
/// tile (see [`search()`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostPath {
    pub max_elements: usize,
}

/// The rows of a call on the host path, `[N, D]` row-major.
pub(crate) struct HostRows {
    /// The current residual.
    residual: Vec<f32>,
    /// Where a level writes the next residual while it still needs its input (per-code sums).
    spare: Vec<f32>,
    /// `(sum_l q_l, sum_l r_{l+1})`, when started for a forward, and how many levels they
    /// hold.
    running: Option<(Vec<f32>, Vec<f32>, usize)>,
    embedding_dim: usize,
    device: Device,
}

impl Rows for HostRows {
    fn start(x: Tensor<2>, work: Work) -> Self {
        let [_, embedding_dim] = x.dims();
        let device = x.device();
        let residual = host_floats(x);
        let running = work
            .output
            .then(|| (vec![0.0; residual.len()], vec![0.0; residual.len()], 0));
        HostRows {
            residual,
            spare: Vec::new(),
            running,
            embedding_dim,
            device,
        }
    }

    fn residual(&self) -> Tensor<2> {
        float_tensor(self.residual.clone(), self.embedding_dim, &self.device)
    }

    fn finish(self) -> Option<RunningSums> {
        let (d, device) = (self.embedding_dim, &self.device);
        self.running.map(|(quantized, residuals, _)| RunningSums {
            quantized: float_tensor(quantized, d, device),
            residuals: float_tensor(residuals, d, device),
        })
    }

    fn subtract(&mut self, quantized: Tensor<2>) {
        let quantized = host_floats(quantized);
        for (r, q) in self.residual.iter_mut().zip(&quantized) {
            *r -= q;
        }
        if let Some((sum_quantized, sum_residuals, levels)) = &mut self.running {
            *levels += 1;
            for (sum, q) in sum_quantized.iter_mut().zip(&quantized) {
                *sum += q;
            }
            for (sum, r) in sum_residuals.iter_mut().zip(&self.residual) {
                *sum += r;
            }
        }
    }
}

impl LevelPath for HostPath {
    type Rows = HostRows;

    fn level_priced(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        rows: &mut HostRows,
        work: Work,
    ) -> LevelPass {
        let codebook = HostCodebook::priced(&codebook, pricing);
        let (k, d) = (codebook.num_embeddings, codebook.embedding_dim);
        // The per-code sums need the level's input after the search: the next residual
        // goes to the spare buffer then, else over the rows.
        let next = match work.sums {
            true => {
                rows.spare.resize(rows.residual.len(), 0.0);
                Some(rows.spare.as_mut_slice())
            }
            false => None,
        };
        let running =
            rows.running
                .as_mut()
                .filter(|_| work.output)
                .map(|(quantized, residuals, levels)| {
                    *levels += 1;
                    Running {
                        quantized,
                        residuals,
                        first: *levels == 1,
                    }
                });
        let outputs = Outputs {
            next,
            running,
            squared_error: work.output,
        };
        let (indices, squared_error) =
            search(&codebook, &mut rows.residual, outputs, self.max_elements);
        let counts = work.counts.then(|| counts(&indices, k));
        let sums = work.sums.then(|| {
            let sums = per_code_sums(&indices, &rows.residual, k, d);
            std::mem::swap(&mut rows.residual, &mut rows.spare);
            sums
        });
        let device = &rows.device;
        LevelPass {
            indices: int_tensor(indices, device),
            counts: counts.map(|counts| Tensor::from_data(TensorData::new(counts, [k]), device)),
            sums: sums.map(|sums| float_tensor(sums, d, device)),
            squared_error: work.output.then(|| {
                Tensor::from_data(TensorData::new(vec![squared_error as f32], [1]), device)
            }),
        }
    }

    fn expand(
        &self,
        codebook: Tensor<2>,
        pricing: Pricing,
        candidates: Tensor<2>,
        base: &[f32],
        beam: usize,
    ) -> Expansion {
        let codebook = HostCodebook::priced(&codebook, pricing);
        beam::expand(&codebook, &host_floats(candidates), base, beam)
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

/// Number of rows per code, `[K]` (exact: integer counts below 2^24 are exact in f32).
fn counts(indices: &[i64], num_embeddings: usize) -> Vec<f32> {
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
        let mut hash = crate::util::SplitMix64::new(3);
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
}
