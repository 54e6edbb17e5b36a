//! What training real codecs needs: padding masks, half-precision inputs and the rotation
//! trick, on every execution path.

mod common;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};
use common::*;
use rvq_burn::{
    EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, Execution, ForwardOptions,
    RvqError,
};

/// The ways a batch can run here: the host path, the tensor path, the data-parallel mode (on
/// the host path), and with `--features wgpu` the kernel path (WGPU on Mesa in CI;
/// `RVQ_SKIP_WGPU=1` skips it, loudly).
fn paths() -> Vec<(&'static str, Device, EmaResidualVectorQuantizerConfig)> {
    let config = EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4)
        .with_kmeans_init(true)
        .with_kmeans_iterations(3)
        .with_threshold_ema_dead_code(0.3);
    let flex = Device::flex().autodiff();
    #[allow(unused_mut)]
    let mut paths = vec![
        ("host", flex.clone(), config.clone()),
        (
            "tensor",
            flex.clone(),
            config.clone().with_execution(Execution::TensorOps),
        ),
        (
            "data-parallel",
            flex,
            config.clone().with_data_parallel(true),
        ),
    ];
    #[cfg(feature = "wgpu")]
    match std::env::var_os("RVQ_SKIP_WGPU") {
        Some(_) => eprintln!("RVQ_SKIP_WGPU set: the kernel path is SKIPPED"),
        None => paths.push(("kernel (wgpu)", wgpu_device().autodiff(), config)),
    }
    paths
}

/// Sequences of `lens` real positions, padded to `max_len`: the mask `[B, T]`, and the row
/// indices of the real positions in the flattened `[B * T]` batch.
fn padding(lens: &[usize], max_len: usize, device: &Device) -> (Tensor<2, Bool>, Vec<i64>) {
    let values: Vec<bool> = lens
        .iter()
        .flat_map(|&len| (0..max_len).map(move |t| t < len))
        .collect();
    let real = values
        .iter()
        .enumerate()
        .filter(|(_, real)| **real)
        .map(|(i, _)| i as i64)
        .collect();
    let mask = Tensor::from_data(TensorData::new(values, [lens.len(), max_len]), device);
    (mask, real)
}

fn bits(values: Vec<f32>) -> Vec<u32> {
    values.into_iter().map(f32::to_bits).collect()
}

fn metrics<const R: usize>(out: &rvq_burn::RvqOutput<R>) -> BTreeMap<String, u64> {
    out.metrics()
        .named()
        .into_iter()
        .map(|(name, value)| (name, value.to_bits()))
        .collect()
}

