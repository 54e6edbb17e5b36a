//! Replays the recorded behaviour of the reference layer (helia-edge 0.6.2
//! `EmaResidualVectorQuantizer`, see `fixtures/reference/README.md`): every `*.json` case in
//! the fixtures, and in `RVQ_REFERENCE_DIR` when it is set, on every backend.
//!
//! Indices must match exactly; every other value within `1e-5 * max(1, |want|)`. Eval steps
//! must leave the state bit-identical.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use common::*;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, Execution};

/// How a replay runs the levels: the device's own path, or the tensor path with scatter-add
/// or dense statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Auto,
    Tensor,
    TensorDense,
}

/// The quantizer of `case`, with the case's initial state, on `device`.
fn quantizer(case: &Case, device: &Device, variant: Variant) -> EmaResidualVectorQuantizer {
    let c = &case.config;
    let rvq = EmaResidualVectorQuantizerConfig::new(
        c.num_levels,
        c.num_embeddings.clone().into(),
        c.embedding_dim,
    )
    .with_beta(c.beta)
    .with_ema_decay(c.ema_decay)
    .with_epsilon(c.epsilon)
    .with_dense_statistics(variant == Variant::TensorDense)
    .with_execution(match variant {
        Variant::Auto => Execution::Auto,
        Variant::Tensor | Variant::TensorDense => Execution::TensorOps,
    })
    .init(device);
    for (level, &k) in c.num_embeddings.iter().enumerate() {
        rvq.try_set_statistics(
            level,
            tensor(&case.init.ema_counts[level], [k], device),
            tensor(&case.init.ema_weights[level], [k, c.embedding_dim], device),
        )
        .expect("reference state is valid");
    }
    rvq
}

/// The state `(counts, sums, codebooks)` per level, as host vectors.
type HostState = Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>;

fn host_state(rvq: &EmaResidualVectorQuantizer, device: &Device) -> HostState {
    (0..rvq.num_levels())
        .map(|level| {
            let rvq_burn::Statistics {
                counts: count,
                sums: weight,
            } = rvq.statistics(level, device);
            (
                floats(count),
                floats(weight),
                floats(rvq.codebook(level, device)),
            )
        })
        .collect()
}

fn compare_state(got: &HostState, want: &State, what: &str) -> Result<(), String> {
    for (level, (count, weight, codebook)) in got.iter().enumerate() {
        compare(
            &format!("{what} level {level} ema_count"),
            count,
            &want.ema_counts[level],
        )?;
        compare(
            &format!("{what} level {level} ema_weight"),
            weight,
            &want.ema_weights[level],
        )?;
        compare(
            &format!("{what} level {level} codebook"),
            codebook,
            &want.codebooks[level],
        )?;
    }
    Ok(())
}

fn replay_step<const R: usize>(
    rvq: &EmaResidualVectorQuantizer,
    step: &Step,
    device: &Device,
) -> Result<(), String> {
    let autodiff = device.clone().autodiff();
    let before = host_state(rvq, device);
    let x: Tensor<R> = tensor_dyn(&step.x, &step.x_shape, &autodiff).require_grad();
    let gy: Tensor<R> = tensor_dyn(&step.gy, &step.x_shape, &autodiff);
    let out = if step.training {
        rvq.forward(x.clone())
    } else {
        // Evaluation on an autodiff device: `valid()` never updates, the loss still has a
        // gradient (the reference adds it in both modes).
        rvq.valid().forward(x.clone())
    };

    for (level, (got, want)) in out.indices.iter().zip(&step.indices).enumerate() {
        let got = ints(got.clone());
        if &got != want {
            let first = got.iter().zip(want).position(|(g, w)| g != w);
            return Err(format!("level {level} indices differ (first at {first:?})"));
        }
    }
    if out.indices.len() != step.indices.len() {
        return Err(format!(
            "{} index tensors, expected {}",
            out.indices.len(),
            step.indices.len()
        ));
    }
    compare("y", &floats(out.quantized.clone()), &step.y)?;
    for (level, (got, &want)) in out.level_losses.iter().zip(&step.level_losses).enumerate() {
        compare(
            &format!("level {level} loss"),
            &floats(got.clone()),
            &[want as f32],
        )?;
    }
    compare("loss", &floats(out.loss.clone()), &[step.loss as f32])?;
    let metrics = out.metrics().named();
    for (name, &want) in &step.metrics {
        let got = *metrics
            .get(name)
            .ok_or_else(|| format!("metric {name} missing"))?;
        if !close(got, want) {
            return Err(format!("metric {name}: got {got}, want {want}"));
        }
    }

    let objective = out.quantized.mul(gy).sum().add(out.loss);
    let grads = objective.backward();
    let grad_x = x.grad(&grads).ok_or("no gradient reached the input")?;
    compare("grad_x", &floats(grad_x), &step.grad_x)?;

    let after = host_state(rvq, device);
    if !step.training && after != before {
        return Err("an eval step changed the state".into());
    }
    compare_state(&after, &step.state_after, "state_after")
}

