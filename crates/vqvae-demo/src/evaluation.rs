//! Validation: reconstruction quality and codebook health over a whole set, in eval mode.

use burn::module::Module;
use burn::tensor::{Device, IndexingUpdateOp, Tensor};
use rvq_burn::LevelMetrics;
use serde::{Deserialize, Serialize};

use crate::data::{Digits, IMAGE_PIXELS};
use crate::model::VqVae;

/// Validation figures of one epoch (a line of `metrics.jsonl` holds them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Pixel mean squared error with all levels.
    pub val_mse: f64,
    /// `10 log10(1 / MSE)`, pixels in `[0, 1]`.
    pub val_psnr_db: f64,
    /// Per level: share of codes used at least once over the whole set.
    pub val_usage: Vec<f64>,
    /// Per level: `2^H` of the code histogram over the whole set.
    pub val_perplexity: Vec<f64>,
    /// Sum over levels of the histogram entropy in bits: bits per latent vector at the
    /// entropy bound.
    pub val_bits_per_vector: f64,
    /// PSNR when decoding with only the first 1, 2, ..., M levels.
    pub val_psnr_db_by_levels: Vec<f64>,
    /// Per level, how often each code was used over the whole set.
    #[serde(skip)]
    pub code_histograms: Vec<Vec<f32>>,
}

/// PSNR in dB of a mean squared error on `[0, 1]` pixels.
pub fn psnr_db(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// Measures `model` on `digits` in eval mode (`valid()`: no autodiff, no EMA update), in
/// batches of `batch_size` on `device`.
///
/// Each reconstruction is read back before anything else is computed from it, and its
/// squared error summed on the host in f64: on WGPU (Burn 0.22.1's fusion, seen on Mesa's
/// lavapipe) a reduction queued on the decoder's output before it was read made that output
/// itself come back wrong (README, "The demo on WGPU").
pub fn evaluate(model: &VqVae, digits: &Digits, batch_size: usize, device: &Device) -> Validation {
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let sizes = model.quantizer.sizes();
    let num_levels = sizes.len();
    let mut histograms: Vec<Tensor<1>> =
        sizes.iter().map(|&k| Tensor::zeros([k], &device)).collect();
    // Sum of squared errors when decoding with 1..=M levels.
    let mut squared_errors = vec![0.0f64; num_levels];
    let indices: Vec<usize> = (0..digits.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let images = digits.batch(chunk, &device);
        let originals = digits.floats(chunk);
        let latents = model.encode(images);
        let codes = model.quantizer.encode(latents);
        for (histogram, level_codes) in histograms.iter_mut().zip(&codes) {
            let [n] = level_codes.dims();
            *histogram = histogram.clone().select_assign(
                0,
                level_codes.clone(),
                Tensor::ones([n], &device),
                IndexingUpdateOp::Add,
            );
        }
        for (levels, sse) in squared_errors.iter_mut().enumerate() {
            let reconstruction = model.decode_codes(&codes[..=levels], chunk.len());
            let reconstruction = reconstruction.into_data();
            *sse += reconstruction
                .iter::<f32>()
                .zip(&originals)
                .map(|(r, &o)| f64::from(r - o).powi(2))
                .sum::<f64>();
        }
    }
    let pixels = (digits.len() * IMAGE_PIXELS).max(1) as f64;
    let mse_by_levels: Vec<f64> = squared_errors.iter().map(|sse| sse / pixels).collect();
    let code_histograms: Vec<Vec<f32>> = histograms
        .into_iter()
        .map(|h| h.into_data().iter::<f32>().collect())
        .collect();
    let level_metrics: Vec<LevelMetrics> = code_histograms
        .iter()
        .map(|h| LevelMetrics::from_counts(h))
        .collect();
    let val_mse = *mse_by_levels.last().expect("at least one level");
    Validation {
        val_mse,
        val_psnr_db: psnr_db(val_mse),
        val_usage: level_metrics.iter().map(|m| m.usage).collect(),
        val_perplexity: level_metrics.iter().map(|m| m.perplexity).collect(),
        val_bits_per_vector: level_metrics.iter().map(|m| m.bits_per_index).sum(),
        val_psnr_db_by_levels: mse_by_levels.iter().map(|&mse| psnr_db(mse)).collect(),
        code_histograms,
    }
}
