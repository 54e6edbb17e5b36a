//! The rate-distortion curve of a trained run (`rd-curve`): the validation digits coded into
//! one stream each way, and the PSNR of what each stream decodes to against its bits per
//! pixel.
//!
//! - `prefix`: the greedy codes of the first 1, 2, ..., M levels (what `compress --levels m`
//!   writes);
//! - `rd`: rate-distortion encoding ([`EncodeOptions`]) of all M levels, with a depth per
//!   latent vector, over a sweep of lambda, with a beam of 1 and of 4.
//!
//! Lambda is the latent squared error one bit is worth. The sweep is centred on the greedy
//! prefixes' own exchange rate: the latent error the levels past the first remove, over the
//! bits they cost, times `2^-8 .. 2^5`. The encoder minimizes the error of the latents; the
//! PSNR is of the digits the decoder draws from them, 8-bit pixels as `compress` writes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use plotters::prelude::*;
use rvq_burn::EncodeOptions;
use rvq_burn::coding::codes_to_host;
use serde::Serialize;

use crate::codec::load_trained;
use crate::data::{IMAGE_PIXELS, Mnist};
use crate::error::DemoError;
use crate::evaluation::psnr_db;
use crate::model::{LATENT_SIDE, VqVae};
use crate::report::{FONT, to_pixels, write_chart};

/// Images per forward pass.
const BATCH: usize = 256;
/// Beam widths of the `rd` lines.
const BEAMS: [usize; 2] = [1, 4];
/// Lambda is swept over the prefixes' exchange rate times `2^k` for these `k`.
const LAMBDA_STEPS: std::ops::RangeInclusive<i32> = -8..=5;

/// What `rd-curve` reads and writes.
#[derive(Debug, Clone)]
pub struct RdCurveOptions {
    /// A training run's output directory (config.json, checkpoint/).
    pub run: PathBuf,
    /// Only the first this many validation digits.
    pub images: Option<usize>,
    /// Where `rd_curve.jsonl` and `rd_curve.png` go.
    pub out: PathBuf,
}

/// One point of the curve: one line of `rd_curve.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct RdPoint {
    /// `"prefix"` or `"rd"`.
    pub method: &'static str,
    /// Levels coded (at most, for `rd`).
    pub levels: usize,
    /// Lambda (0 for `prefix`).
    pub lambda: f64,
    /// Beam width (1 for `prefix`).
    pub beam: usize,
    /// Size of the validation set's stream.
    pub bytes: usize,
    /// `8 bytes / (images 784)`.
    pub bits_per_pixel: f64,
    /// PSNR of the digits decoded from the stream.
    pub psnr_db: f64,
}

/// The curve, and what the summary reads off it.
#[derive(Debug, Clone)]
pub struct RdCurve {
    /// Digits coded.
    pub images: usize,
    /// Every point, prefixes first.
    pub points: Vec<RdPoint>,
}

impl RdCurve {
    /// The points of `method` with `beam`, by rate.
    fn line(&self, method: &str, beam: usize) -> Vec<&RdPoint> {
        let mut line: Vec<&RdPoint> = self
            .points
            .iter()
            .filter(|p| p.method == method && p.beam == beam)
            .collect();
        line.sort_by(|a, b| a.bits_per_pixel.total_cmp(&b.bits_per_pixel));
        line
    }

    /// The best PSNR an `rd` line with `beam` reaches at `bits_per_pixel` (the frontier of its
    /// points, linear between them), if that rate is within its range.
    pub fn rd_psnr_at(&self, beam: usize, bits_per_pixel: f64) -> Option<f64> {
        interpolate(
            &frontier(&self.line("rd", beam)),
            bits_per_pixel,
            |p| p.0,
            |p| p.1,
        )
    }

    /// The rate an `rd` line with `beam` needs for `psnr_db`, if within its range.
    pub fn rd_bits_per_pixel_for(&self, beam: usize, psnr_db: f64) -> Option<f64> {
        interpolate(&frontier(&self.line("rd", beam)), psnr_db, |p| p.1, |p| p.0)
    }

