//! The trained VQ-VAE as an image codec: digits -> codes -> entropy-coded stream -> digits.
//!
//! `compress` encodes digits with a run's last checkpoint, codes the indices of the first `n`
//! levels with the quantizer's EMA counts as the prior (`rvq_burn::coding`), writes the
//! stream, then decodes that file again to check the round trip and to measure the PSNR.
//! `decompress` turns a stream back into a PNG of digits.

use std::fs;
use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Device;
use rvq_burn::LevelMetrics;
use rvq_burn::coding::{indices_to_device, indices_to_host};

use crate::checkpoint;
use crate::data::{Digits, IMAGE_PIXELS, Mnist, parse_images};
use crate::error::DemoError;
use crate::evaluation::psnr_db;
use crate::model::{LATENT_SIDE, VqVae};
use crate::report::{COLUMNS, to_pixels, write_digit_rows, write_pairs};
use crate::training::TrainingConfig;

/// Latent positions per image.
const POSITIONS: usize = LATENT_SIDE * LATENT_SIDE;
/// Images per forward pass.
const BATCH: usize = 256;
/// Rows of digits (originals above reconstructions) in the pictures.
const PICTURE_ROWS: usize = 4;

/// What `compress` reads and writes.
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// A training run's output directory (config.json, checkpoint/).
    pub run: PathBuf,
    /// Digits from this IDX images file (raw or .gz) instead of the validation digits.
    pub idx: Option<PathBuf>,
    /// Only the first this many digits.
    pub images: Option<usize>,
    /// Code the first this many levels (all if `None`).
    pub levels: Option<usize>,
    /// The stream file to write.
    pub output: PathBuf,
    /// Where to draw originals above their reconstructions from the stream.
    pub picture: PathBuf,
}

/// What `compress` measured.
#[derive(Debug, Clone)]
pub struct CompressReport {
    /// Digits coded.
    pub images: usize,
    /// Levels coded.
    pub levels: usize,
    /// Size of the stream file.
    pub stream_bytes: usize,
    /// Size of its payload (ANS words), in bits.
    pub payload_bits: f64,
    /// Cross-entropy of the codes under the EMA model: what an ideal coder would need.
    pub cross_entropy_bits: f64,
    /// Empirical entropy of the codes (each level's histogram over these digits).
    pub empirical_entropy_bits: f64,
    /// `N * sum_l log2 K_l`: the indices stored as fixed-length fields.
    pub fixed_length_bits: f64,
    /// PSNR of the digits decoded from the stream file.
    pub psnr_db: f64,
}

impl CompressReport {
    /// Stream bits per digit.
    pub fn bits_per_image(&self) -> f64 {
        8.0 * self.stream_bytes as f64 / self.images as f64
    }

    /// Raw 8-bit pixels over the stream.
    pub fn ratio_to_raw(&self) -> f64 {
        (self.images * IMAGE_PIXELS * 8) as f64 / (8.0 * self.stream_bytes as f64)
    }

    /// Fixed-length indices (`log2 K` bits each) over the stream.
    pub fn ratio_to_fixed_length(&self) -> f64 {
        self.fixed_length_bits / (8.0 * self.stream_bytes as f64)
    }

    /// How far the payload is above the cross-entropy, in percent.
    pub fn payload_overhead_percent(&self) -> f64 {
        100.0 * (self.payload_bits / self.cross_entropy_bits - 1.0)
    }

    /// The lines `compress` prints.
    pub fn summary(&self) -> String {
        let per_image = |bits: f64| bits / self.images as f64;
        format!(
            "{} digits, {} levels -> {} bytes: {:.1} bits per digit\n\
             ratio {:.1}x against raw 8-bit pixels, {:.2}x against {:.0} bits of fixed-length \
             indices per digit\n\
             payload {:.1} bits/digit = cross-entropy under the EMA counts {:.1} bits/digit \
             {:+.3}%; empirical entropy of these codes {:.1} bits/digit\n\
             PSNR of the digits decoded from the file: {:.2} dB",
            self.images,
            self.levels,
            self.stream_bytes,
            self.bits_per_image(),
            self.ratio_to_raw(),
            self.ratio_to_fixed_length(),
            per_image(self.fixed_length_bits),
            per_image(self.payload_bits),
            per_image(self.cross_entropy_bits),
            self.payload_overhead_percent(),
            per_image(self.empirical_entropy_bits),
            self.psnr_db,
        )
    }
}

/// The model of a training run: its config.json and its last checkpoint, on `device`, in
/// evaluation mode.
pub fn load_trained(run: &Path, device: &Device) -> Result<VqVae, DemoError> {
    let config_path = run.join("config.json");
    let config = TrainingConfig::load(&config_path).map_err(|e| {
        DemoError::Checkpoint(format!(
            "{}: {e} (train first: cargo run --release --example train -- --out {})",
            config_path.display(),
            run.display()
        ))
    })?;
    let epoch = checkpoint::last_epoch(run)?.ok_or_else(|| {
        DemoError::Checkpoint(format!(
            "no checkpoint in {}",
            checkpoint::dir(run).display()
        ))
    })?;
    let model = checkpoint::load_model(config.model.try_init(device)?, run, epoch)?;
    Ok(model.valid())
}

