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
