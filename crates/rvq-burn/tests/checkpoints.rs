//! Checkpoints that do not fit, or are damaged, give errors: never a panic, never a
//! partially loaded quantizer.

mod common;

use burn::module::Module;
use burn::tensor::Device;
use common::*;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rvq-burn-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn trained(levels: usize, size: usize, dim: usize) -> EmaResidualVectorQuantizer {
    let device = Device::flex().autodiff();
    let rvq = EmaResidualVectorQuantizerConfig::new(levels, size.into(), dim).init(&device);
    let _ = rvq.forward(Rng::new(1).uniform_tensor([32, dim], 0.0, 1.0, &device));
    rvq.sync_state();
    rvq
}

#[test]
fn a_record_of_another_configuration_is_refused_with_the_field_and_shapes() {
    let path = temp_path("three-levels-16x6.bpk");
    trained(3, 16, 6).save_file(&path).unwrap();

    let cases = [
        (trained(2, 16, 6), "levels.2"), // fewer levels: unused tensors
        (trained(4, 16, 6), "levels.3"), // more levels: missing tensors
        // other codebook size, other dimension: the field and both shapes
        (
            trained(3, 8, 6),
            "levels.0.ema_count: shape mismatch, expected Shape { dims: [8] } but record has \
             Shape { dims: [16] }",
        ),
        (
            trained(3, 16, 4),
            "levels.0.ema_weight: shape mismatch, expected Shape { dims: [16, 4] } but record \
             has Shape { dims: [16, 6] }",
        ),
    ];
    for (destination, field) in cases {
        let before = state_bits(&destination);
        // Load into `valid()`: a copy with its own state. (A plain clone shares the
        // RunningState with the original, and Burn writes the tensors that fit before it
        // reports the ones that do not.)
        let error = destination
            .valid()
            .try_load_file(&path)
            .expect_err("a mismatched record must be refused")
            .to_string();
        assert!(
            error.contains(field),
            "error does not name {field}: {error}"
        );
        assert_eq!(state_bits(&destination), before, "the destination changed");
    }
}

#[test]
fn a_checkpoint_loaded_into_a_valid_copy_then_trained_continues_exactly() {
    let path = temp_path("resume.bpk");
    let source = trained(2, 8, 4);
    source.clone().save_file(&path).unwrap();
    let device = Device::flex().autodiff();
    let loaded = trained(2, 8, 4)
        .valid()
        .try_load_file(&path)
        .unwrap()
        .train();
    assert_eq!(state_bits(&loaded), state_bits(&source));
    let x = Rng::new(2).uniform_tensor([32, 4], 0.0, 1.0, &device);
    let a = source.forward(x.clone());
    let b = loaded.forward(x);
    assert_eq!(floats(a.quantized), floats(b.quantized));
    source.sync_state();
    loaded.sync_state();
    assert_eq!(
        state_bits(&loaded),
        state_bits(&source),
        "the loaded copy did not train alike"
    );
}

#[test]
fn a_damaged_file_is_an_error_not_a_panic() {
    let path = temp_path("good.bpk");
    let source = trained(2, 8, 4);
    source.clone().save_file(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let truncated = temp_path("truncated.bpk");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let empty = temp_path("empty.bpk");
    std::fs::write(&empty, b"").unwrap();
    let garbage = temp_path("garbage.bpk");
    std::fs::write(&garbage, vec![0xA5u8; bytes.len()]).unwrap();

    for path in [truncated, empty, garbage, temp_path("missing.bpk")] {
        let destination = trained(2, 8, 4);
        let before = state_bits(&destination);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            destination.valid().try_load_file(&path)
        }));
        let result = result.unwrap_or_else(|_| panic!("loading {path:?} panicked"));
        assert!(result.is_err(), "{path:?} loaded");
        assert_eq!(state_bits(&destination), before);
    }
}
