//! The quantizer as a Burn module: state that optimizers never touch and records save,
//! train/eval switching, clones, fewer levels, and errors that leave the state unchanged.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use rvq_burn::{
    EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, ForwardOptions, RvqError,
};

fn device() -> Device {
    Device::flex()
}

fn quantizer(device: &Device, seed: u64) -> EmaResidualVectorQuantizer {
    seeded_quantizer(
        &EmaResidualVectorQuantizerConfig::new(3, vec![16, 8, 4].into(), 6),
        device,
        seed,
    )
}

fn random<const D: usize>(rng: &mut Rng, shape: [usize; D], device: &Device) -> Tensor<D> {
    rng.normal_tensor(shape, 0.0, 0.3, device)
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rvq-burn-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[derive(Module, Debug)]
struct Net {
    projection: Linear,
    rvq: EmaResidualVectorQuantizer,
}

#[test]
fn optimizer_trains_the_weights_and_never_the_quantizer_state() {
    let mut rng = Rng::new(1);
    let device = device().autodiff();
    let mut net = Net {
        projection: LinearConfig::new(5, 6).init(&device),
        rvq: quantizer(&device, 1),
    };
    let mut optimizer = AdamConfig::new().init();
    for _ in 0..3 {
        let x = random(&mut rng, [32, 5], &device);
        let out = net.rvq.forward(net.projection.forward(x));
        let loss = out.quantized.powi_scalar(2).mean().add(out.loss);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        // Only the Linear's weight and bias have gradients.
        assert_eq!(grads.len(), 2);
        net.rvq.sync_state();
        let state = state_bits(&net.rvq);
        let weight = floats(net.projection.weight.val());
        net = optimizer.step(1e-2, net, grads);
        assert_eq!(
            state_bits(&net.rvq),
            state,
            "Adam changed the quantizer state"
        );
        assert_ne!(
            floats(net.projection.weight.val()),
            weight,
            "Adam did not train"
        );
    }
}

#[test]
fn save_right_after_a_training_step_restores_the_post_step_state() {
    let mut rng = Rng::new(2);
    let device = device().autodiff();
    let rvq = quantizer(&device, 2);
    let x = random(&mut rng, [40, 6], &device);
    let _ = rvq.forward(x.clone());
    // RunningState defers the update: flush it, then save.
    rvq.sync_state();
    let after_step = state_bits(&rvq);
    let path = temp_path("after-step.bpk");
    rvq.clone().save_file(&path).unwrap();

    let fresh = quantizer(&device, 99);
    assert_ne!(state_bits(&fresh), after_step);
    let loaded = fresh.load_file(&path);
    assert_eq!(state_bits(&loaded), after_step);

    // Same state, same next step: outputs, indices and the state after it.
    let next = random(&mut rng, [40, 6], &device);
    let a = rvq.forward(next.clone());
    let b = loaded.forward(next);
    assert_eq!(floats(a.quantized), floats(b.quantized));
    for (ia, ib) in a.indices.into_iter().zip(b.indices) {
        assert_eq!(ints(ia), ints(ib));
    }
    rvq.sync_state();
    loaded.sync_state();
    assert_eq!(state_bits(&rvq), state_bits(&loaded));
}

#[test]
fn clones_share_state_and_valid_copies_are_independent() {
    let mut rng = Rng::new(3);
    let device = device().autodiff();
    let rvq = quantizer(&device, 4);
    let eval = rvq.valid();
    let before = state_bits(&rvq);

    // A training forward through a clone updates the original (RunningState is shared).
    let _ = rvq.clone().forward(random(&mut rng, [30, 6], &device));
    let after = state_bits(&rvq);
    assert_ne!(after, before);
    // The valid() copy taken before is unaffected...
    assert_eq!(state_bits(&eval), before);
    // ...and never updates, even with an autodiff input.
    let _ = eval.forward(random(&mut rng, [30, 6], &device));
    assert_eq!(state_bits(&eval), before);
    assert_eq!(state_bits(&rvq), after);
}

#[test]
fn frozen_or_non_updating_forwards_keep_the_state_and_still_train_the_input() {
    let mut rng = Rng::new(4);
    let device = device().autodiff();
    let rvq = quantizer(&device, 5);
    let before = state_bits(&rvq);

    let x = random(&mut rng, [30, 6], &device).require_grad();
    let out = rvq.forward_with(x.clone(), &ForwardOptions::new().with_update_ema(false));
    assert_eq!(state_bits(&rvq), before, "update_ema = false updated");
    let grads = out.loss.backward();
    let grad = floats(x.grad(&grads).expect("commitment gradient"));
    assert!(grad.iter().any(|g| *g != 0.0));

    let frozen = rvq.freeze();
    let x = random(&mut rng, [30, 6], &device).require_grad();
    let out = frozen.forward(x.clone());
    assert_eq!(state_bits(&frozen), before, "a frozen quantizer updated");
    assert!(x.grad(&out.loss.backward()).is_some());

    // Plain (non-autodiff) inputs are evaluation: no update.
    let _ = frozen.clone().train().forward(random(
        &mut rng,
        [30, 6],
        &device.clone().without_autodiff(),
    ));
    assert_eq!(state_bits(&frozen), before);
}

#[test]
fn decay_one_freezes_the_codebook() {
    let mut rng = Rng::new(5);
    let device = device().autodiff();
    let rvq = seeded_quantizer(
        &EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4).with_ema_decay(1.0),
        &device,
        5,
    );
    let before = state_bits(&rvq);
    for _ in 0..3 {
        let _ = rvq.forward(random(&mut rng, [20, 4], &device));
    }
    assert_eq!(state_bits(&rvq), before);
}

