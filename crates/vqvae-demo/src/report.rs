//! The pictures a run leaves: reconstructed digits (greyscale PNG), and the codebook usage
//! and training curves as charts (plotters, with an embedded font).

use std::path::Path;
use std::sync::OnceLock;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::data::{Digits, IMAGE_PIXELS, IMAGE_SIDE};
use crate::error::DemoError;
use crate::evaluation::Validation;
use crate::metrics::EpochRecord;
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
    // The reconstruction alone, read back before anything else is computed from it (see
    // `evaluation::evaluate`).
    let reconstruction = model.reconstruct(digits.batch(&indices, &device));
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

/// The font of every chart: DejaVu Sans, embedded (no system font needed).
pub(crate) const FONT: &str = "sans-serif";

/// Registers the embedded font with plotters, once per process.
fn register_font() -> Result<(), DemoError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    match registered {
        true => Ok(()),
        false => Err(DemoError::Io(
            "the embedded DejaVu Sans font did not load".into(),
        )),
    }
}

/// What drawing a chart may fail with.
pub(crate) type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws a `width x height` chart with `draw` and writes it to `path` as an RGB PNG.
pub(crate) fn write_chart(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), DemoError> {
    register_font()?;
    let failed = |e: &dyn std::fmt::Display| DemoError::Io(format!("{}: {e}", path.display()));
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        draw(&root).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    let file = std::fs::File::create(path).map_err(|e| DemoError::io(path, e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| failed(&e))?;
    writer.write_image_data(&rgb).map_err(|e| failed(&e))?;
    writer.finish().map_err(|e| failed(&e))
}

/// `codebook_usage.png`: one panel per level (level 1 on top), its codes sorted from the most
/// to the least used over the validation set, each bar a code's number of uses on a log
/// axis; the title gives the level, how many codes were used and the perplexity.
pub fn write_codebook_usage(path: &Path, validation: &Validation) -> Result<(), DemoError> {
    let histograms = &validation.code_histograms;
    let panel = 220;
    let height = (histograms.len().max(1) * panel) as u32;
    write_chart(path, (900, height), |root| {
        for (level, (area, histogram)) in root
            .split_evenly((histograms.len().max(1), 1))
            .iter()
            .zip(histograms)
            .enumerate()
        {
            let mut sorted = histogram.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let codes = sorted.len();
            let used = sorted.iter().filter(|&&count| count > 0.0).count();
            let top = f64::from(sorted.first().copied().unwrap_or(1.0)).max(1.0);
            let perplexity = validation
                .val_perplexity
                .get(level)
                .copied()
                .unwrap_or(f64::NAN);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "level {}: {used} of {codes} codes used ({:.0} %), perplexity {perplexity:.1}",
                        level + 1,
                        100.0 * used as f64 / codes.max(1) as f64,
                    ),
                    (FONT, 17),
                )
                .margin(8)
                .x_label_area_size(34)
                .y_label_area_size(56)
                .build_cartesian_2d(0..codes.max(1), (0.5f64..top * 2.0).log_scale())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc("codes, most used first")
                .y_desc("uses")
                .y_label_formatter(&|count| format!("{count:.0}"))
                .label_style((FONT, 12))
                .axis_desc_style((FONT, 13))
                .draw()?;
            chart.draw_series(sorted.iter().enumerate().filter(|(_, c)| **c > 0.0).map(
                |(code, &count)| {
                    Rectangle::new(
                        [(code, 0.5), (code + 1, f64::from(count))],
                        BLUE.mix(0.75).filled(),
                    )
                },
            ))?;
        }
        Ok(())
    })
}

/// `training_curves.png`, per epoch: the training loss (log axis), the validation PSNR when
/// decoding with the first 1, 2, ..., M levels, and each level's codebook usage on the
/// validation set.
pub fn write_training_curves(path: &Path, records: &[EpochRecord]) -> Result<(), DemoError> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(());
    };
    let epochs = first.epoch as f64 - 0.5..last.epoch as f64 + 0.5;
    let levels = last.validation.val_psnr_db_by_levels.len();
    let epoch_labels = (last.epoch - first.epoch + 2).min(12);
    write_chart(path, (1500, 420), |root| {
        let panels = root.split_evenly((1, 3));

        let losses: Vec<f64> = records.iter().map(|r| r.train_loss).collect();
        let low = losses
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(1e-9);
        let high = losses.iter().copied().fold(0.0, f64::max).max(low * 1.01);
        let mut chart = ChartBuilder::on(&panels[0])
            .caption("training loss", (FONT, 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(epochs.clone(), (low / 1.2..high * 1.2).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(epoch_labels)
            .x_label_formatter(&whole_epochs)
            .y_desc("loss (MSE + commitment)")
            .y_label_formatter(&|loss| format!("{loss:.3}"))
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()?;
        chart.draw_series(LineSeries::new(
            records.iter().map(|r| (r.epoch as f64, r.train_loss)),
            BLUE.stroke_width(2),
        ))?;

        let psnr = records
            .iter()
            .flat_map(|r| r.validation.val_psnr_db_by_levels.iter().copied());
        let (low, high) = psnr.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let psnr_panel = PerLevelPanel {
            caption: "validation PSNR by levels decoded",
            y_desc: "PSNR (dB)",
            y_range: low - 1.0..high + 1.0,
            name: &|level| match level {
                0 => "1 level".to_string(),
                n => format!("{} levels", n + 1),
            },
            value: &|r, level| r.validation.val_psnr_db_by_levels.get(level).copied(),
        };
        psnr_panel.draw(&panels[1], records, levels, epochs.clone(), epoch_labels)?;
        let usage_panel = PerLevelPanel {
            caption: "codebook usage (validation)",
            y_desc: "codes used (%)",
            y_range: 0.0..105.0,
            name: &|level| format!("level {}", level + 1),
            value: &|r, level| Some(100.0 * r.validation.val_usage.get(level)?),
        };
        usage_panel.draw(&panels[2], records, levels, epochs, epoch_labels)?;
        Ok(())
    })
}

/// A panel of per-epoch lines, one per level, with a legend.
struct PerLevelPanel<'a> {
    caption: &'a str,
    y_desc: &'a str,
    y_range: std::ops::Range<f64>,
    /// A level's name in the legend.
    name: &'a dyn Fn(usize) -> String,
    /// A record's value for a level, if it has one.
    value: &'a dyn Fn(&EpochRecord, usize) -> Option<f64>,
}

impl PerLevelPanel<'_> {
    fn draw(
        &self,
        area: &DrawingArea<BitMapBackend<'_>, Shift>,
        records: &[EpochRecord],
        levels: usize,
        epochs: std::ops::Range<f64>,
        epoch_labels: usize,
    ) -> DrawResult {
        let mut chart = ChartBuilder::on(area)
            .caption(self.caption, (FONT, 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(epochs, self.y_range.clone())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(epoch_labels)
            .x_label_formatter(&whole_epochs)
            .y_desc(self.y_desc)
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()?;
        for level in 0..levels {
            let color = Palette99::pick(level).to_rgba();
            let color = RGBColor(color.0, color.1, color.2);
            chart
                .draw_series(LineSeries::new(
                    records
                        .iter()
                        .filter_map(|r| Some((r.epoch as f64, (self.value)(r, level)?))),
                    color.stroke_width(2),
                ))?
                .label((self.name)(level))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    }
}

/// An epoch axis label: whole epochs only.
fn whole_epochs(x: &f64) -> String {
    match x.fract() == 0.0 {
        true => format!("{x:.0}"),
        false => String::new(),
    }
}
