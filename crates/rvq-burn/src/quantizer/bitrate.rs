//! What the quantizer's codes cost: bits per level, the bitrate of a number of levels, and
//! the levels that fit a bitrate (EnCodec's bandwidth selection).

use super::EmaResidualVectorQuantizer;
use crate::error::RvqError;

impl EmaResidualVectorQuantizer {
    /// Bits one index of each level costs when stored plainly: `log2 K_l`.
    pub fn bits_per_level(&self) -> Vec<f64> {
        self.sizes()
            .into_iter()
            .map(|size| (size as f64).log2())
            .collect()
    }

    /// How many levels fit a budget of `bits_per_second` at `frames_per_second` quantized
    /// vectors per second, with each level's own `log2 K_l` bits per index: the most levels
    /// `n` with `frames_per_second * sum_{l < n} log2 K_l <= bits_per_second`, and at least
    /// one, as EnCodec's bandwidth selection (`n_q = max(1, floor(bandwidth / (log2 K *
    /// frame_rate)))` for one `K`). The inverse of [`EmaResidualVectorQuantizer::bitrate`].
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_levels_for_bitrate`].
    pub fn levels_for_bitrate(&self, bits_per_second: f64, frames_per_second: f64) -> usize {
        self.try_levels_for_bitrate(bits_per_second, frames_per_second)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::levels_for_bitrate`]: fails if
    /// `bits_per_second` is not finite and >= 0 or `frames_per_second` not finite and > 0.
    pub fn try_levels_for_bitrate(
        &self,
        bits_per_second: f64,
        frames_per_second: f64,
    ) -> Result<usize, RvqError> {
        if !(bits_per_second.is_finite() && bits_per_second >= 0.0) {
            return Err(RvqError::InvalidArgument {
                argument: "bits_per_second",
                value: bits_per_second.to_string(),
                rule: "must be finite and >= 0",
            });
        }
        check_frames_per_second(frames_per_second)?;
        // A budget met exactly counts, whatever the rounding of the sum of logarithms.
        let budget = bits_per_second * (1.0 + 1e-12);
        let mut bits = 0.0;
        let fitting = self
            .bits_per_level()
            .into_iter()
            .take_while(|level_bits| {
                bits += level_bits * frames_per_second;
                bits <= budget
            })
            .count();
        Ok(fitting.max(1))
    }

    /// The bitrate, in bits per second, of the plainly stored indices of the first
    /// `num_levels` levels at `frames_per_second` quantized vectors per second:
    /// `frames_per_second * sum_{l < num_levels} log2 K_l` (entropy coding, [`Self::try_compress`],
    /// takes less).
    ///
    /// # Panics
    ///
    /// On the errors of [`EmaResidualVectorQuantizer::try_bitrate`].
    pub fn bitrate(&self, num_levels: usize, frames_per_second: f64) -> f64 {
        self.try_bitrate(num_levels, frames_per_second)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Fallible [`EmaResidualVectorQuantizer::bitrate`]: fails if `num_levels` is outside
    /// `1..=M` or `frames_per_second` is not finite and > 0.
    pub fn try_bitrate(&self, num_levels: usize, frames_per_second: f64) -> Result<f64, RvqError> {
        let num_levels = self.check_num_levels(Some(num_levels))?;
        check_frames_per_second(frames_per_second)?;
        let bits: f64 = self.bits_per_level()[..num_levels].iter().sum();
        Ok(bits * frames_per_second)
    }
}

fn check_frames_per_second(frames_per_second: f64) -> Result<(), RvqError> {
    match frames_per_second.is_finite() && frames_per_second > 0.0 {
        true => Ok(()),
        false => Err(RvqError::InvalidArgument {
            argument: "frames_per_second",
            value: frames_per_second.to_string(),
            rule: "must be finite and > 0",
        }),
    }
}