fn replay_case(case: &Case, device: &Device, variant: Variant) -> Result<(), String> {
    let rvq = quantizer(case, device, variant);
    compare_state(&host_state(&rvq, device), &case.init, "init")
        .map_err(|e| format!("initial state: {e}"))?;
    for (index, step) in case.steps.iter().enumerate() {
        let result = match step.x_shape.len() {
            2 => replay_step::<2>(&rvq, step, device),
            3 => replay_step::<3>(&rvq, step, device),
            4 => replay_step::<4>(&rvq, step, device),
            rank => Err(format!("unsupported input rank {rank}")),
        };
        result.map_err(|e| format!("step {index} (training: {}): {e}", step.training))?;
    }
    let ed = &case.encode_decode;
    let x = tensor_dyn::<2>(
        &ed.x,
        &[
            ed.x.len() / case.config.embedding_dim,
            case.config.embedding_dim,
        ],
        device,
    );
    let codes = rvq.encode(x);
    for (level, (got, want)) in codes.iter().zip(&ed.indices).enumerate() {
        if &ints(got.clone()) != want {
            return Err(format!("encode_decode: level {level} indices differ"));
        }
    }
    let decoded = rvq.decode(
        &codes,
        [
            ed.x.len() / case.config.embedding_dim,
            case.config.embedding_dim,
        ],
    );
    compare("encode_decode: decoded", &floats(decoded), &ed.decoded)
}

fn replay_all(
    backend: &str,
    device: &Device,
    variant: Variant,
    filter: impl Fn(&Case) -> bool,
) -> usize {
    let mut replayed = 0;
    for path in reference_case_paths() {
        let case = load_case(&path);
        if !filter(&case) {
            continue;
        }
        if let Err(error) = replay_case(&case, device, variant) {
            panic!(
                "case {} ({path:?}) on {backend}, {variant:?}: {error}",
                case.name
            );
        }
        replayed += 1;
    }
    replayed
}

/// The host path of Burn's CPU backends.
#[test]
fn reference_cases_replay_on_cpu_backends() {
    for (backend, device) in cpu_devices() {
        let replayed = replay_all(backend, &device, Variant::Auto, |_| true);
        assert!(replayed >= 4, "{backend}: only {replayed} cases replayed");
    }
}

/// The generic tensor path, with scatter-adds and with the dense accumulation of counts and
/// sums (`dense_statistics`).
#[test]
fn reference_cases_replay_on_the_tensor_path() {
    for variant in [Variant::Tensor, Variant::TensorDense] {
        let replayed = replay_all("flex", &Device::flex(), variant, |_| true);
        assert!(replayed >= 4, "{variant:?}: only {replayed} cases replayed");
    }
}

/// LibTorch's CPU device (feature `tch`): every case through the host path and through
/// LibTorch's own tensor operations.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // Burn 0.22 deprecates its LibTorch backend but still offers it.
fn reference_cases_replay_on_libtorch() {
    let device = Device::libtorch();
    for variant in [Variant::Auto, Variant::Tensor, Variant::TensorDense] {
        let replayed = replay_all("libtorch", &device, variant, |_| true);
        assert!(
            replayed >= 4,
            "libtorch, {variant:?}: only {replayed} cases replayed"
        );
    }
}

/// WGPU on Mesa's software Vulkan in CI (`cargo test --all-features`; set `RVQ_SKIP_WGPU=1` on
/// a machine with no Vulkan or GL driver at all; CI installs one, so there it runs): every
/// case through the kernel path, the multi-level ones through the tensor path too.
#[cfg(feature = "wgpu")]
#[test]
fn reference_cases_replay_on_wgpu() {
    if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
        eprintln!("RVQ_SKIP_WGPU set: WGPU replay SKIPPED");
        return;
    }
    let replayed = replay_all("wgpu", &wgpu_device(), Variant::Auto, |_| true);
    assert!(
        replayed >= 4,
        "only {replayed} cases replayed on wgpu's kernel path"
    );
    for variant in [Variant::Tensor, Variant::TensorDense] {
        let replayed = replay_all("wgpu", &wgpu_device(), variant, |case| {
            case.config.num_levels > 1
        });
        assert!(
            replayed >= 1,
            "no multi-level case replayed on wgpu, {variant:?}"
        );
    }
}