#[test]
fn decode_of_encode_is_the_eval_forward_at_every_rank_and_level_count() {
    let mut rng = Rng::new(6);
    let device = device();
    let rvq = quantizer(&device, 6);
    // A few training steps so the codebooks are not the initial ones.
    let autodiff = device.clone().autodiff();
    for _ in 0..3 {
        let _ = rvq.forward(random(&mut rng, [64, 6], &autodiff));
    }
    let eval = rvq.valid();

    let x3 = random(&mut rng, [2, 5, 6], &device);
    let forward = eval.forward(x3.clone());
    assert_eq!(forward.quantized.dims(), [2, 5, 6]);
    let codes = eval.encode(x3.clone());
    assert_eq!(codes.len(), 3);
    for (level, code) in codes.iter().enumerate() {
        assert_eq!(ints(code.clone()), ints(forward.indices[level].clone()));
        let k = rvq.sizes()[level] as i64;
        assert!(ints(code.clone()).iter().all(|&i| (0..k).contains(&i)));
    }
    let decoded = eval.decode(&codes, [2, 5, 6]);
    let diff = decoded
        .sub(forward.quantized)
        .abs()
        .max()
        .into_scalar::<f32>();
    assert!(
        diff < 1e-6,
        "decode(encode(x)) differs from the eval forward by {diff}"
    );

    // Rank 1 (one vector) and rank 4.
    let x1 = random(&mut rng, [6], &device);
    assert_eq!(eval.forward(x1).quantized.dims(), [6]);
    let x4 = random(&mut rng, [2, 2, 3, 6], &device);
    let out4 = eval.forward(x4);
    assert_eq!(out4.indices[0].dims(), [12]);

    // Fewer levels: the prefix of the codes, the forward at that depth, and a level loss
    // that is beta times the error of decoding that prefix. (The error need not fall with
    // every level: greedy residual quantization promises no such thing for a given batch.)
    let beta = 0.25;
    for n in 1..=3 {
        let prefix = eval.try_encode(x3.clone(), n).unwrap();
        assert_eq!(prefix.len(), n);
        for (a, b) in prefix.iter().zip(&codes) {
            assert_eq!(ints(a.clone()), ints(b.clone()));
        }
        let out = eval.forward_with(x3.clone(), &ForwardOptions::new().with_num_levels(n));
        assert_eq!(out.indices.len(), n);
        let decoded = eval.decode(&prefix, [2, 5, 6]);
        let diff = decoded
            .clone()
            .sub(out.quantized)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff < 1e-6);
        let error = decoded
            .sub(x3.clone())
            .powi_scalar(2)
            .mean()
            .into_scalar::<f32>() as f64;
        let level_loss = floats(forward.level_losses[n - 1].clone())[0] as f64;
        assert!(
            (level_loss - beta * error).abs() <= 1e-5 * level_loss.max(1e-6),
            "level {n}: loss {level_loss}, beta x decoding error {}",
            beta * error
        );
    }
    assert_eq!(eval.bits_per_level(), vec![4.0, 3.0, 2.0]);
}

