//! Degenerate and hostile input: NaN and infinity never reach the EMA statistics, empty
//! batches, one-code codebooks, inputs far above and below the codebook's scale.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, Execution};

fn device() -> Device {
    Device::flex().autodiff()
}

/// The EMA statistics and the step counter, bit for bit.
fn state(rvq: &EmaResidualVectorQuantizer) -> Vec<Vec<u32>> {
    let mut all = state_bits(rvq);
    all.push(vec![rvq.steps_taken() as u32]);
    all
}

/// The devices and execution paths a batch can run on here: the host path (flex), the
/// tensor path (flex, forced), and with `--features wgpu` the kernel path (WGPU on Mesa in CI;
/// `RVQ_SKIP_WGPU=1` skips it).
fn paths() -> Vec<(&'static str, Device, Execution)> {
    #[allow(unused_mut)]
    let mut paths = vec![
        ("host (flex)", device(), Execution::Auto),
        ("tensor (flex)", device(), Execution::TensorOps),
    ];
    #[cfg(feature = "wgpu")]
    match std::env::var_os("RVQ_SKIP_WGPU") {
        Some(_) => eprintln!("RVQ_SKIP_WGPU set: the kernel path is SKIPPED"),
        None => paths.push(("kernel (wgpu)", wgpu_device().autodiff(), Execution::Auto)),
    }
    paths
}

#[test]
fn non_finite_batches_are_skipped_reported_and_leave_the_state_untouched() {
    let mut rng = Rng::new(1);
    for (path, device, execution) in paths() {
        for config in [
            EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4),
            EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4)
                .with_threshold_ema_dead_code(0.5)
                .with_kmeans_init(true),
        ] {
            let rvq = config.with_execution(execution).init(&device);
            let before = state(&rvq);
            for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut values = vec![0.5f32; 32 * 4];
                values[17] = poison;
                let x: Tensor<2> = Tensor::from_data(TensorData::new(values, [32, 4]), &device);
                let out = rvq.forward(x);
                let metrics = out.metrics();
                assert!(metrics.update_skipped, "{path}: {poison} not reported");
                assert_eq!(metrics.named()["rvq_update_skipped"], 1.0);
                for (level, indices) in out.indices.iter().enumerate() {
                    let codes = ints(indices.clone());
                    assert!(
                        codes.iter().all(|c| (0..8).contains(c)),
                        "{path}: level {level} codes out of range: {codes:?}"
                    );
                }
                assert_eq!(state(&rvq), before, "{path}: {poison} entered the state");
            }
            // A finite batch afterwards trains as usual (k-means init included).
            let out = rvq.forward(rng.uniform_tensor([32, 4], 0.0, 1.0, &device));
            assert!(!out.metrics().update_skipped, "{path}");
            assert_ne!(state(&rvq), before, "{path}");
            assert_eq!(rvq.steps_taken(), 1, "{path}");
        }
    }
}

#[test]
fn an_empty_batch_gives_an_empty_output_zero_loss_and_no_update() {
    let device = device();
    let rvq = EmaResidualVectorQuantizerConfig::new(3, 8.into(), 4).init(&device);
    let before = state(&rvq);
    let x = Tensor::<3>::zeros([0, 5, 4], &device);
    let out = rvq.forward(x);
    assert_eq!(out.quantized.dims(), [0, 5, 4]);
    assert_eq!(out.indices.len(), 3);
    assert!(out.indices.iter().all(|i| i.dims() == [0]));
    assert_eq!(floats(out.loss.clone().without_autodiff()), vec![0.0]);
    assert_eq!(out.metrics().levels[0].usage, 0.0);
    assert_eq!(state(&rvq), before);
    let decoded = rvq.decode(&rvq.encode(Tensor::<2>::zeros([0, 4], &device)), [0, 4]);
    assert_eq!(decoded.dims(), [0, 4]);
}

#[test]
fn a_codebook_of_one_code_works() {
    let device = device();
    let rvq = EmaResidualVectorQuantizerConfig::new(2, 1.into(), 3).init(&device);
    let mut rng = Rng::new(2);
    for _ in 0..5 {
        let out = rvq.forward(rng.normal_tensor([10, 3], 2.0, 0.1, &device));
        assert!(
            out.indices
                .iter()
                .all(|i| ints(i.clone()).iter().all(|&c| c == 0))
        );
        assert_eq!(out.metrics().levels[0].usage, 1.0);
    }
    // The single code follows the data's mean.
    let code = floats(rvq.codebook(0, &Device::flex()));
    assert!(code.iter().all(|v| v.is_finite() && *v > 0.0));
}

/// The nearest code by brute force in f64.
fn brute_force(codebook: &[f32], x: &[f32], d: usize) -> Vec<i64> {
    x.chunks(d)
        .map(|row| {
            let distance = |code: &[f32]| -> f64 {
                row.iter()
                    .zip(code)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum()
            };
            let mut best = (0, f64::INFINITY);
            for (k, code) in codebook.chunks(d).enumerate() {
                let dist = distance(code);
                if dist < best.1 {
                    best = (k, dist);
                }
            }
            best.0 as i64
        })
        .collect()
}

#[test]
fn inputs_far_above_and_below_the_codebook_scale_quantize_correctly() {
    let device = device();
    let plain = Device::flex();
    for scale in [1e6f64, 1e-6] {
        let rvq = EmaResidualVectorQuantizerConfig::new(2, 16.into(), 4)
            .with_kmeans_init(true)
            .init(&device);
        let mut rng = Rng::new(3);
        for step in 0..10 {
            let x = rng.normal_tensor([128, 4], 0.0, scale, &device);
            let codebook = floats(rvq.codebook(0, &plain));
            let out = rvq.forward(x.clone());
            if step == 0 {
                continue; // k-means replaced the codebook inside this step
            }
            let want = brute_force(&codebook, &floats(x.clone().without_autodiff()), 4);
            let got = ints(out.indices[0].clone());
            // Ties in f32 may differ from f64; anything else must not.
            let agree = got.iter().zip(&want).filter(|(g, w)| g == w).count();
            assert!(
                agree >= 126,
                "scale {scale}: {agree}/128 agree with brute force"
            );
            let error = out
                .quantized
                .sub(x)
                .powi_scalar(2)
                .mean()
                .into_scalar::<f32>() as f64;
            assert!(
                error.is_finite() && error < scale * scale,
                "scale {scale}: mse {error}"
            );
        }
        for level in 0..rvq.num_levels() {
            let statistics = rvq.statistics(level, &plain);
            assert!(floats(statistics.counts).iter().all(|v| v.is_finite()));
            assert!(floats(statistics.sums).iter().all(|v| v.is_finite()));
        }
        assert!(
            floats(rvq.codebook(1, &plain))
                .iter()
                .all(|v| v.is_finite())
        );
        let _ = rvq.valid();
    }
}
