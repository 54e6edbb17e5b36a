//! Compressed streams from arbitrary bytes: an error, never a panic or a hang; what decodes
//! round-trips.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rvq_burn::{CodebookRule, EntropyModels};

fn models() -> &'static EntropyModels {
    static MODELS: OnceLock<EntropyModels> = OnceLock::new();
    MODELS.get_or_init(|| {
        let skewed: Vec<f32> = (0..16).map(|k| (1u32 << (15 - k)) as f32).collect();
        let uniform = vec![3.0f32; 5];
        EntropyModels::from_counts(
            &[skewed, uniform, vec![1.0]],
            CodebookRule::Laplace,
            1e-5,
            2,
        )
        .expect("valid counts")
    })
}

fuzz_target!(|data: &[u8]| {
    // rvq-burn skips the checksum under `cfg(fuzzing)`, so forged headers and payloads reach
    // the decoder. Whatever decodes must code again and decode to the same indices.
    // At most 2^16 codes per input, so that each run stays short.
    if let Ok(stream) = models().decompress_limited(data, 1 << 16) {
        let again = models()
            .compress(&stream.indices, &stream.shape)
            .expect("decoded codes compress");
        let decoded = models().decompress(&again).expect("own stream decodes");
        assert_eq!(decoded.indices, stream.indices);
        assert_eq!(decoded.shape, stream.shape);
    }
});