#[test]
fn metrics_carry_the_reference_names() {
    let mut rng = Rng::new(7);
    let device = device();
    let rvq = quantizer(&device, 7);
    let named = rvq
        .forward(random(&mut rng, [50, 6], &device))
        .metrics()
        .named();
    for l in 1..=3 {
        for metric in ["perplexity", "usage", "bits_per_index"] {
            assert!(
                named.contains_key(&format!("rvq_l{l}_{metric}")),
                "{named:?}"
            );
        }
    }
    for name in [
        "rvq_perplexity_mean",
        "rvq_usage_mean",
        "rvq_bits_per_index_sum",
    ] {
        assert!(named[name].is_finite());
    }
}

fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

#[test]
fn bad_input_gets_a_specific_error_and_leaves_the_state_unchanged() {
    let mut rng = Rng::new(8);
    let device = device().autodiff();
    let rvq = quantizer(&device, 8);
    let before = state_bits(&rvq);

    let error = rvq
        .try_forward(random(&mut rng, [4, 5], &device))
        .unwrap_err();
    assert_eq!(
        error,
        RvqError::InputDim {
            expected: 6,
            shape: vec![4, 5]
        }
    );
    assert!(
        error.to_string().contains("expected embedding_dim = 6"),
        "{error}"
    );
    let error = rvq
        .try_forward_with(
            random(&mut rng, [4, 6], &device),
            &ForwardOptions::new().with_num_levels(4),
        )
        .unwrap_err();
    assert_eq!(
        error,
        RvqError::LevelCount {
            requested: 4,
            available: 3
        }
    );
    assert!(matches!(
        rvq.try_encode(random(&mut rng, [4, 6], &device), 0),
        Err(RvqError::LevelCount { requested: 0, .. })
    ));
    assert_eq!(state_bits(&rvq), before);

    let plain = device.clone().without_autodiff();
    let ok = || int_tensor(vec![0, 1, 2, 3], &plain);
    let cases: Vec<(Vec<Tensor<1, Int>>, [usize; 2], RvqError)> = vec![
        (
            vec![],
            [4, 6],
            RvqError::LevelCount {
                requested: 0,
                available: 3,
            },
        ),
        (
            vec![ok(), ok(), ok(), ok()],
            [4, 6],
            RvqError::LevelCount {
                requested: 4,
                available: 3,
            },
        ),
        (
            vec![ok()],
            [4, 5],
            RvqError::InputDim {
                expected: 6,
                shape: vec![4, 5],
            },
        ),
        (
            vec![ok(), int_tensor(vec![0, 1, 2], &plain)],
            [4, 6],
            RvqError::IndicesLength {
                level: 1,
                expected: 4,
                got: 3,
            },
        ),
        (
            vec![ok(), int_tensor(vec![0, 8, 2, 3], &plain)],
            [4, 6],
            RvqError::IndexOutOfRange {
                level: 1,
                min: 0,
                max: 8,
                num_embeddings: 8,
            },
        ),
        (
            vec![int_tensor(vec![-1, 0, 0, 0], &plain)],
            [4, 6],
            RvqError::IndexOutOfRange {
                level: 0,
                min: -1,
                max: 0,
                num_embeddings: 16,
            },
        ),
    ];
    for (indices, shape, expected) in cases {
        let error = rvq.try_decode(&indices, shape).unwrap_err();
        assert_eq!(error, expected, "{error}");
    }
    assert_eq!(state_bits(&rvq), before);
}

