//! The pictures a run leaves: reconstructions and codebook usage, as greyscale PNG.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use rvq_burn::ForwardOptions;

use crate::data::{Digits, IMAGE_PIXELS, IMAGE_SIDE};
use crate::error::DemoError;
use crate::model::VqVae;

/// Digits per row of every picture.
pub const COLUMNS: usize = 8;
/// Pairs of rows (originals above reconstructions) in `reconstructions.png`.
pub const ROW_PAIRS: usize = 4;
/// Pixel scale.
const SCALE: usize = 2;
const GAP: usize = 2;

/// A greyscale canvas.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, background: u8) -> Self {
        Self {
            width,
            height,
            pixels: vec![background; width * height],
        }
    }

    fn set(&mut self, x: usize, y: usize, value: u8) {
        if x < self.width && y < self.height {
            self.pixels[y * self.width + x] = value;
        }
    }

    fn save(&self, path: &Path) -> Result<(), DemoError> {
        let file = std::fs::File::create(path).map_err(|e| DemoError::io(path, e))?;
        let mut encoder = png::Encoder::new(
            std::io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let to_io = |e: png::EncodingError| DemoError::Io(format!("{}: {e}", path.display()));
        let mut writer = encoder.write_header().map_err(to_io)?;
        writer.write_image_data(&self.pixels).map_err(to_io)?;
        writer.finish().map_err(to_io)
    }
}

/// `reconstructions.png`: validation digits, each row of originals above its reconstructions.
pub fn write_reconstructions(
    path: &Path,
    model: &VqVae,
    digits: &Digits,
    device: &Device,
) -> Result<(), DemoError> {
    let count = (COLUMNS * ROW_PAIRS).min(digits.len());
    let device = device.clone().without_autodiff();
    let indices: Vec<usize> = (0..count).collect();
    let model = model.valid();
    let reconstruction = model
        .forward(digits.batch(&indices, &device), &ForwardOptions::default())
        .reconstruction;
    let reconstructed = to_pixels(reconstruction);
    write_pairs(path, &digits.pixels, &reconstructed, count)
}

/// Images in `[0, 1]` (any shape) as 8-bit pixels.
pub fn to_pixels(images: Tensor<4>) -> Vec<u8> {
    images
        .into_data()
        .iter::<f32>()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

/// Draws the first `count` digits of `originals`, each row of them above the same digits of
/// `reconstructions` (both 784 bytes per digit).
pub fn write_pairs(
    path: &Path,
    originals: &[u8],
    reconstructions: &[u8],
    count: usize,
) -> Result<(), DemoError> {
    let mut rows: Vec<&[u8]> = Vec::new();
    for start in (0..count).step_by(COLUMNS) {
        let end = (start + COLUMNS).min(count);
        rows.push(&originals[start * IMAGE_PIXELS..end * IMAGE_PIXELS]);
        rows.push(&reconstructions[start * IMAGE_PIXELS..end * IMAGE_PIXELS]);
    }
    write_digit_rows(path, &rows)
}

/// Draws rows of digits one under another, `COLUMNS` (8) to a row: each entry of `rows` holds
/// up to 8 images of 784 bytes.
pub fn write_digit_rows(path: &Path, rows: &[&[u8]]) -> Result<(), DemoError> {
    let cell = IMAGE_SIDE * SCALE + GAP;
    let mut canvas = Canvas::new(COLUMNS * cell + GAP, rows.len().max(1) * cell + GAP, 128);
    for (row, images) in rows.iter().enumerate() {
        for (column, image) in images.chunks_exact(IMAGE_PIXELS).take(COLUMNS).enumerate() {
            let (top, left) = (row * cell + GAP, column * cell + GAP);
            for (p, &value) in image.iter().enumerate() {
                let (y, x) = (p / IMAGE_SIDE, p % IMAGE_SIDE);
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        canvas.set(left + x * SCALE + dx, top + y * SCALE + dy, value);
                    }
                }
            }
        }
    }
    canvas.save(path)
}

/// `codebook_usage.png`: one panel per level (level 1 on top), one bar per code, sorted from
/// the most to the least used; bar height is the code's share relative to the most used.
pub fn write_codebook_usage(path: &Path, histograms: &[Vec<f32>]) -> Result<(), DemoError> {
    const BAR: usize = 4;
    const PANEL: usize = 80;
    let widest = histograms.iter().map(Vec::len).max().unwrap_or(1);
    let mut canvas = Canvas::new(
        widest * BAR + 2 * GAP,
        histograms.len() * (PANEL + GAP) + GAP,
        255,
    );
    for (level, histogram) in histograms.iter().enumerate() {
        let mut sorted = histogram.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let max = sorted.first().copied().unwrap_or(0.0).max(1e-12);
        let bottom = (level + 1) * (PANEL + GAP);
        for x in 0..histogram.len() * BAR + 2 * GAP {
            canvas.set(x, bottom, 0); // baseline
        }
        for (code, &count) in sorted.iter().enumerate() {
            let height = ((count / max) * (PANEL - 4) as f32).round() as usize;
            let height = if count > 0.0 { height.max(1) } else { 0 };
            for dy in 1..=height {
                for dx in 0..BAR - 1 {
                    canvas.set(GAP + code * BAR + dx, bottom - dy, 60);
                }
            }
        }
    }
    canvas.save(path)
}