    /// Per greedy prefix of 2 or more levels and per beam: the gain in dB at its rate and the
    /// bytes saved at its PSNR.
    pub fn summary(&self) -> String {
        let mut lines = vec![format!(
            "{} digits; method levels lambda beam: bytes, bits/pixel, PSNR",
            self.images
        )];
        for p in &self.points {
            lines.push(format!(
                "  {:6} {} {:9.5} {}: {:6} bytes  {:.4} bpp  {:.2} dB",
                p.method, p.levels, p.lambda, p.beam, p.bytes, p.bits_per_pixel, p.psnr_db
            ));
        }
        let bytes_per_bpp = self.images as f64 * IMAGE_PIXELS as f64 / 8.0;
        for prefix in self.line("prefix", 1) {
            for beam in BEAMS {
                let gain = self
                    .rd_psnr_at(beam, prefix.bits_per_pixel)
                    .map_or("outside the rd line's rates".to_string(), |psnr| {
                        format!("{:+.2} dB", psnr - prefix.psnr_db)
                    });
                let saved = self.rd_bits_per_pixel_for(beam, prefix.psnr_db).map_or(
                    "outside the rd line's PSNRs".to_string(),
                    |bpp| {
                        let bytes = bpp * bytes_per_bpp;
                        format!(
                            "{:.0} bytes saved ({:.1} %)",
                            prefix.bytes as f64 - bytes,
                            100.0 * (1.0 - bytes / prefix.bytes as f64)
                        )
                    },
                );
                lines.push(format!(
                    "prefix of {} levels ({:.4} bpp, {:.2} dB) against rd beam {beam}: {gain} at \
                     its rate; {saved} at its PSNR",
                    prefix.levels, prefix.bits_per_pixel, prefix.psnr_db
                ));
            }
        }
        lines.join("\n")
    }
}

/// The points no other point beats at a lower or equal rate: `(bits per pixel, PSNR)`, by
/// rate, PSNR rising.
fn frontier(line: &[&RdPoint]) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    for p in line {
        if points.last().is_none_or(|&(_, best)| p.psnr_db > best) {
            points.push((p.bits_per_pixel, p.psnr_db));
        }
    }
    points
}

/// `y` at `x` on the polyline `points` (rising in `x` and in `y`), if within its range.
fn interpolate(
    points: &[(f64, f64)],
    x: f64,
    by: impl Fn(&(f64, f64)) -> f64,
    value: impl Fn(&(f64, f64)) -> f64,
) -> Option<f64> {
    points.windows(2).find_map(|pair| {
        let (a, b) = (by(&pair[0]), by(&pair[1]));
        (a <= x && x <= b).then(|| {
            let t = if b > a { (x - a) / (b - a) } else { 0.0 };
            value(&pair[0]) + t * (value(&pair[1]) - value(&pair[0]))
        })
    })
}

/// A point of the curve with the latent error it reached.
struct Coded {
    point: RdPoint,
    /// `sum ||z - z^||^2` over the latent vectors.
    latent_error: f64,
}

/// Codes every digit's latents by `options`, writes nothing, and measures.
fn code(
    model: &VqVae,
    latents: &[Tensor<4>],
    originals: &[u8],
    options: &EncodeOptions,
    method: &'static str,
) -> Result<Coded, DemoError> {
    let quantizer = &model.quantizer;
    let models = quantizer.entropy_models()?;
    let levels = options.max_levels.unwrap_or(quantizer.num_levels());
    let mut codes: Vec<Vec<u32>> = vec![Vec::new(); levels];
    let mut pixels = Vec::with_capacity(originals.len());
    let mut latent_error = 0.0;
    let mut images = 0;
    for batch in latents {
        let shape = batch.dims();
        let chosen = quantizer.try_encode_with(batch.clone(), options)?;
        let decoded = quantizer.try_decode_partial(&chosen, shape)?;
        latent_error += batch
            .clone()
            .sub(decoded.clone())
            .into_data()
            .iter::<f32>()
            .map(|v| f64::from(v) * f64::from(v))
            .sum::<f64>();
        pixels.extend(to_pixels(model.decode(decoded)));
        for (all, level) in codes.iter_mut().zip(codes_to_host(chosen)) {
            all.extend(level);
        }
        images += shape[0];
    }
    let shape = [images, LATENT_SIDE, LATENT_SIDE, quantizer.embedding_dim()];
    let stream = models.compress(&codes, &shape)?;
    if models.decompress(&stream)?.indices != codes {
        return Err(DemoError::Codec(format!(
            "{method} stream ({options:?}) did not decode to its codes"
        )));
    }
    let mse = pixels
        .iter()
        .zip(originals)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2) / (255.0 * 255.0))
        .sum::<f64>()
        / pixels.len() as f64;
    Ok(Coded {
        point: RdPoint {
            method,
            levels,
            lambda: options.lambda,
            beam: options.beam,
            bytes: stream.len(),
            bits_per_pixel: 8.0 * stream.len() as f64 / (images * IMAGE_PIXELS) as f64,
            psnr_db: psnr_db(mse),
        },
        latent_error,
    })
}

