//! The parts of a training step, as the step reports them when each ends (what
//! `examples/step_profile.rs` times; the training loop itself listens to none:
//! [`StepPart::ignore`]), and the median both profiling examples report.

/// A part of one training step on one device, in the order the step runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPart {
    /// The encoder's convolutions.
    Encoder,
    /// The quantizer's forward (search, losses, EMA update).
    Quantizer,
    /// The decoder's convolutions and the reconstruction loss.
    DecoderAndLoss,
    /// The host reads the loop makes per step (losses, the quantizer's metrics).
    Reads,
    /// The backward pass.
    Backward,
    /// The optimizer's step (Adam).
    Optimizer,
}

impl StepPart {
    /// Every part, in order.
    pub const ALL: [Self; 6] = [
        Self::Encoder,
        Self::Quantizer,
        Self::DecoderAndLoss,
        Self::Reads,
        Self::Backward,
        Self::Optimizer,
    ];

    /// Its name in the profile's output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Encoder => "encoder",
            Self::Quantizer => "quantizer",
            Self::DecoderAndLoss => "decoder+loss",
            Self::Reads => "reads",
            Self::Backward => "backward",
            Self::Optimizer => "optimizer",
        }
    }

    /// A listener that ignores every part: the training loop's.
    pub fn ignore(_: StepPart) {}
}

/// The median of `values` (the upper one of an even count): what the profiling examples
/// report, robust to the odd slow step of a busy machine.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
