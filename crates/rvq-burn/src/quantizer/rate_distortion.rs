//! Rate-distortion encoding ([`EncodeOptions`]): codes chosen for their bits as well as their
//! error, a beam search across levels, a depth per vector, and the decode of codes that stop
//! early.
//!
//! ```text
//! J(codes) = ||x - sum_l e_l[c_l]||^2 + lambda * sum_l len_l(c_l)      len_l(c) = -log2 p_l(c)
//!
//! beam = 1:  each level takes argmin_c ||r - e_c||^2 + lambda len(c)    (the path's own search,
//!            the rate term added beside the code norms)
//! beam = B:  each level keeps, per vector, the B least J of B candidates x K codes
//!            (LevelPath::expand); the least J at the last level wins
//! depth:     per vector, the least J over the levels (rd_depth), or the first level whose
//!            error is at most stop_below; codes past it are -1
//! ```
//!
//! Each level's choices (codes, the candidate each continues, the error and bits reached)
//! are kept on the host in a [`Trellis`]; the winner of each vector is traced back through
//! it.

use burn::tensor::{Int, Tensor, TensorData};

use super::EmaResidualVectorQuantizer;
use crate::coding::EntropyModels;
use crate::error::RvqError;
use crate::options::EncodeOptions;
use crate::path::{Expansion, LevelPath, Path, Pricing, Rows, Work, with_path};
use crate::util::{host_floats, host_ints, int_tensor};

/// What one level of a rate-distortion search reached, for every vector `i` and candidate
/// `j < B` (at `i B + j`; `B = 1` for a greedy search).
struct Trellis {
    /// The code each candidate took at this level.
    codes: Vec<u32>,
    /// The candidate of the level before that it continues (`None`: a greedy search).
    parents: Option<Vec<u32>>,
    /// `||x - x^||^2` after this level.
    errors: Vec<f32>,
    /// The bits of its codes up to this level (0 when `lambda` is 0).
    bits: Vec<f64>,
    /// Candidates per vector that hold a real partial code (`min(B, K_0 K_1 ...)`).
    live: usize,
}

impl EmaResidualVectorQuantizer {
    /// Codes of `x` `[..., D]` chosen by `options` ([`EncodeOptions`]): for the rate as well as
    /// the error (`lambda`), by a beam search across levels (`beam`), with a depth per vector
    /// (`rd_depth`, `stop_below`; codes past a vector's depth are `-1`, and
    /// [`EmaResidualVectorQuantizer::try_decode_partial`] decodes them). The default options
    /// give [`EmaResidualVectorQuantizer::try_encode`]'s codes.
    ///
    /// Every path runs it: a greedy search (`beam = 1`) on the path's own search, with the
    /// rate term added to the code norms; a beam search on the host path's own step
    /// (`path/host/beam.rs`) on Burn's CPU backends, as tensor operations elsewhere (the kernel
    /// path sends it to the tensor path's operations). A per-vector depth or a beam reads
    /// each level's errors and choices back to the host.
    ///
    /// Fails if `x`'s last dimension is not `D`, `max_levels` is outside `1..=M`, `lambda` or
    /// `stop_below` is negative or not finite, `beam` is 0, or (with `lambda > 0`) a level has
    /// too many codes for an entropy model.
    pub fn try_encode_with<const R: usize>(
        &self,
        x: Tensor<R>,
        options: &EncodeOptions,
    ) -> Result<Vec<Tensor<1, Int>>, RvqError> {
        let models = match options.lambda > 0.0 {
            true => Some(self.entropy_models()?),
            false => None,
        };
        self.encode_with_models(x, options, models.as_ref())
    }

