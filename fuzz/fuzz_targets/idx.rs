//! The IDX loader of the demo on arbitrary bytes (raw or gzip): an error or digits, never a
//! panic, a hang or an allocation the input does not justify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vqvae_demo::data::{IMAGE_PIXELS, parse_images, parse_labels, parse_pair};

fuzz_target!(|data: &[u8]| {
    if let Ok(pixels) = parse_images("fuzz-images", data) {
        assert_eq!(pixels.len() % IMAGE_PIXELS, 0);
    }
    let _ = parse_labels("fuzz-labels", data);
    // The first byte splits the rest into an images file and a labels file.
    if let Some((&split, rest)) = data.split_first() {
        let at = (usize::from(split) * rest.len()) / 255;
        let (images, labels) = rest.split_at(at.min(rest.len()));
        if let Ok(digits) = parse_pair("fuzz-images", images, "fuzz-labels", labels) {
            assert_eq!(digits.pixels.len(), digits.labels.len() * IMAGE_PIXELS);
        }
    }
});