/// A masked batch gives exactly what the same batch with its padded positions removed gives:
/// the state (k-means init, EMA, dead-code restarts), the losses, the metrics, the outputs and
/// codes of the real positions and their gradients, bit for bit, step after step; padded
/// positions get zero output, code -1 and no gradient. On every path.
#[test]
fn a_masked_batch_is_the_batch_without_its_padding_on_every_path() {
    let (lens, max_len, d) = ([5usize, 2, 4, 1], 5usize, 4usize);
    let batch = lens.len();
    for (path, device, config) in paths() {
        let plain = device.clone().without_autodiff();
        let (mask, real) = padding(&lens, max_len, &plain);
        let real_rows =
            Tensor::<1, Int>::from_data(TensorData::new(real.clone(), [real.len()]), &plain);
        let masked = seeded_quantizer(&config, &device, 3);
        let compact = seeded_quantizer(&config, &device, 3);
        let mut rng = Rng::new(4);
        for step in 0..4 {
            let what = format!("{path}, step {step}");
            // Padding holds a value far from the data, which would pull codes if it counted.
            let mut x = rng.normal_tensor([batch, max_len, d], 0.0, 1.0, &plain);
            let padded = mask
                .clone()
                .bool_not()
                .unsqueeze_dim::<3>(2)
                .expand([batch, max_len, d]);
            x = x.mask_fill(padded, 50.0);
            let x_real = x
                .clone()
                .reshape([batch * max_len, d])
                .select(0, real_rows.clone());
            let x = x.autodiff().require_grad();
            let x_real = x_real.autodiff().require_grad();

            let a = masked.forward_with(x.clone(), &ForwardOptions::new().with_mask(mask.clone()));
            let b = compact.forward(x_real.clone());
            masked.sync_state();
            compact.sync_state();
            assert_eq!(state_bits(&masked), state_bits(&compact), "{what}: state");
            assert_eq!(
                bits(floats(a.loss.clone().without_autodiff())),
                bits(floats(b.loss.clone().without_autodiff())),
                "{what}: loss"
            );
            for (la, lb) in a.level_losses.iter().zip(&b.level_losses) {
                assert_eq!(bits(floats(la.clone())), bits(floats(lb.clone())), "{what}");
            }
            assert_eq!(metrics(&a), metrics(&b), "{what}: metrics");
            assert_eq!(a.restarted_codes, b.restarted_codes, "{what}");

            let quantized = a
                .quantized
                .clone()
                .without_autodiff()
                .reshape([batch * max_len, d]);
            let got = bits(floats(quantized.clone().select(0, real_rows.clone())));
            assert_eq!(
                got,
                bits(floats(b.quantized.clone().without_autodiff())),
                "{what}"
            );
            let all = floats(quantized);
            for (level, (ia, ib)) in a.indices.iter().zip(&b.indices).enumerate() {
                let codes = ints(ia.clone());
                let compact_codes = ints(ib.clone());
                for (row, code) in codes.iter().enumerate() {
                    match real.iter().position(|&r| r == row as i64) {
                        Some(i) => assert_eq!(*code, compact_codes[i], "{what}, level {level}"),
                        None => {
                            assert_eq!(*code, -1, "{what}: padded row {row}, level {level}");
                            assert!(all[row * d..(row + 1) * d].iter().all(|v| *v == 0.0));
                        }
                    }
                }
            }

            let grads_a = (a.quantized.clone().sum() + a.loss.clone()).backward();
            let grads_b = (b.quantized.clone().sum() + b.loss.clone()).backward();
            let grad_a = x.grad(&grads_a).unwrap().reshape([batch * max_len, d]);
            let grad_b = x_real.grad(&grads_b).unwrap();
            assert_eq!(
                bits(floats(grad_a.clone().select(0, real_rows.clone()))),
                bits(floats(grad_b)),
                "{what}: gradient of the real positions"
            );
            let grad_a = floats(grad_a);
            for row in (0..batch * max_len).filter(|r| !real.contains(&(*r as i64))) {
                assert!(
                    grad_a[row * d..(row + 1) * d].iter().all(|g| *g == 0.0),
                    "{what}: padded row {row} has a gradient"
                );
            }
        }
        // A batch of padding alone: zero output, codes -1, zero loss, no update.
        let before = state_bits(&masked);
        let none = Tensor::<2, Bool>::from_data(TensorData::new(vec![false; 6], [2, 3]), &plain);
        let x = Rng::new(5)
            .normal_tensor([2, 3, d], 0.0, 1.0, &plain)
            .autodiff()
            .require_grad();
        let out = masked.forward_with(x.clone(), &ForwardOptions::new().with_mask(none));
        masked.sync_state();
        assert_eq!(
            state_bits(&masked),
            before,
            "{path}: a batch of padding updated"
        );
        assert!(
            floats(out.quantized.clone().without_autodiff())
                .iter()
                .all(|v| *v == 0.0)
        );
        assert!(
            out.indices
                .iter()
                .all(|codes| ints(codes.clone()) == vec![-1; 6])
        );
        assert_eq!(
            floats(out.loss.clone().without_autodiff()),
            vec![0.0],
            "{path}"
        );
        let grads = (out.quantized.sum() + out.loss).backward();
        assert!(floats(x.grad(&grads).unwrap()).iter().all(|g| *g == 0.0));
        // An empty mask over an empty batch.
        let empty =
            Tensor::<2, Bool>::from_data(TensorData::new(Vec::<bool>::new(), [2, 0]), &plain);
        let x = Tensor::<3>::zeros([2, 0, d], &plain);
        let codes = masked
            .valid()
            .try_encode_masked(x.clone(), 2, empty.clone())
            .unwrap();
        assert!(codes.iter().all(|c| c.dims() == [0]));
        let out = masked.forward_with(x.autodiff(), &ForwardOptions::new().with_mask(empty));
        assert_eq!(out.quantized.dims(), [2, 0, d]);

        // The padding value (50 in every dimension) never became a code.
        for level in 0..2 {
            let codebook = floats(masked.codebook(level, &Device::flex()));
            assert!(
                codebook.iter().all(|v| v.abs() < 20.0),
                "{path}: {codebook:?}"
            );
        }
    }
}