    /// [`EmaResidualVectorQuantizer::try_encode_with`], pricing codes by `models` (needed
    /// when `lambda > 0`).
    pub(crate) fn encode_with_models<const R: usize>(
        &self,
        x: Tensor<R>,
        options: &EncodeOptions,
        models: Option<&EntropyModels>,
    ) -> Result<Vec<Tensor<1, Int>>, RvqError> {
        options.validate()?;
        let shape = x.dims();
        let num_vectors = self.check_input(&shape)?;
        let num_levels = self.check_num_levels(options.max_levels)?;
        if options.is_greedy() || num_vectors == 0 {
            return self.try_encode(x, num_levels);
        }
        if self.config.cosine_similarity {
            return Err(RvqError::InvalidArgument {
                argument: "options",
                value: format!("{options:?}"),
                rule: "must be greedy (lambda 0, beam 1, no depth rule) with cosine codebooks: \
                       the rate-distortion search prices squared distances",
            });
        }
        let flat = self.plain_rows(x, num_vectors);
        let device = flat.device();
        let codebooks: Vec<Tensor<2>> = (0..num_levels)
            .map(|level| self.codebook(level, &device))
            .collect();
        // Bits of each code under the coder's tables, and lambda times them for the search.
        let lengths: Vec<Vec<f64>> = match (options.lambda > 0.0, models) {
            (true, Some(models)) => models.levels()[..num_levels]
                .iter()
                .map(|model| model.code_lengths())
                .collect(),
            (true, None) => unreachable!("lambda > 0 comes with its models"),
            (false, _) => codebooks.iter().map(|c| vec![0.0; c.dims()[0]]).collect(),
        };
        let penalties: Vec<Option<Tensor<1>>> = lengths
            .iter()
            .map(|lengths| {
                (options.lambda > 0.0).then(|| {
                    let penalty: Vec<f32> = lengths
                        .iter()
                        .map(|bits| (options.lambda * bits) as f32)
                        .collect();
                    let len = penalty.len();
                    Tensor::from_data(TensorData::new(penalty, [len]), &device)
                })
            })
            .collect();
        let search = Search {
            codebooks,
            penalties,
            lengths,
            options,
        };
        let codes = with_path!(Path::choose(&device, &self.config), path => search.run(path, flat));
        Ok(codes)
    }

    /// [`EmaResidualVectorQuantizer::try_decode`] of codes that may stop early: a `-1` at a
    /// level means the vector has no code there (its depth is less), as
    /// [`EmaResidualVectorQuantizer::try_encode_with`] gives with a per-vector depth. The
    /// output is the sum of each vector's codes up to its depth, level by level (the same
    /// floats as decoding those levels alone).
    ///
    /// Fails as `try_decode` does, and if a vector has no first code or a code after an
    /// absent one. Reads the indices back to the host once.
    pub fn try_decode_partial<const R: usize>(
        &self,
        indices: &[Tensor<1, Int>],
        shape: [usize; R],
    ) -> Result<Tensor<R>, RvqError> {
        let num_vectors = self.check_codes(indices, &shape)?;
        if num_vectors == 0 {
            return self.try_decode(indices, shape);
        }
        let device = indices[0].device().without_autodiff();
        let codes: Vec<Vec<i64>> = indices.iter().cloned().map(host_ints).collect();
        let sizes = self.sizes();
        check_depths(&codes, &sizes)?;
        if codes.iter().all(|level| level.iter().all(|&c| c >= 0)) {
            return self.try_decode(indices, shape);
        }
        // An absent code is a row of zeros after the codebook: adding it changes no float.
        let padded: Vec<Tensor<1, Int>> = codes
            .into_iter()
            .zip(&sizes)
            .map(|(level, &size)| {
                let level = level
                    .into_iter()
                    .map(|c| if c < 0 { size as i64 } else { c })
                    .collect();
                int_tensor(level, &device)
            })
            .collect();
        let d = self.codebook_dim();
        let codebooks: Vec<Tensor<2>> = (0..indices.len())
            .map(|level| {
                let codebook = self.codebook(level, &device);
                Tensor::cat(vec![codebook, Tensor::zeros([1, d], &device)], 0)
            })
            .collect();
        let sum = with_path!(Path::choose(&device, &self.config), path => {
            path.decode(codebooks, &padded)
        })?;
        Ok(self.project_out(sum).reshape(shape))
    }
}

