//! Per-call options of the forward pass.

/// Options of [`EmaResidualVectorQuantizer::forward_with`](crate::EmaResidualVectorQuantizer::forward_with).
///
/// The default is the reference behaviour: all levels, and the EMA update whenever the input
/// is on an autodiff device and the layer is not frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Whether a training forward may update the EMA statistics. `false` runs the training
    /// computation (loss, gradients, metrics) and leaves the state untouched: for all but one
    /// micro-batch of a gradient accumulation, or to train around a fixed codebook for a step.
    /// Default: `true`.
    pub update_ema: bool,
    /// Quantize with only the first `n` levels (`1 <= n <= num_levels`); the others neither
    /// contribute to the output and loss nor update. `None` uses every level. Default: `None`.
    pub num_levels: Option<usize>,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            update_ema: true,
            num_levels: None,
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
}
