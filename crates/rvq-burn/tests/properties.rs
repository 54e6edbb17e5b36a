//! Property tests over random configurations and input shapes.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use proptest::prelude::*;
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

/// A configuration, an input shape `[..., D]` (rank 1 to 3, leading dimensions 0 to 5) and
/// the input's values.
fn case() -> impl Strategy<Value = (Vec<usize>, usize, Vec<usize>, Vec<f32>, usize)> {
    (
        prop::collection::vec(1usize..12, 1..4),
        1usize..6,
        prop::collection::vec(0usize..6, 0..3),
        1usize..64,
    )
        .prop_flat_map(|(sizes, dim, leading, chunk)| {
            let n: usize = leading.iter().product();
            let values = prop::collection::vec(-2.0f32..2.0, n * dim);
            (Just(sizes), Just(dim), Just(leading), values, Just(chunk))
        })
}

fn quantizer(
    sizes: &[usize],
    dim: usize,
    chunk: usize,
    device: &Device,
) -> EmaResidualVectorQuantizer {
    EmaResidualVectorQuantizerConfig::new(sizes.len(), sizes.to_vec().into(), dim)
        .with_max_distance_elements(chunk)
        .init(device)
}

/// The residual search on the host, in f64: per level, the nearest code's index, and the
/// gap between the best and second-best squared distances (to tell real ties).
fn host_encode(codebooks: &[Vec<f32>], x: &[f32], dim: usize) -> Vec<Vec<(usize, f64)>> {
    let mut residual: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    codebooks
        .iter()
        .map(|codebook| {
            let codes: Vec<&[f32]> = codebook.chunks(dim).collect();
            residual
                .chunks_mut(dim)
                .map(|row| {
                    let mut distances: Vec<(f64, usize)> = codes
                        .iter()
                        .enumerate()
                        .map(|(k, code)| {
                            let d = row
                                .iter()
                                .zip(*code)
                                .map(|(a, &b)| (a - b as f64).powi(2))
                                .sum();
                            (d, k)
                        })
                        .collect();
                    distances.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let (best, index) = distances[0];
                    let gap = distances
                        .get(1)
                        .map_or(f64::INFINITY, |second| second.0 - best);
                    for (r, &c) in row.iter_mut().zip(codes[index]) {
                        *r -= c as f64;
                    }
                    (index, gap)
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_for_any_configuration_and_shape(
        (sizes, dim, leading, values, chunk) in case()
    ) {
        let plain = Device::flex();
        let autodiff = plain.clone().autodiff();
        let rvq = quantizer(&sizes, dim, chunk, &autodiff);
        let mut shape = leading.clone();
        shape.push(dim);
        let n: usize = leading.iter().product();
        let flat: Tensor<2> = Tensor::from_data(TensorData::new(values.clone(), [n, dim]), &plain);

        // A training step first, so the codebooks are not the initial ones.
        let _ = rvq.forward(flat.clone().autodiff());
        let before = state_bits(&rvq);

        // Eval: shape kept, codes in range, state untouched.
        let eval = rvq.valid();
        let out = eval.forward(flat.clone());
        prop_assert_eq!(out.quantized.dims(), [n, dim]);
        prop_assert_eq!(out.indices.len(), sizes.len());
        for (level, indices) in out.indices.iter().enumerate() {
            let codes = ints(indices.clone());
            prop_assert_eq!(codes.len(), n);
            prop_assert!(codes.iter().all(|&c| c >= 0 && (c as usize) < sizes[level]));
        }
        prop_assert_eq!(state_bits(&rvq), before.clone());

        // The same through the rank of the caller's shape (empty dimensions anywhere).
        let dims = match shape.len() {
            1 => eval.forward(Tensor::<1>::from_data(TensorData::new(values.clone(), [dim]), &plain)).quantized.dims().to_vec(),
            2 => eval.forward(Tensor::<2>::from_data(TensorData::new(values.clone(), [shape[0], dim]), &plain)).quantized.dims().to_vec(),
            _ => eval.forward(Tensor::<3>::from_data(TensorData::new(values.clone(), [shape[0], shape[1], dim]), &plain)).quantized.dims().to_vec(),
        };
        prop_assert_eq!(dims, shape.clone());
        if shape.len() == 3 {
            let x3 = Tensor::<3>::from_data(TensorData::new(values.clone(), [shape[0], shape[1], dim]), &autodiff);
            let out3 = rvq.forward_with(x3, &rvq_burn::ForwardOptions::new().with_update_ema(false));
            prop_assert_eq!(out3.quantized.dims().to_vec(), shape.clone());
            prop_assert!(rvq.try_decode(&rvq.encode(flat.clone()), [shape[0], shape[1], dim]).is_ok());
        }

        // decode(encode(x)) is the eval output, up to the rounding of x + (q - x).
        let codes = eval.encode(flat.clone());
        let decoded = floats(eval.decode(&codes, [n, dim]));
        let quantized = floats(out.quantized);
        for (d, q) in decoded.iter().zip(&quantized) {
            prop_assert!((d - q).abs() <= 1e-5 * q.abs().max(1.0), "{} vs {}", d, q);
        }

        // The chunked, matrix-product search equals a plain search on the host (up to
        // near-ties of the f32 distances).
        let codebooks: Vec<Vec<f32>> = (0..sizes.len()).map(|l| floats(rvq.codebook(l, &plain))).collect();
        let host = host_encode(&codebooks, &values, dim);
        // A row that took the other side of a near-tie follows another residual afterwards.
        let mut diverged = vec![false; n];
        for (level, (device_codes, host_codes)) in codes.iter().zip(&host).enumerate() {
            for (row, (&got, &(want, gap))) in ints(device_codes.clone()).iter().zip(host_codes).enumerate() {
                if diverged[row] || got as usize == want {
                    continue;
                }
                prop_assert!(gap < 1e-4, "level {} row {}: {} vs host {} (gap {})", level, row, got, want, gap);
                diverged[row] = true;
            }
        }
        prop_assert_eq!(state_bits(&rvq), before);
    }

    #[test]
    fn dense_statistics_equal_the_scatter_adds(
        (sizes, dim, leading, values, chunk) in case()
    ) {
        let autodiff = Device::flex().autodiff();
        let n: usize = leading.iter().product();
        let scatter = quantizer(&sizes, dim, chunk, &autodiff);
        let dense = EmaResidualVectorQuantizerConfig::new(sizes.len(), sizes.clone().into(), dim)
            .with_max_distance_elements(chunk)
            .with_dense_statistics(true)
            .init(&autodiff);
        for level in 0..sizes.len() {
            let rvq_burn::Statistics {
                counts: count,
                sums: weight,
            } = scatter.statistics(level, &autodiff);
            dense.try_set_statistics(level, count, weight).unwrap();
        }
        let x: Tensor<2> = Tensor::from_data(TensorData::new(values.clone(), [n, dim]), &autodiff);
        let a = scatter.forward(x.clone());
        let b = dense.forward(x);
        for (ia, ib) in a.indices.iter().zip(&b.indices) {
            prop_assert_eq!(ints(ia.clone()), ints(ib.clone()));
        }
        for (ca, cb) in a.code_counts.iter().zip(&b.code_counts) {
            prop_assert_eq!(floats(ca.clone()), floats(cb.clone()));
        }
        scatter.sync_state();
        dense.sync_state();
        let (sa, sb) = (state_bits(&scatter), state_bits(&dense));
        for (level_a, level_b) in sa.iter().zip(&sb) {
            for (&x, &y) in level_a.iter().zip(level_b) {
                let (x, y) = (f32::from_bits(x), f32::from_bits(y));
                prop_assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{} vs {}", x, y);
            }
        }
    }
}

/// The kernel path (WGPU; Mesa's lavapipe in CI) against the tensor path on the same device,
/// through the public API, over random shapes: N from 1, D and K past the kernels' tiles
/// (16 dimensions, 64 codes, 64 dimensions per statistics unit), K past the 512 codes from
/// which the search splits its codes over cubes (N below 200 fills 4 cubes at most: a K of
/// 512 or more takes 2 splits). A training step from the same
/// state gives the same codes but where two codes lie within rounding of each other (and then
/// no check of what follows on that row's later levels), the same counts, sums within 1e-5.
#[cfg(feature = "wgpu")]
mod kernel_path {
    use super::*;
    use rvq_burn::Execution;

    fn wgpu_cases() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>)> {
        (1usize..200, 1usize..80, 1usize..700).prop_flat_map(|(n, d, k)| {
            (
                Just(n),
                Just(d),
                Just(k),
                prop::collection::vec(-2.0f32..2.0, n * d),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn kernel_path_equals_tensor_path((n, d, k, values) in wgpu_cases()) {
            if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
                eprintln!("RVQ_SKIP_WGPU set: kernel path property SKIPPED");
                return Ok(());
            }
            let device = wgpu_device().autodiff();
            let config = EmaResidualVectorQuantizerConfig::new(2, k.into(), d);
            let kernel = seeded_quantizer(&config, &device, 1);
            let tensor = seeded_quantizer(&config.with_execution(Execution::TensorOps), &device, 1);
            let x: Tensor<2> = Tensor::from_data(TensorData::new(values.clone(), [n, d]), &device);
            let a = kernel.forward(x.clone());
            let b = tensor.forward(x);
            // The initial codebooks (drawn on the host, the same on every device), searched in
            // f64 to tell near-ties.
            let initial = seeded_quantizer(&EmaResidualVectorQuantizerConfig::new(2, k.into(), d), &Device::flex(), 1);
            let codebooks: Vec<Vec<f32>> = (0..2).map(|l| floats(initial.codebook(l, &Device::flex()))).collect();
            let host = host_encode(&codebooks, &values, d);
            let mut diverged = vec![false; n];
            for (level, (ia, ib)) in a.indices.iter().zip(&b.indices).enumerate() {
                for (row, (&ca, &cb)) in ints(ia.clone()).iter().zip(&ints(ib.clone())).enumerate() {
                    if ca != cb && !diverged[row] {
                        prop_assert!(host[level][row].1 < 1e-4, "level {} row {}: kernel {} vs tensor {}", level, row, ca, cb);
                        diverged[row] = true;
                    }
                }
            }
            // Where no row took the other side of a tie, the statistics agree.
            if !diverged.contains(&true) {
                for (ca, cb) in a.code_counts.iter().zip(&b.code_counts) {
                    prop_assert_eq!(floats(ca.clone()), floats(cb.clone()));
                }
                kernel.sync_state();
                tensor.sync_state();
                let (sa, sb) = (state_bits(&kernel), state_bits(&tensor));
                for (level_a, level_b) in sa.iter().zip(&sb) {
                    for (&x, &y) in level_a.iter().zip(level_b) {
                        let (x, y) = (f32::from_bits(x), f32::from_bits(y));
                        prop_assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{} vs {}", x, y);
                    }
                }
            }
        }
    }
}