/// Checks codes that may stop early: each in `-1..K_l`, every vector's first present, and no
/// code after an absent one.
fn check_depths(codes: &[Vec<i64>], sizes: &[usize]) -> Result<(), RvqError> {
    for (level, (level_codes, &size)) in codes.iter().zip(sizes).enumerate() {
        let min = level_codes.iter().copied().min().unwrap_or(0);
        let max = level_codes.iter().copied().max().unwrap_or(0);
        if min < -1 || max >= size as i64 || (level == 0 && min < 0) {
            return Err(RvqError::IndexOutOfRange {
                level,
                min,
                max,
                num_embeddings: size,
            });
        }
        if level > 0
            && let Some(position) =
                (0..level_codes.len()).find(|&i| codes[level - 1][i] < 0 && level_codes[i] >= 0)
        {
            return Err(RvqError::InvalidArgument {
                argument: "indices",
                value: format!(
                    "code {} at level {level}, position {position}, after an absent (-1) code",
                    level_codes[position]
                ),
                rule: "must stop at a vector's depth: once -1, -1 at every later level",
            });
        }
    }
    Ok(())
}

/// One rate-distortion search over the first levels: what every level needs.
struct Search<'a> {
    /// Each level's codebook `[K_l, D]`.
    codebooks: Vec<Tensor<2>>,
    /// `lambda len_l(c)` per code, `[K_l]` (`None` when `lambda` is 0).
    penalties: Vec<Option<Tensor<1>>>,
    /// `len_l(c)`, bits per code (zeros when `lambda` is 0).
    lengths: Vec<Vec<f64>>,
    options: &'a EncodeOptions,
}