/// The real positions' codes alone, and their entropy-coded stream; a mask of another shape is
/// a specific error and leaves the state as it was.
#[test]
fn masked_codes_and_streams_hold_the_real_positions_only() {
    let device = Device::flex();
    let config = EmaResidualVectorQuantizerConfig::new(3, 16.into(), 4);
    let rvq = seeded_quantizer(&config, &device.clone().autodiff(), 8);
    let mut rng = Rng::new(9);
    for _ in 0..3 {
        let _ = rvq.forward(rng.normal_tensor([64, 4], 0.0, 1.0, &device.clone().autodiff()));
    }
    rvq.sync_state();
    let eval = rvq.valid();
    let (mask, real) = padding(&[3, 0, 6], 6, &device);
    let x = rng.normal_tensor([3, 6, 4], 0.0, 1.0, &device);
    let real_rows =
        Tensor::<1, Int>::from_data(TensorData::new(real.clone(), [real.len()]), &device);
    let x_real = x.clone().reshape([18, 4]).select(0, real_rows);
    let codes = eval.try_encode_masked(x.clone(), 3, mask.clone()).unwrap();
    let want = eval.encode(x_real.clone());
    for (a, b) in codes.iter().zip(&want) {
        assert_eq!(ints(a.clone()), ints(b.clone()));
    }
    let stream = eval
        .try_compress_masked(x.clone(), 2, mask.clone())
        .unwrap();
    let (decoded_codes, decoded) = eval.try_decompress::<2>(&stream, &device).unwrap();
    assert_eq!(decoded.dims(), [real.len(), 4]);
    assert_eq!(ints(decoded_codes[1].clone()), ints(want[1].clone()));
    assert_eq!(stream, eval.try_compress(x_real, 2).unwrap());

    let before = state_bits(&rvq);
    let wrong = Tensor::<2, Bool>::from_data(TensorData::new(vec![true; 12], [3, 4]), &device);
    let expected = RvqError::MaskShape {
        expected: vec![3, 6],
        got: vec![3, 4],
    };
    let training = x.clone().autodiff();
    let error = rvq
        .try_forward_with(training, &ForwardOptions::new().with_mask(wrong.clone()))
        .unwrap_err();
    assert_eq!(error, expected);
    assert!(
        error
            .to_string()
            .contains("mask of shape [3, 4], expected the input's leading shape [3, 6]"),
        "{error}"
    );
    assert_eq!(
        eval.try_encode_masked(x.clone(), 3, wrong.clone())
            .unwrap_err(),
        expected
    );
    assert_eq!(eval.try_compress_masked(x, 3, wrong).unwrap_err(), expected);
    assert_eq!(state_bits(&rvq), before);
}