#[test]
fn imported_state_is_validated() {
    let device = device();
    let rvq = quantizer(&device, 9);
    let before = state_bits(&rvq);
    let error = rvq
        .try_set_statistics(
            1,
            Tensor::ones([7], &device),
            Tensor::zeros([8, 6], &device),
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "state `levels.1.ema_count` has shape [7], expected [8]"
    );
    let negative = Tensor::<1>::ones([8], &device).mul_scalar(-1.0);
    assert!(matches!(
        rvq.try_set_statistics(1, negative, Tensor::zeros([8, 6], &device)),
        Err(RvqError::InvalidState { .. })
    ));
    let nan = Tensor::<2>::zeros([8, 6], &device).div_scalar(0.0);
    assert!(matches!(
        rvq.try_set_statistics(1, Tensor::ones([8], &device), nan),
        Err(RvqError::InvalidState { .. })
    ));
    assert!(matches!(
        rvq.try_set_statistics(
            5,
            Tensor::ones([8], &device),
            Tensor::zeros([8, 6], &device)
        ),
        Err(RvqError::LevelCount { .. })
    ));
    assert_eq!(state_bits(&rvq), before);
    assert!(
        EmaResidualVectorQuantizerConfig::new(0, 8.into(), 4)
            .try_init(&device)
            .is_err()
    );
}

/// EnCodec's bandwidth selection with per-level sizes, and its inverse.
#[test]
fn levels_for_a_bitrate_and_the_bitrate_of_levels() {
    let device = device();
    let rvq = quantizer(&device, 10); // sizes 16, 8, 4: 4 + 3 + 2 bits per vector
    assert_eq!(rvq.bitrate(1, 75.0), 300.0);
    assert_eq!(rvq.bitrate(2, 75.0), 525.0);
    assert_eq!(rvq.bitrate(3, 75.0), 675.0);
    for (bits_per_second, levels) in [(525.0, 2), (524.9, 1), (0.0, 1), (675.0, 3), (1e9, 3)] {
        assert_eq!(
            rvq.levels_for_bitrate(bits_per_second, 75.0),
            levels,
            "{bits_per_second} b/s"
        );
    }
    // EnCodec 24 kHz: 32 levels of 1024 codes at 75 frames per second, 1.5 to 24 kb/s.
    let encodec = EmaResidualVectorQuantizerConfig::new(32, 1024.into(), 2).init(&device);
    for (kbps, levels) in [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)] {
        assert_eq!(encodec.levels_for_bitrate(kbps * 1000.0, 75.0), levels);
        assert_eq!(encodec.bitrate(levels, 75.0), kbps * 1000.0);
    }
    fn invalid<T: std::fmt::Debug>(result: Result<T, RvqError>, argument: &str, value: &str) {
        let error = result.unwrap_err();
        assert!(
            matches!(&error, RvqError::InvalidArgument { argument: a, .. } if *a == argument),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains(&format!("`{argument}` = {value}")),
            "{error}"
        );
    }
    invalid(
        rvq.try_levels_for_bitrate(f64::NAN, 75.0),
        "bits_per_second",
        "NaN",
    );
    invalid(
        rvq.try_levels_for_bitrate(-1.0, 75.0),
        "bits_per_second",
        "-1",
    );
    invalid(
        rvq.try_levels_for_bitrate(600.0, 0.0),
        "frames_per_second",
        "0",
    );
    invalid(
        rvq.try_bitrate(2, f64::INFINITY),
        "frames_per_second",
        "inf",
    );
    assert!(matches!(
        rvq.try_bitrate(4, 75.0),
        Err(RvqError::LevelCount {
            requested: 4,
            available: 3
        })
    ));
}
