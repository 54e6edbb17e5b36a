//! Per-call options of the forward pass.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::error::RvqError;

/// Options of [`EmaResidualVectorQuantizer::forward_with`](crate::EmaResidualVectorQuantizer::forward_with).
///
/// The default is the reference behaviour: all levels, every position real, and the EMA
/// update whenever the input is on an autodiff device and the layer is not frozen.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Whether a training forward may update the EMA statistics. `false` runs the training
    /// computation (loss, gradients, metrics) and leaves the state untouched: for all but one
    /// micro-batch of a gradient accumulation, or to train around a fixed codebook for a step.
    /// Default: `true`.
    pub update_ema: bool,
    /// Quantize with only the first `n` levels (`1 <= n <= num_levels`); the others neither
    /// contribute to the output and loss nor update. `None` uses every level. Default: `None`.
    pub num_levels: Option<usize>,
    /// Which positions of the batch are real (padding is false): see [`Mask`]. `None`: all.
    /// Default: `None`.
    pub mask: Option<Mask>,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            update_ema: true,
            num_levels: None,
            mask: None,
        }
    }
}

impl ForwardOptions {
    /// The reference behaviour (same as `default()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ForwardOptions::update_ema`].
    pub fn with_update_ema(mut self, update_ema: bool) -> Self {
        self.update_ema = update_ema;
        self
    }

    /// Sets [`ForwardOptions::num_levels`].
    pub fn with_num_levels(mut self, num_levels: usize) -> Self {
        self.num_levels = Some(num_levels);
        self
    }

    /// Sets [`ForwardOptions::mask`]: `mask` has the input's leading shape (all of it but
    /// the last dimension), true where a position is real.
    pub fn with_mask<const L: usize>(mut self, mask: Tensor<L, Bool>) -> Self {
        self.mask = Some(Mask::new(mask));
        self
    }
}

/// A padding mask: which positions of a batch `[..., D]` are real (true) and which are
/// padding (false), over the batch's leading shape `[...]`, as for variable-length sequences
/// padded to one length.
///
/// A forward with a mask is the forward of the real positions alone: padded positions enter
/// neither the EMA counts and sums, nor the commitment loss (its mean is over the real
/// positions), nor the metrics, the k-means init or the dead-code restarts. Their output is
/// zero (with no gradient) and their code is `-1` in [`RvqOutput::indices`](crate::RvqOutput),
/// vector-quantize-pytorch's convention: never a valid code, so a padded position cannot pass
/// for code 0, and [`decode`](crate::EmaResidualVectorQuantizer::decode) refuses it.
/// [`try_encode_masked`](crate::EmaResidualVectorQuantizer::try_encode_masked) and
/// [`try_compress_masked`](crate::EmaResidualVectorQuantizer::try_compress_masked) give and
/// code the real positions' codes only.
///
/// Finding the real positions reads the mask back to the host once per call (one
/// synchronization on a GPU).
#[derive(Debug, Clone)]
pub struct Mask {
    /// The mask, flattened in row-major order.
    values: Tensor<1, Bool>,
    /// Its shape.
    shape: Vec<usize>,
}

impl Mask {
    /// The mask `mask` over a batch's leading shape, true where a position is real.
    pub fn new<const L: usize>(mask: Tensor<L, Bool>) -> Self {
        let shape = mask.dims().to_vec();
        let len: usize = shape.iter().product();
        // Burn reads a 0 in a reshape target as "keep this dimension": an empty mask is built.
        let values = match len {
            0 => Tensor::from_data(TensorData::new(Vec::<bool>::new(), [0]), &mask.device()),
            _ => mask.reshape([len]),
        };
        Self { values, shape }
    }

    /// The mask's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The row-major indices of the real positions, `[N_real]`, on `device`, after checking
    /// that the mask covers `leading` (the input's shape but its last dimension).
    pub(crate) fn real_rows(
        &self,
        leading: &[usize],
        device: &Device,
    ) -> Result<Tensor<1, Int>, RvqError> {
        if self.shape != leading {
            return Err(RvqError::MaskShape {
                expected: leading.to_vec(),
                got: self.shape.clone(),
            });
        }
        let device = device.clone().without_autodiff();
        let real = self.values.clone().to_device(&device).argwhere(); // [N_real, 1]
        let [count, _] = real.dims();
        Ok(real.reshape([count]))
    }
}