/// The digits to code: an IDX file's, or the embedded validation digits.
fn source_digits(options: &CompressOptions) -> Result<Digits, DemoError> {
    let digits = match &options.idx {
        Some(path) => {
            let bytes = fs::read(path).map_err(|e| DemoError::io(path, e))?;
            let pixels = parse_images(&path.display().to_string(), &bytes)?;
            let labels = vec![0; pixels.len() / IMAGE_PIXELS];
            Digits { pixels, labels }
        }
        None => Mnist::embedded().valid,
    };
    let digits = digits.take(options.images.unwrap_or(usize::MAX));
    if digits.is_empty() {
        return Err(DemoError::Config("no digits to compress".into()));
    }
    Ok(digits)
}

/// Digits decoded from per-level indices (`49` per digit), as bytes.
fn decode_digits(model: &VqVae, indices: &[Vec<u32>], device: &Device) -> Vec<u8> {
    let images = indices[0].len() / POSITIONS;
    let mut pixels = Vec::with_capacity(images * IMAGE_PIXELS);
    for start in (0..images).step_by(BATCH) {
        let end = (start + BATCH).min(images);
        let batch: Vec<Vec<u32>> = indices
            .iter()
            .map(|level| level[start * POSITIONS..end * POSITIONS].to_vec())
            .collect();
        let codes = indices_to_device(&batch, device);
        pixels.extend(to_pixels(model.decode_codes(&codes, end - start)));
    }
    pixels
}

/// Encodes, codes, writes, reads back, decodes and measures.
pub fn compress(options: &CompressOptions, device: &Device) -> Result<CompressReport, DemoError> {
    let model = load_trained(&options.run, device)?;
    let quantizer = &model.quantizer;
    let levels = options.levels.unwrap_or(quantizer.num_levels());
    let digits = source_digits(options)?;
    let images = digits.len();

    let mut indices: Vec<Vec<u32>> = vec![Vec::with_capacity(images * POSITIONS); levels];
    for start in (0..images).step_by(BATCH) {
        let batch: Vec<usize> = (start..(start + BATCH).min(images)).collect();
        let latents = model.encode(digits.batch(&batch, device));
        for (all, level) in indices
            .iter_mut()
            .zip(indices_to_host(quantizer.try_encode(latents, levels)?)?)
        {
            all.extend(level);
        }
    }
    let models = quantizer.entropy_models()?;
    let shape = [images, LATENT_SIDE, LATENT_SIDE, quantizer.embedding_dim()];
    let stream = models.compress(&indices, &shape)?;
    fs::write(&options.output, &stream).map_err(|e| DemoError::io(&options.output, e))?;

    // Read the file back: the round trip must be exact, and the PSNR is the file's.
    let written = fs::read(&options.output).map_err(|e| DemoError::io(&options.output, e))?;
    let decoded = models.decompress(&written)?;
    if decoded.indices != indices || decoded.shape != shape {
        return Err(DemoError::Codec(format!(
            "{} did not decode to the codes that were written",
            options.output.display()
        )));
    }
    let pixels = decode_digits(&model, &decoded.indices, device);
    let mse = pixels
        .iter()
        .zip(&digits.pixels)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2) / (255.0 * 255.0))
        .sum::<f64>()
        / pixels.len() as f64;
    let shown = (PICTURE_ROWS * COLUMNS).min(images);
    write_pairs(&options.picture, &digits.pixels, &pixels, shown)?;

    Ok(CompressReport {
        images,
        levels,
        stream_bytes: written.len(),
        payload_bits: decoded.payload_bits as f64,
        cross_entropy_bits: models.cross_entropy_bits(&indices),
        empirical_entropy_bits: indices
            .iter()
            .zip(quantizer.sizes())
            .map(|(codes, size)| empirical_entropy_bits(codes, size))
            .sum(),
        fixed_length_bits: (images * POSITIONS) as f64
            * quantizer.bits_per_level()[..levels].iter().sum::<f64>(),
        psnr_db: psnr_db(mse),
    })
}

/// `len * H` of the histogram of `codes` over `0..size` (`H` as the quantizer's metrics
/// compute it).
fn empirical_entropy_bits(codes: &[u32], size: usize) -> f64 {
    let mut histogram = vec![0f32; size];
    for &code in codes {
        histogram[code as usize] += 1.0;
    }
    codes.len() as f64 * LevelMetrics::from_counts(&histogram).bits_per_index
}

/// Decodes the stream file `input` with the run's checkpoint and draws the digits into
/// `picture`. Returns the number of digits and the stream's bits per digit.
pub fn decompress(
    run: &Path,
    input: &Path,
    picture: &Path,
    device: &Device,
) -> Result<(usize, f64), DemoError> {
    let model = load_trained(run, device)?;
    let bytes = fs::read(input).map_err(|e| DemoError::io(input, e))?;
    let stream = model.quantizer.entropy_models()?.decompress(&bytes)?;
    let expected = [
        stream.num_vectors() / POSITIONS,
        LATENT_SIDE,
        LATENT_SIDE,
        model.quantizer.embedding_dim(),
    ];
    if stream.shape != expected {
        return Err(DemoError::Config(format!(
            "{}: holds codes of shape {:?}, expected [images, {LATENT_SIDE}, {LATENT_SIDE}, {}] \
             (digit latents)",
            input.display(),
            stream.shape,
            model.quantizer.embedding_dim()
        )));
    }
    let images = expected[0];
    let pixels = decode_digits(&model, &stream.indices, device);
    let rows: Vec<&[u8]> = pixels
        .chunks(COLUMNS * IMAGE_PIXELS)
        .take(2 * PICTURE_ROWS)
        .collect();
    write_digit_rows(picture, &rows)?;
    Ok((images, 8.0 * bytes.len() as f64 / images.max(1) as f64))
}
