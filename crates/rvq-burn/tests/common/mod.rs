//! Helpers shared by the integration tests: backends, the reference case format, comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, Statistics};
use serde::Deserialize;

/// A seeded generator of test data (SplitMix64, Box-Muller), one per test.
///
/// Tests draw from their own generator, never from a device's (`Tensor::random`): Burn keeps
/// one random generator per backend for the whole process, shared by the tests that
/// `cargo test` runs side by side, so what a test draws there depends on which tests run
/// beside it and in what order.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A tensor of normal values with mean `mean` and standard deviation `std`.
    pub fn normal_tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        mean: f64,
        std: f64,
        device: &Device,
    ) -> Tensor<D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// A tensor of values uniform in `[low, high)`.
    pub fn uniform_tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        low: f64,
        high: f64,
        device: &Device,
    ) -> Tensor<D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (low + (high - low) * self.uniform()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// `config.init(device)` with the reference's initial state (codebooks uniform in
/// `[-1/K, 1/K]`, counts one, sums equal to the codebooks) drawn from `seed` instead of the
/// device's shared random generator (see [`Rng`]).
pub fn seeded_quantizer(
    config: &EmaResidualVectorQuantizerConfig,
    device: &Device,
    seed: u64,
) -> EmaResidualVectorQuantizer {
    let rvq = config.init(device);
    let plain = device.clone().without_autodiff();
    let mut rng = Rng::new(seed);
    for (level, k) in config.sizes().into_iter().enumerate() {
        let limit = 1.0 / k as f64;
        let codebook = rng.uniform_tensor([k, config.codebook_space_dim()], -limit, limit, &plain);
        rvq.try_set_statistics(level, Tensor::ones([k], &plain), codebook)
            .expect("the reference's initial state is valid");
    }
    rvq
}

/// The CPU backends every test runs on, by name.
#[allow(deprecated)] // `ndarray` is deprecated in Burn 0.22 in favour of `flex`; users still name it.
pub fn cpu_devices() -> Vec<(&'static str, Device)> {
    vec![("flex", Device::flex()), ("ndarray", Device::ndarray())]
}

/// The WGPU device (Mesa's software Vulkan on a machine without a GPU).
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

/// Tolerance of the reference replay: `|got - want| <= 1e-5 * max(1, |want|)`.
pub fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}

/// Compares two float sequences; the error names the first offending position.
pub fn compare(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !close(g as f64, w as f64) {
            return Err(format!(
                "{what}[{i}]: got {g}, want {w} (|diff| = {:e})",
                (g - w).abs()
            ));
        }
    }
    Ok(())
}

/// Every EMA statistic of `rvq` (per level: counts, then sums), bit for bit.
pub fn state_bits(rvq: &EmaResidualVectorQuantizer) -> Vec<Vec<u32>> {
    let plain = Device::flex();
    (0..rvq.num_levels())
        .flat_map(|level| {
            let statistics = rvq.statistics(level, &plain);
            [floats(statistics.counts), floats(statistics.sums)]
        })
        .map(|values| values.iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// Every state value is finite, counts are >= 0, and the codebook equals sums / smoothed
/// counts within 1e-6 (recomputed here in f64). Returns each level's total EMA count.
pub fn assert_finite_and_consistent(rvq: &EmaResidualVectorQuantizer) -> Vec<f64> {
    let plain = Device::flex();
    let mut totals = Vec::new();
    for level in 0..rvq.num_levels() {
        let Statistics {
            counts: count,
            sums: weight,
        } = rvq.statistics(level, &plain);
        let counts = floats(count);
        let weights = floats(weight);
        assert!(
            counts.iter().all(|c| c.is_finite() && *c >= 0.0),
            "level {level}: counts not finite and >= 0"
        );
        assert!(
            weights.iter().all(|w| w.is_finite()),
            "level {level}: sums not finite"
        );
        let k = counts.len();
        let d = weights.len() / k;
        let total: f64 = counts.iter().map(|&c| c as f64).sum();
        let eps = rvq.config().epsilon;
        let got = floats(rvq.codebook(level, &plain));
        for code in 0..k {
            let smoothed = (counts[code] as f64 + eps) / (total + k as f64 * eps) * total;
            for j in 0..d {
                let want = weights[code * d + j] as f64 / smoothed;
                let g = got[code * d + j] as f64;
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "level {level} code {code}: codebook {g} vs sums / smoothed counts {want}"
                );
            }
        }
        totals.push(total);
    }
    totals
}

pub fn floats<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().iter::<f32>().collect()
}

pub fn ints(tensor: Tensor<1, Int>) -> Vec<i64> {
    tensor.into_data().iter::<i64>().collect()
}

pub fn tensor<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

pub fn tensor_dyn<const D: usize>(values: &[f32], shape: &[usize], device: &Device) -> Tensor<D> {
    let shape: [usize; D] = shape.try_into().expect("rank of the reference shape");
    tensor(values, shape, device)
}

/// `schema: rvq-reference/1`, see `fixtures/reference/README.md`.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub schema: String,
    pub name: String,
    pub config: CaseConfig,
    pub init: State,
    pub steps: Vec<Step>,
    pub encode_decode: EncodeDecode,
}

#[derive(Debug, Deserialize)]
pub struct CaseConfig {
    pub num_levels: usize,
    pub num_embeddings: Vec<usize>,
    pub embedding_dim: usize,
    pub beta: f64,
    pub ema_decay: f64,
    pub epsilon: f64,
}

#[derive(Debug, Deserialize)]
pub struct State {
    pub codebooks: Vec<Vec<f32>>,
    pub ema_counts: Vec<Vec<f32>>,
    pub ema_weights: Vec<Vec<f32>>,
}

#[derive(Debug, Deserialize)]
pub struct Step {
    pub training: bool,
    pub x_shape: Vec<usize>,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub indices: Vec<Vec<i64>>,
    pub level_losses: Vec<f64>,
    pub loss: f64,
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub gy: Vec<f32>,
    pub grad_x: Vec<f32>,
    pub state_after: State,
}

#[derive(Debug, Deserialize)]
pub struct EncodeDecode {
    pub x_shape: Vec<usize>,
    pub x: Vec<f32>,
    pub indices: Vec<Vec<i64>>,
    pub decoded: Vec<f32>,
}

/// The reference cases to replay: every `*.json` in the project's fixtures and, when
/// `RVQ_REFERENCE_DIR` is set, every `*.json` there.
pub fn reference_case_paths() -> Vec<PathBuf> {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")];
    if let Some(dir) = std::env::var_os("RVQ_REFERENCE_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    let mut paths = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot read reference directory {dir:?}: {error}"));
        let mut found: Vec<PathBuf> = entries
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        assert!(!found.is_empty(), "no *.json reference case in {dir:?}");
        found.sort();
        paths.extend(found);
    }
    paths
}

pub fn load_case(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let case: Case = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert_eq!(case.schema, "rvq-reference/1", "{path:?}: unknown schema");
    case
}