/// Measures the curve of a run on its validation digits, writes `rd_curve.jsonl` and
/// `rd_curve.png` into `options.out`.
pub fn rd_curve(options: &RdCurveOptions, device: &Device) -> Result<RdCurve, DemoError> {
    let model = load_trained(&options.run, device)?;
    let digits = Mnist::embedded()
        .valid
        .take(options.images.unwrap_or(usize::MAX));
    let images = digits.len();
    if images == 0 {
        return Err(DemoError::Config("rd-curve: no digits to code".into()));
    }
    let latents: Vec<Tensor<4>> = (0..images)
        .step_by(BATCH)
        .map(|start| {
            let batch: Vec<usize> = (start..(start + BATCH).min(images)).collect();
            model.encode(digits.batch(&batch, device))
        })
        .collect();
    let levels = model.quantizer.num_levels();
    let prefixes = (1..=levels)
        .map(|m| {
            let options = EncodeOptions::new().with_max_levels(m);
            code(&model, &latents, &digits.pixels, &options, "prefix")
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The prefixes' exchange rate: latent error removed per bit by the levels past the first.
    let (first, last) = (&prefixes[0], &prefixes[levels - 1]);
    let bits = 8.0 * (last.point.bytes as f64 - first.point.bytes as f64);
    let scale = match (first.latent_error - last.latent_error) / bits {
        rate if rate.is_finite() && rate > 0.0 => rate,
        _ => 1e-3,
    };
    let mut points: Vec<RdPoint> = prefixes.into_iter().map(|c| c.point).collect();
    for beam in BEAMS {
        for step in LAMBDA_STEPS {
            let options = EncodeOptions::new()
                .with_lambda(scale * 2f64.powi(step))
                .with_beam(beam)
                .with_rd_depth(true);
            points.push(code(&model, &latents, &digits.pixels, &options, "rd")?.point);
        }
    }
    let curve = RdCurve { images, points };
    fs::create_dir_all(&options.out).map_err(|e| DemoError::io(&options.out, e))?;
    write_jsonl(&options.out.join("rd_curve.jsonl"), &curve.points)?;
    write_rd_chart(&options.out.join("rd_curve.png"), &curve)?;
    Ok(curve)
}

fn write_jsonl(path: &Path, points: &[RdPoint]) -> Result<(), DemoError> {
    let mut file = fs::File::create(path).map_err(|e| DemoError::io(path, e))?;
    for point in points {
        let line = serde_json::to_string(point).expect("a point serializes");
        writeln!(file, "{line}").map_err(|e| DemoError::io(path, e))?;
    }
    Ok(())
}

/// `rd_curve.png`: PSNR against bits per pixel, a line per method.
fn write_rd_chart(path: &Path, curve: &RdCurve) -> Result<(), DemoError> {
    let all = &curve.points;
    let (x_low, x_high) = all.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.bits_per_pixel), hi.max(p.bits_per_pixel))
    });
    let (y_low, y_high) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.psnr_db), hi.max(p.psnr_db))
        });
    let lines: Vec<(String, Vec<&RdPoint>, RGBColor)> = [
        (
            "greedy, first m levels".to_string(),
            curve.line("prefix", 1),
            BLUE,
        ),
        (
            "rate-distortion, beam 1".to_string(),
            curve.line("rd", 1),
            RED,
        ),
        (
            "rate-distortion, beam 4".to_string(),
            curve.line("rd", 4),
            GREEN,
        ),
    ]
    .into_iter()
    .collect();
    write_chart(path, (900, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "rate-distortion, {} validation digits (one stream each)",
                    curve.images
                ),
                (FONT, 20),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_low * 0.95..x_high * 1.05, y_low - 0.5..y_high + 0.5)?;
        chart
            .configure_mesh()
            .x_desc("bits per pixel (stream bytes x 8 / pixels)")
            .y_desc("PSNR (dB)")
            .x_label_formatter(&|x| format!("{x:.3}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        for (name, line, color) in lines {
            let at = |p: &&RdPoint| (p.bits_per_pixel, p.psnr_db);
            chart
                .draw_series(LineSeries::new(line.iter().map(at), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(line.iter().map(|p| Circle::new(at(p), 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}
