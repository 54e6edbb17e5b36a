//! The Burn half of `interop/roundtrip.py`: imports an interop case's `before` state (a real
//! EnCodec, Mimi or vector-quantize-pytorch quantizer's), trains the layer a few steps on
//! data around the case's input, exports the state in the case's layout, and writes the
//! layer's codes of the case's input next to it.
//!
//! ```sh
//! cargo run --release -p rvq-burn --features pytorch --example interop_roundtrip -- \
//!     crates/rvq-burn/tests/fixtures/interop/mimi_m4_k64_d8.json OUT_DIR 20
//! ```
//!
//! Writes `OUT_DIR/NAME.export.safetensors` and `OUT_DIR/NAME.codes.json` (`[M][N]` codes).

use std::path::PathBuf;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rvq_burn::{EmaResidualVectorQuantizerConfig, KeyStyle, Layout, PytorchState};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    layout: String,
    prefix: String,
    source: String,
    num_levels: usize,
    codebook_size: usize,
    dim: usize,
    decay: f64,
    epsilon: f64,
    before: String,
    input: Vec<Vec<f32>>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: interop_roundtrip CASE.json OUT_DIR [STEPS]";
    let case_path = PathBuf::from(args.next().ok_or(usage)?);
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let steps: usize = args.next().map_or(Ok(20), |s| s.parse())?;
    let case: Case = serde_json::from_str(&std::fs::read_to_string(&case_path)?)?;
    let layout: Layout = case.layout.parse()?;
    let style = match case.source.contains("transformers") {
        true => KeyStyle::Transformers,
        false => KeyStyle::Original,
    };
    let state = PytorchState::new(layout)
        .with_prefix(case.prefix.clone())
        .with_key_style(style);

    let device = Device::flex();
    device.seed(17);
    let mut rvq =
        EmaResidualVectorQuantizerConfig::new(case.num_levels, case.codebook_size.into(), case.dim)
            .with_ema_decay(case.decay)
            .with_epsilon(case.epsilon)
            .with_codebook_rule(layout.codebook_rule())
            .init(&device);
    let before = case_path.with_file_name(&case.before);
    let report = rvq.try_import_pytorch(&before, &state)?;
    println!("{}: {report}", before.display());

    // Training: the case's input, jittered, `steps` times.
    let n = case.input.len();
    let flat: Vec<f32> = case.input.iter().flatten().copied().collect();
    let x = Tensor::<2>::from_data(TensorData::new(flat, [n, case.dim]), &device);
    let autodiff = device.clone().autodiff();
    for _ in 0..steps {
        let noise = Tensor::<2>::random([n, case.dim], Distribution::Normal(0.0, 0.1), &device);
        let _ = rvq.forward(x.clone().add(noise).autodiff().to_device(&autodiff));
    }
    rvq.sync_state();

    std::fs::create_dir_all(&out)?;
    let name = case_path
        .file_stem()
        .ok_or(usage)?
        .to_string_lossy()
        .to_string();
    let export = out.join(format!("{name}.export.safetensors"));
    rvq.try_export_pytorch(&export, &state)?;
    let codes: Vec<Vec<i64>> = rvq
        .encode(x)
        .into_iter()
        .map(|level| level.into_data().iter::<i64>().collect())
        .collect();
    std::fs::write(
        out.join(format!("{name}.codes.json")),
        serde_json::to_string(&codes)?,
    )?;
    println!("{steps} training steps, exported {}", export.display());
    Ok(())
}
