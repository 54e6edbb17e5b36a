//! PyTorch codec checkpoints from arbitrary bytes, as safetensors and as `.pt` files, in
//! every layout: an error, never a panic; a quantizer that did import has finite state of
//! the right shapes, exports it, and imports its export again.
#![no_main]

use std::sync::OnceLock;

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, Layout, PytorchState};

/// The shape of the seed cases (`encodec_m4_k64_d8`, `mimi_m4_k64_d8`, `vqp_m4_k64_d8`).
const LEVELS: usize = 4;
const SIZE: usize = 64;
const DIM: usize = 8;

fn quantizer(layout: Layout) -> EmaResidualVectorQuantizer {
    EmaResidualVectorQuantizerConfig::new(LEVELS, SIZE.into(), DIM)
        .with_codebook_rule(layout.codebook_rule())
        .init(&Device::flex())
}

/// Each layout with the prefix of its seed, and the `.pt` seed's nesting.
fn states() -> &'static [PytorchState] {
    static STATES: OnceLock<Vec<PytorchState>> = OnceLock::new();
    STATES.get_or_init(|| {
        vec![
            PytorchState::new(Layout::Encodec).with_prefix("quantizer.vq."),
            PytorchState::new(Layout::Mimi).with_prefix("quantizer.rvq_rest.vq."),
            PytorchState::new(Layout::Mimi)
                .with_prefix("quantizer.rvq_rest.vq.")
                .with_top_level_key("model"),
            PytorchState::new(Layout::VectorQuantizePytorch).with_prefix("quantizer."),
        ]
    })
}

fn check(rvq: &EmaResidualVectorQuantizer, state: &PytorchState) {
    let device = Device::flex();
    for level in 0..LEVELS {
        let codebook = rvq.codebook(level, &device);
        assert_eq!(codebook.dims(), [SIZE, DIM]);
    }
    let bytes = rvq
        .try_export_safetensors_bytes(state)
        .expect("an imported state exports");
    quantizer(state.layout)
        .try_import_safetensors_bytes(bytes, state)
        .expect("an export imports");
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("rvq-fuzz-interop-{}.pt", std::process::id()));
    std::fs::write(&path, data).expect("scratch file");
    for state in states() {
        let rvq = quantizer(state.layout);
        if rvq.try_import_safetensors_bytes(data.to_vec(), state).is_ok() {
            check(&rvq, state);
        }
        let rvq = quantizer(state.layout);
        if rvq.try_import_pytorch(&path, state).is_ok() {
            check(&rvq, state);
        }
    }
});
