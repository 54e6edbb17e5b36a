//! Quantizer checkpoints (burnpack records) from arbitrary bytes: an error, never a panic,
//! and a quantizer that did load has state of the right shapes.
#![no_main]

use std::sync::OnceLock;

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use libfuzzer_sys::fuzz_target;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

fn quantizer() -> &'static EmaResidualVectorQuantizer {
    static RVQ: OnceLock<EmaResidualVectorQuantizer> = OnceLock::new();
    RVQ.get_or_init(|| EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4).init(&Device::flex()))
}

fuzz_target!(|data: &[u8]| {
    let Ok(record) = ModuleRecord::from_bytes(Bytes::from_bytes_vec(data.to_vec())) else {
        return;
    };
    // `valid()`: a copy with its own state, as a failed load must not touch the original.
    if let Ok(loaded) = quantizer().valid().try_load_record(record) {
        let device = Device::flex();
        for level in 0..2 {
            assert_eq!(loaded.codebook(level, &device).dims(), [8, 4]);
        }
    }
});