/// Options of [`EmaResidualVectorQuantizer::try_encode_with`] and
/// [`EmaResidualVectorQuantizer::try_compress_with`]: codes chosen for their bits as well as
/// their error.
///
/// The encoder minimizes, per vector, the rate-distortion cost
/// `J = ||x - x^||^2 + lambda * bits`, where `bits` is the length of the vector's codes under
/// the entropy models [`EmaResidualVectorQuantizer::entropy_models`] builds from the EMA
/// counts (`-log2` of each code's fixed-point probability, the coder's own price):
///
/// - `lambda > 0`: at each level the code minimizing `||r - e_c||^2 + lambda * len(c)`
///   (entropy-constrained VQ, Chou, Lookabaugh and Gray 1989);
/// - `beam > 1`: the `beam` best partial codes per vector by `J` are kept from level to level
///   and the best is taken at the end (a beam search across levels);
/// - `rd_depth`: each vector stops after the level with the least `J` (at least one level),
///   and `stop_below` stops it at the first level whose error is at most that; codes past a
///   vector's depth are `-1`.
///
/// The default (`lambda = 0`, `beam = 1`, every level, no per-vector depth) gives exactly
/// [`EmaResidualVectorQuantizer::try_encode`]'s codes.
///
/// [`EmaResidualVectorQuantizer::try_encode_with`]: crate::EmaResidualVectorQuantizer::try_encode_with
/// [`EmaResidualVectorQuantizer::try_compress_with`]: crate::EmaResidualVectorQuantizer::try_compress_with
/// [`EmaResidualVectorQuantizer::try_encode`]: crate::EmaResidualVectorQuantizer::try_encode
/// [`EmaResidualVectorQuantizer::entropy_models`]: crate::EmaResidualVectorQuantizer::entropy_models
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    /// Squared error per bit, `>= 0`: how much error one bit saved is worth. Default 0.
    pub lambda: f64,
    /// Partial codes kept per vector, `>= 1` (1: greedy, level by level). Default 1.
    pub beam: usize,
    /// Levels to use, `1..=M` (`None`: all). Default `None`.
    pub max_levels: Option<usize>,
    /// Let each vector stop after the level where its cost `J` is least. Default `false`.
    pub rd_depth: bool,
    /// Stop a vector at the first level whose squared error `||x - x^||^2` is at most this
    /// (`>= 0`). Default `None`.
    pub stop_below: Option<f64>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            lambda: 0.0,
            beam: 1,
            max_levels: None,
            rd_depth: false,
            stop_below: None,
        }
    }
}

impl EncodeOptions {
    /// Greedy codes of every level, as `try_encode` gives them (same as `default()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`EncodeOptions::lambda`].
    pub fn with_lambda(mut self, lambda: f64) -> Self {
        self.lambda = lambda;
        self
    }

    /// Sets [`EncodeOptions::beam`].
    pub fn with_beam(mut self, beam: usize) -> Self {
        self.beam = beam;
        self
    }

    /// Sets [`EncodeOptions::max_levels`].
    pub fn with_max_levels(mut self, max_levels: usize) -> Self {
        self.max_levels = Some(max_levels);
        self
    }

    /// Sets [`EncodeOptions::rd_depth`].
    pub fn with_rd_depth(mut self, rd_depth: bool) -> Self {
        self.rd_depth = rd_depth;
        self
    }

    /// Sets [`EncodeOptions::stop_below`].
    pub fn with_stop_below(mut self, squared_error: f64) -> Self {
        self.stop_below = Some(squared_error);
        self
    }

    /// Whether a vector may stop before the last level.
    pub(crate) fn variable_depth(&self) -> bool {
        self.rd_depth || self.stop_below.is_some()
    }

    /// Whether these options ask for plain greedy codes (`try_encode`'s).
    pub(crate) fn is_greedy(&self) -> bool {
        self.lambda == 0.0 && self.beam == 1 && !self.variable_depth()
    }

    /// Checks `lambda`, `beam` and `stop_below` (the levels are the quantizer's to check).
    pub(crate) fn validate(&self) -> Result<(), RvqError> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(RvqError::InvalidArgument {
                argument: "lambda",
                value: self.lambda.to_string(),
                rule: "must be finite and >= 0",
            });
        }
        if self.beam == 0 {
            return Err(RvqError::InvalidArgument {
                argument: "beam",
                value: "0".into(),
                rule: "must be >= 1",
            });
        }
        if let Some(threshold) = self.stop_below
            && !(threshold.is_finite() && threshold >= 0.0)
        {
            return Err(RvqError::InvalidArgument {
                argument: "stop_below",
                value: threshold.to_string(),
                rule: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}