/// The input's gradient through the rotation trick is `lambda R^T g` for each row, `R` the
/// rotation of the row's direction onto its quantized sum's and `lambda` the ratio of their
/// norms, computed here independently in f64 with `R` as a `D x D` matrix; and the forward
/// value is the straight-through estimator's.
#[test]
fn the_rotation_trick_rotates_the_gradient_and_keeps_the_value() {
    let device = Device::flex().autodiff();
    let (n, d) = (7, 5);
    let config = EmaResidualVectorQuantizerConfig::new(2, 6.into(), d).with_ema_decay(1.0);
    let plain = seeded_quantizer(&config, &device, 2);
    let rotating = seeded_quantizer(&config.with_rotation_trick(true), &device, 2);
    let mut rng = Rng::new(3);
    let x0 = rng.normal_tensor([n, d], 0.0, 0.5, &device.clone().without_autodiff());
    let g = rng.normal_tensor([n, d], 0.0, 1.0, &device.clone().without_autodiff());
    let x = x0.clone().autodiff().require_grad();
    let out = rotating.forward(x.clone());
    let reference = plain.forward(x0.clone().autodiff());
    let q = floats(out.quantized.clone().without_autodiff());
    assert_eq!(
        q,
        floats(reference.quantized.without_autodiff()),
        "forward value"
    );
    let grads = out.quantized.mul(g.clone().autodiff()).sum().backward();
    let got = floats(x.grad(&grads).unwrap());

    let (xs, gs) = (floats(x0), floats(g));
    for row in 0..n {
        let xr: Vec<f64> = xs[row * d..(row + 1) * d]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let qr: Vec<f64> = q[row * d..(row + 1) * d]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let gr: Vec<f64> = gs[row * d..(row + 1) * d]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let (xn, qn) = (norm(&xr), norm(&qr));
        let u: Vec<f64> = xr.iter().map(|v| v / xn).collect();
        let qh: Vec<f64> = qr.iter().map(|v| v / qn).collect();
        let sum: Vec<f64> = u.iter().zip(&qh).map(|(a, b)| a + b).collect();
        let w: Vec<f64> = sum.iter().map(|v| v / norm(&sum)).collect();
        // R = I - 2 w w^T + 2 q^ u^T, explicitly.
        let r = |i: usize, j: usize| {
            f64::from(u8::from(i == j)) - 2.0 * w[i] * w[j] + 2.0 * qh[i] * u[j]
        };
        // R carries u onto q^, and is a rotation (it keeps lengths).
        for (i, q) in qh.iter().enumerate() {
            let ru: f64 = (0..d).map(|j| r(i, j) * u[j]).sum();
            assert!((ru - q).abs() < 1e-9, "row {row}: R u != q^");
        }
        let rg: Vec<f64> = (0..d)
            .map(|i| (0..d).map(|j| r(i, j) * gr[j]).sum())
            .collect();
        assert!((norm(&rg) - norm(&gr)).abs() < 1e-9 * norm(&gr));
        for j in 0..d {
            // lambda (R^T g)_j
            let want = qn / xn * (0..d).map(|i| r(i, j) * gr[i]).sum::<f64>();
            let got = got[row * d + j] as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1e-3),
                "row {row}, dim {j}: gradient {got}, f64 {want}"
            );
        }
        // A finite-difference check of the same linear map: g . (lambda R x') around x.
        let surrogate = |x: &[f64]| -> f64 {
            (0..d)
                .map(|i| gr[i] * qn / xn * (0..d).map(|j| r(i, j) * x[j]).sum::<f64>())
                .sum()
        };
        for j in 0..d {
            let h = 1e-6;
            let (mut up, mut down) = (xr.clone(), xr.clone());
            up[j] += h;
            down[j] -= h;
            let numeric = (surrogate(&up) - surrogate(&down)) / (2.0 * h);
            let got = got[row * d + j] as f64;
            assert!(
                (numeric - got).abs() <= 1e-4 * numeric.abs().max(1e-3),
                "row {row}, dim {j}: finite difference {numeric}, gradient {got}"
            );
        }
    }
    // Off by default: the reference's estimator, identity gradient.
    let x = rng.normal_tensor([n, d], 0.0, 0.5, &device.clone().without_autodiff());
    let x = x.autodiff().require_grad();
    let grads = plain.forward(x.clone()).quantized.sum().backward();
    assert!(floats(x.grad(&grads).unwrap()).iter().all(|g| *g == 1.0));
}

