//! Compressed streams from arbitrary bytes: an error, never a panic; a stream that decodes
//! is exactly what compressing its codes again writes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rvq_burn::EntropyModels;

fn models() -> &'static EntropyModels {
    static MODELS: OnceLock<EntropyModels> = OnceLock::new();
    MODELS.get_or_init(|| {
        let skewed: Vec<f32> = (0..16).map(|k| (1u32 << (15 - k)) as f32).collect();
        let uniform = vec![3.0f32; 5];
        EntropyModels::from_counts(&[skewed, uniform, vec![1.0]], 1e-5, 2).expect("valid counts")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(stream) = models().decompress(data) {
        let again = models()
            .compress(&stream.indices, &stream.shape)
            .expect("decoded codes compress");
        assert_eq!(again, data);
    }
});
