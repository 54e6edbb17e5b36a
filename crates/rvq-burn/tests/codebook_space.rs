//! `codebook_dim` (learned projections in and out) and cosine codebooks beyond the interop
//! cases: training the same on every execution path, with k-means init and dead-code restarts
//! that keep the codes on the unit sphere; encode, decode and the entropy coder through the
//! projections; the defaults untouched; rate-distortion options refused for cosine codebooks.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use common::*;
use rvq_burn::{EmaResidualVectorQuantizerConfig, EncodeOptions, Execution, RvqError};

fn config(cosine: bool, codebook_dim: Option<usize>) -> EmaResidualVectorQuantizerConfig {
    EmaResidualVectorQuantizerConfig::new(3, 16.into(), 8)
        .with_cosine_similarity(cosine)
        .with_codebook_dim(codebook_dim)
        .with_kmeans_init(true)
        .with_threshold_ema_dead_code(0.5)
        .with_ema_decay(0.8)
}

/// Clustered rows `[256, 8]` of batch `step`.
fn batch(step: u64, device: &Device) -> Tensor<2> {
    let mut rng = Rng::new(91 + step);
    let centres = Rng::new(5).normal_tensor::<2>([6, 8], 0.0, 2.0, device);
    let picks: Vec<f32> = (0..256)
        .map(|i| ((i * 7 + step as usize) % 6) as f32)
        .collect();
    let picks = Tensor::<1>::from_data(burn::tensor::TensorData::new(picks, [256]), device).int();
    centres
        .select(0, picks)
        .add(rng.normal_tensor([256, 8], 0.0, 0.3, device))
}

/// The execution paths this build has: the host and tensor paths on flex, the kernel path on
/// WGPU (lavapipe in CI; `RVQ_SKIP_WGPU=1` skips it, loudly).
fn paths() -> Vec<(&'static str, Device, Execution)> {
    #[allow(unused_mut)]
    let mut paths = vec![
        ("host (flex)", Device::flex(), Execution::Auto),
        ("tensor (flex)", Device::flex(), Execution::TensorOps),
    ];
    #[cfg(feature = "wgpu")]
    match std::env::var_os("RVQ_SKIP_WGPU") {
        Some(_) => eprintln!("RVQ_SKIP_WGPU set: the kernel path's cosine training SKIPPED"),
        None => paths.push(("kernel (wgpu)", wgpu_device(), Execution::Auto)),
    }
    paths
}

/// Four training steps (k-means init on the first, dead-code restarts after) from one
/// initial layer: every path gives the same codes and restarts, states within 1e-5; cosine
/// codebooks stay of unit length, restarted codes included.
#[test]
fn cosine_and_projected_training_is_the_same_on_every_path() {
    for (cosine, codebook_dim) in [(true, None), (false, Some(4)), (true, Some(5))] {
        let what = format!("cosine {cosine}, codebook_dim {codebook_dim:?}");
        // The projections are drawn from the device's generator: seeded, so that every run
        // of the test trains the same layer.
        let device = Device::flex().autodiff();
        device.seed(17);
        let first = config(cosine, codebook_dim).init(&device);
        let mut runs = Vec::new();
        for (name, device, execution) in paths() {
            let rvq = config(cosine, codebook_dim)
                .with_execution(execution)
                .init(&device.clone().autodiff())
                .load_record(first.clone().into_record());
            let mut codes = Vec::new();
            let mut restarted = 0;
            for step in 0..4 {
                let x = batch(step, &device).autodiff();
                let out = rvq.forward(x);
                restarted += out.restarted_codes.iter().sum::<usize>();
                codes.push(out.indices.into_iter().map(ints).collect::<Vec<_>>());
            }
            rvq.sync_state();
            if cosine {
                for level in 0..rvq.num_levels() {
                    let codebook = rvq.codebook(level, &Device::flex());
                    let norms = floats(codebook.powi_scalar(2).sum_dim(1).sqrt());
                    assert!(
                        norms.iter().all(|n| (n - 1.0).abs() < 1e-5),
                        "{what}, {name}, level {level}: norms {norms:?}"
                    );
                }
            }
            assert_eq!(rvq.codebook_dim(), codebook_dim.unwrap_or(8));
            runs.push((name, codes, restarted, state_bits(&rvq)));
        }
        let (_, want_codes, want_restarted, want_state) = &runs[0];
        assert!(*want_restarted > 0, "{what}: no dead code restarted");
        for (name, codes, restarted, state) in &runs[1..] {
            assert_eq!(codes, want_codes, "{what}: codes of {name}");
            assert_eq!(restarted, want_restarted, "{what}: restarts of {name}");
            for (got, want) in state.iter().zip(want_state) {
                let (got, want): (Vec<f32>, Vec<f32>) = (
                    got.iter().map(|b| f32::from_bits(*b)).collect(),
                    want.iter().map(|b| f32::from_bits(*b)).collect(),
                );
                compare(&format!("{what}: state of {name}"), &got, &want).unwrap();
            }
        }
    }
}

/// Through the projections: `decode(encode(x))` is the evaluation forward's output, the
/// entropy coder's stream decodes to it, and the record holds the projections' parameters.
#[test]
fn encode_decode_and_streams_go_through_the_projections() {
    let device = Device::flex();
    let rvq = config(true, Some(4)).init(&device.clone().autodiff());
    for step in 0..3 {
        let _ = rvq.forward(batch(step, &device).autodiff());
    }
    let eval = rvq.valid();
    let x = batch(9, &device).reshape([4, 64, 8]);
    let codes = eval.encode(x.clone());
    let decoded = eval.decode(&codes, [4, 64, 8]);
    let forward = eval.forward(x.clone()).quantized;
    compare(
        "decode(encode(x))",
        &floats(decoded.clone()),
        &floats(forward),
    )
    .unwrap();
    let bytes = eval.try_compress(x.clone(), 3).unwrap();
    let (back, dequantized) = eval.try_decompress::<3>(&bytes, &device).unwrap();
    assert_eq!(back.len(), 3);
    compare("decompressed", &floats(dequantized), &floats(decoded)).unwrap();
    // Greedy options are today's encode; a rate-distortion search is refused, state kept.
    let greedy = eval
        .try_encode_with(x.clone(), &EncodeOptions::default())
        .unwrap();
    for (a, b) in greedy.into_iter().zip(codes) {
        assert_eq!(ints(a), ints(b));
    }
    let before = state_bits(&eval);
    let error = eval
        .try_encode_with(
            x,
            &EncodeOptions {
                beam: 4,
                ..EncodeOptions::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            error,
            RvqError::InvalidArgument {
                argument: "options",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("cosine"), "{error}");
    assert_eq!(state_bits(&eval), before);
    // The projections are the module's parameters, 4 x 8 + 4 and 8 x 4 + 8 values, beside
    // the EMA state (per level 16 counts and 16 x C sums, and the step counter).
    let state = |c: usize| 3 * (16 + 16 * c) + 1;
    assert_eq!(rvq.num_params(), 4 * 8 + 4 + 8 * 4 + 8 + state(4));
    assert_eq!(config(false, None).init(&device).num_params(), state(8));
    // codebook_dim equal to embedding_dim is no projection, as in vector-quantize-pytorch.
    assert!(config(false, Some(8)).init(&device).projection().is_none());
}

/// `codebook_dim = 0` is refused by name.
#[test]
fn a_zero_codebook_dim_is_refused() {
    let error = config(false, Some(0))
        .try_init(&Device::flex())
        .unwrap_err();
    assert!(error.to_string().contains("`codebook_dim` = 0"), "{error}");
}