/// Half-precision inputs: f32 inside, the input's dtype out, f32 state through save and
/// load; the codes of the f16 input are those of its f32 values, and those of the original
/// f32 input wherever the two best codes are further apart than the f16 rounding.
#[test]
fn half_precision_inputs_give_the_f32_codes_and_keep_an_f32_state() {
    #[allow(unused_mut)]
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    match std::env::var_os("RVQ_SKIP_WGPU") {
        Some(_) => eprintln!("RVQ_SKIP_WGPU set: f16 on wgpu SKIPPED"),
        None => devices.push(("wgpu", wgpu_device())),
    }
    for (backend, device) in devices {
        for half in [FloatDType::F16, FloatDType::BF16] {
            if backend == "wgpu" && half == FloatDType::BF16 {
                continue; // WGSL has no bf16.
            }
            let what = format!("{backend}, {half:?}");
            let autodiff = device.clone().autodiff();
            let config = EmaResidualVectorQuantizerConfig::new(3, 32.into(), 8);
            let rvq = seeded_quantizer(&config, &autodiff, 5);
            let reference = seeded_quantizer(&config, &autodiff, 5);
            let mut rng = Rng::new(6);
            let x = rng.normal_tensor([256, 8], 0.0, 1.0, &device);
            let x_half = x.clone().cast(half);
            assert_eq!(x_half.dtype(), DType::from(half));
            let out = rvq.forward(x_half.clone().autodiff());
            assert_eq!(
                out.quantized.dtype(),
                DType::from(half),
                "{what}: output dtype"
            );
            let want = reference.forward(x_half.clone().cast(FloatDType::F32).autodiff());
            rvq.sync_state();
            reference.sync_state();
            assert_eq!(state_bits(&rvq), state_bits(&reference), "{what}: state");
            // The state as stored (`statistics` would read any dtype back as f32).
            let stored = |rvq: &EmaResidualVectorQuantizer| -> Vec<(DType, DType)> {
                struct Dtypes(Vec<DType>);
                impl ModuleVisitor for Dtypes {
                    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                        self.0.push(param.val().dtype());
                    }
                }
                rvq.sync_state();
                let mut dtypes = Dtypes(Vec::new());
                rvq.visit(&mut dtypes);
                // Per level the counts and the sums, then the step counter.
                let pairs = dtypes.0[..dtypes.0.len() - 1].chunks(2);
                pairs.map(|pair| (pair[0], pair[1])).collect()
            };
            assert_eq!(stored(&rvq), vec![(DType::F32, DType::F32); 3], "{what}");
            for (a, b) in out.indices.iter().zip(&want.indices) {
                assert_eq!(ints(a.clone()), ints(b.clone()), "{what}: codes");
            }
            // Against the f32 input: the same first-level codes wherever the gap between the
            // two best codes exceeds what the rounding to half precision moves a distance.
            let eval = rvq.valid();
            let codes = ints(eval.try_encode(x_half.clone(), 1).unwrap().remove(0));
            let codes_f32 = ints(eval.try_encode(x.clone(), 1).unwrap().remove(0));
            let codebook = floats(eval.codebook(0, &Device::flex()));
            let (xs, xh) = (
                floats(x.clone()),
                floats(x_half.clone().cast(FloatDType::F32)),
            );
            let mut compared = 0;
            for row in 0..256 {
                let row_f32 = &xs[row * 8..(row + 1) * 8];
                let mut distances: Vec<f64> = codebook
                    .chunks(8)
                    .map(|e| {
                        row_f32
                            .iter()
                            .zip(e)
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum()
                    })
                    .collect();
                distances.sort_by(f64::total_cmp);
                let shift: f64 = row_f32
                    .iter()
                    .zip(&xh[row * 8..(row + 1) * 8])
                    .map(|(a, b)| ((a - b) as f64).abs())
                    .sum();
                // |d(x') - d(x)| <= 2 |x' - x|_1 max|x - e| + |x' - x|^2: a safe bound.
                if distances[1] - distances[0] > 8.0 * shift * (1.0 + distances[1].sqrt()) {
                    assert_eq!(codes[row], codes_f32[row], "{what}: row {row}");
                    compared += 1;
                }
            }
            // bf16 keeps 8 bits of mantissa to f16's 11: its rounding moves more rows within
            // reach of a tie, and fewer are compared (89 of 256 against 229 for f16 when written).
            let enough = if half == FloatDType::BF16 { 64 } else { 128 };
            assert!(compared >= enough, "{what}: only {compared} rows compared");
            // Statistics imported in half precision are kept in f32.
            let imported = seeded_quantizer(&config, &autodiff, 7);
            let rvq_burn::Statistics {
                counts: count,
                sums: weight,
            } = rvq.statistics(0, &device);
            imported
                .try_set_statistics(0, count.cast(half), weight.cast(half))
                .unwrap();
            assert_eq!(
                stored(&imported),
                vec![(DType::F32, DType::F32); 3],
                "{what}"
            );
            let _ = imported.forward(x_half.clone().autodiff());
            // The f32 state survives a save and a load.
            let path = std::env::temp_dir().join(format!(
                "rvq-half-{}-{backend}-{half:?}.bpk",
                std::process::id()
            ));
            rvq.clone().save_file(&path).unwrap();
            let loaded = seeded_quantizer(&config, &autodiff, 99).load_file(&path);
            assert_eq!(state_bits(&loaded), state_bits(&rvq), "{what}: saved state");
            assert_eq!(stored(&loaded), vec![(DType::F32, DType::F32); 3], "{what}");
            let _ = std::fs::remove_file(path);
            let _ = EmaResidualVectorQuantizer::num_levels(&loaded);
        }
    }
}