impl Search<'_> {
    /// The codes of rows `x` `[N, D]` (`N > 0`) on `path`.
    fn run<P: LevelPath>(&self, path: &P, x: Tensor<2>) -> Vec<Tensor<1, Int>> {
        let [n, _] = x.dims();
        let device = x.device();
        let trellis = match self.options.beam {
            1 => {
                let (codes, trellis) = self.greedy(path, x);
                match trellis {
                    Some(trellis) => trellis,
                    None => return codes,
                }
            }
            _ => self.beam(path, x),
        };
        self.trace_back(&trellis, n)
            .into_iter()
            .map(|level| int_tensor(level, &device))
            .collect()
    }

    /// Level by level on the path's search with the rate term; the trellis only when a
    /// vector's depth is to be chosen.
    fn greedy<P: LevelPath>(
        &self,
        path: &P,
        x: Tensor<2>,
    ) -> (Vec<Tensor<1, Int>>, Option<Vec<Trellis>>) {
        let depth = self.options.variable_depth();
        let mut rows = P::Rows::start(x, Work::CODES);
        let mut codes = Vec::with_capacity(self.codebooks.len());
        let mut trellis: Vec<Trellis> = Vec::new();
        for (level, (codebook, penalty)) in self.codebooks.iter().zip(&self.penalties).enumerate() {
            let pass = path.level_priced(
                codebook.clone(),
                Pricing::penalized(penalty.clone()),
                &mut rows,
                Work::CODES,
            );
            if depth {
                let chosen: Vec<u32> = host_ints(pass.indices.clone())
                    .into_iter()
                    .map(|c| c as u32)
                    .collect();
                let errors = host_floats(rows.residual().powi_scalar(2).sum_dim(1));
                let lengths = &self.lengths[level];
                let bits = chosen
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        trellis.last().map_or(0.0, |before| before.bits[i]) + lengths[c as usize]
                    })
                    .collect();
                trellis.push(Trellis {
                    codes: chosen,
                    parents: None,
                    errors,
                    bits,
                    live: 1,
                });
            }
            codes.push(pass.indices);
        }
        (codes, depth.then_some(trellis))
    }

    /// A beam search of `B` candidates per vector, its steps on the path's
    /// [`LevelPath::expand`].
    fn beam<P: LevelPath>(&self, path: &P, x: Tensor<2>) -> Vec<Trellis> {
        let beam = self.options.beam;
        let [n, d] = x.dims();
        let rows = n * beam;
        let device = x.device();
        let mut candidates = x.reshape([n, 1, d]).expand([n, beam, d]).reshape([rows, d]);
        let mut trellis: Vec<Trellis> = Vec::with_capacity(self.codebooks.len());
        let mut live = 1usize;
        for (level, (codebook, penalty)) in self.codebooks.iter().zip(&self.penalties).enumerate() {
            let bits_before = trellis.last().map(|before| before.bits.as_slice());
            // Candidates past the live ones (the first levels of a beam wider than K) cost
            // infinity, so that no copy of a live one is taken twice.
            let base: Vec<f32> = (0..rows)
                .map(|j| match j % beam < live {
                    true => (self.options.lambda * bits_before.map_or(0.0, |bits| bits[j])) as f32,
                    false => f32::INFINITY,
                })
                .collect();
            let Expansion { parents, codes } = path.expand(
                codebook.clone(),
                Pricing::penalized(penalty.clone()),
                candidates.clone(),
                &base,
                beam,
            );
            live = live.saturating_mul(codebook.dims()[0]).min(beam);
            let sources: Vec<i64> = parents
                .iter()
                .enumerate()
                .map(|(j, &parent)| ((j / beam) * beam + parent as usize) as i64)
                .collect();
            let chosen: Vec<i64> = codes.iter().map(|&c| i64::from(c)).collect();
            candidates = candidates
                .select(0, int_tensor(sources.clone(), &device))
                .sub(codebook.clone().select(0, int_tensor(chosen, &device)));
            let errors = host_floats(candidates.clone().powi_scalar(2).sum_dim(1));
            let lengths = &self.lengths[level];
            let bits = codes
                .iter()
                .zip(&sources)
                .map(|(&c, &source)| {
                    bits_before.map_or(0.0, |bits| bits[source as usize]) + lengths[c as usize]
                })
                .collect();
            trellis.push(Trellis {
                codes,
                parents: Some(parents),
                errors,
                bits,
                live,
            });
        }
        trellis
    }

    /// Each vector's best (level, candidate) by the options' depth rule, traced back to its
    /// codes: `[levels][N]`, `-1` past the vector's depth.
    fn trace_back(&self, trellis: &[Trellis], n: usize) -> Vec<Vec<i64>> {
        let options = self.options;
        let width = trellis[0].codes.len() / n;
        let last = trellis.len() - 1;
        let mut out = vec![vec![-1i64; n]; trellis.len()];
        for i in 0..n {
            let cost = |level: usize, j: usize| {
                let at = &trellis[level];
                f64::from(at.errors[i * width + j]) + options.lambda * at.bits[i * width + j]
            };
            // The deepest level a vector may reach: the first whose error is low enough.
            let stop = options.stop_below.map_or(last, |threshold| {
                (0..=last)
                    .find(|&level| {
                        let at = &trellis[level];
                        (0..at.live).any(|j| f64::from(at.errors[i * width + j]) <= threshold)
                    })
                    .unwrap_or(last)
            });
            let first = if options.rd_depth { 0 } else { stop };
            let mut best: Option<(usize, usize, f64)> = None;
            for (level, at) in trellis.iter().enumerate().take(stop + 1).skip(first) {
                for j in 0..at.live {
                    // A NaN cost (a NaN input) ranks last; strict: equal costs keep the
                    // shallower level and the lower candidate.
                    let c = match cost(level, j) {
                        c if c.is_nan() => f64::INFINITY,
                        c => c,
                    };
                    if best.is_none_or(|(_, _, least)| c < least) {
                        best = Some((level, j, c));
                    }
                }
            }
            let (depth, mut j, _) = best.expect("every level has a live candidate");
            for level in (0..=depth).rev() {
                let at = &trellis[level];
                out[level][i] = i64::from(at.codes[i * width + j]);
                j = at
                    .parents
                    .as_ref()
                    .map_or(0, |parents| parents[i * width + j] as usize);
            }
        }
        out
    }
}
