//! The kernel path against the tensor path and Burn's operations, on WGPU (Mesa's lavapipe
//! in CI).

use burn::tensor::{Device, TensorData};

use super::*;
use crate::path::tensor::{Search, TensorPath, nearest_indices, per_code_sums};
use crate::util::{SplitMix64, host_floats, host_ints};

fn device() -> Option<Device> {
    if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
        eprintln!("RVQ_SKIP_WGPU set: kernel path test SKIPPED");
        return None;
    }
    Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

/// Uniform values in `[-0.5, 0.5)`, a fixed sequence per `seed`.
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut hash = SplitMix64::new(seed);
    move || (hash.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// The tensor path every test compares with.
fn tensor_path() -> TensorPath {
    TensorPath(Search {
        max_elements: 1 << 24,
        dense: false,
    })
}

fn tensor(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn host_bools(tensor: Tensor<1, Bool>) -> Vec<bool> {
    tensor.into_data().iter::<bool>().collect()
}

/// The kernel path equals the tensor path on WGPU (Mesa's lavapipe in CI): the same codes
/// but where two codes lie at distances float rounding orders differently, the same
/// counts, sums within 1e-5; over shapes with K below, at and past the 64-code tile, D
/// below, at and past the 16-wide depth tile and the 64 dimensions a statistics unit
/// covers, N = 1, N past one cube's 64 rows and past several 256-row blocks of the
/// counting sort (with one code taking every row, and K past N); the statistics bit for
/// bit the same on a second run, and the counts alone equal to the counts with the sums;
/// and a decode of three levels equal to the tensor path's; exact ties resolved to the
/// first code.
#[test]
fn kernel_path_equals_tensor_path() {
    let Some(device) = device() else { return };
    let mut uniform = uniform(17);
    let tensor_path = tensor_path();
    for (n, d, k) in [
        (1, 3, 1),
        (37, 5, 7),
        (64, 16, 64),
        (65, 17, 65),
        (300, 70, 130),
        (129, 1, 5),
        (200, 64, 300),
        (1000, 9, 3),
        (777, 4, 1),
        (513, 130, 600),
    ] {
        let what = format!("N = {n}, D = {d}, K = {k}");
        let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
        let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
        let (rows, codebook) = (tensor(&x, [n, d], &device), tensor(&codes, [k, d], &device));
        let mut kernel_rows = TensorRows::start(rows.clone(), Work::TRAINING);
        let got = KernelPath.level(codebook.clone(), &mut kernel_rows, Work::TRAINING);
        let got_codes = host_ints(got.indices.clone());
        let want_codes = host_ints(nearest_indices(&codebook, rows.clone(), 1 << 24));
        let distance = |row: usize, code: i64| -> f64 {
            (0..d)
                .map(|j| (x[row * d + j] as f64 - codes[code as usize * d + j] as f64).powi(2))
                .sum()
        };
        for (row, (g, w)) in got_codes.iter().zip(&want_codes).enumerate() {
            assert!((0..k as i64).contains(g), "{what}: code {g} out of range");
            let (dg, dw) = (distance(row, *g), distance(row, *w));
            assert!(
                g == w || (dg - dw).abs() <= 1e-5 * dw.max(1.0),
                "{what}, row {row}: kernel code {g} at {dg}, tensor code {w} at {dw}"
            );
        }
        // The statistics of the kernel's codes, against the tensor operations.
        let mut want_rows = TensorRows::start(rows.clone(), Work::TRAINING);
        let counts = host_floats(got.counts.unwrap());
        let mut expected = vec![0.0f32; k];
        for &code in &got_codes {
            expected[code as usize] += 1.0;
        }
        assert_eq!(counts, expected, "{what}: counts");
        let sums = host_floats(got.sums.unwrap());
        let want_sums = host_floats(per_code_sums(&got.indices, rows.clone(), k, tensor_path.0));
        for (i, (a, b)) in sums.iter().zip(&want_sums).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: sums[{i}] {a} vs {b}"
            );
        }
        // Deterministic: the same floats again; and the counts alone.
        let unread = Tensor::<1>::zeros([1], &device);
        let again = statistics(
            rows.clone(),
            got.indices.clone(),
            unread.clone(),
            k,
            None,
            false,
        );
        assert_eq!(
            host_floats(again.counts.unwrap()),
            counts,
            "{what}: counts, second run"
        );
        let again_sums = host_floats(again.sums.unwrap());
        assert_eq!(again_sums, sums, "{what}: sums, second run");
        let alone = code_counts(rows.clone(), got.indices.clone(), unread, k, false);
        assert_eq!(
            host_floats(alone.counts.unwrap()),
            counts,
            "{what}: counts alone"
        );
        // The rest of the level is tensor operations on both paths.
        let want = tensor_path.level(codebook.clone(), &mut want_rows, Work::TRAINING);
        if got_codes == want_codes {
            let (a, b) = (
                host_floats(got.squared_error.unwrap()),
                host_floats(want.squared_error.unwrap()),
            );
            assert!(
                (a[0] - b[0]).abs() <= 1e-5 * b[0].max(1.0),
                "{what}: {a:?} vs {b:?}"
            );
        }
    }

    // Decode: three levels of different sizes, one launch.
    let (n, d) = (257, 6);
    let sizes = [7, 64, 3];
    let codebooks: Vec<Tensor<2>> = sizes
        .iter()
        .map(|&k| {
            let values: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
            tensor(&values, [k, d], &device)
        })
        .collect();
    let indices: Vec<Tensor<1, Int>> = sizes
        .iter()
        .map(|&k| {
            let values: Vec<i64> = (0..n).map(|i| ((i * 31 + k) % k) as i64).collect();
            int_tensor(values, &device)
        })
        .collect();
    let got = host_floats(KernelPath.decode(codebooks.clone(), &indices).unwrap());
    let want = host_floats(tensor_path.decode(codebooks.clone(), &indices).unwrap());
    assert_eq!(got, want, "decode");
    // Ties: codes equal to the nearest one in another lane of the same 64-code tile (2 and
    // 5) and in a later tile (67): the first wins, as on every path.
    let (n, d, k) = (70, 3, 130);
    let mut codes = vec![9.0f32; k * d];
    for code in [2, 5, 67] {
        codes[code * d..(code + 1) * d].copy_from_slice(&[0.25, -0.5, 0.125]);
    }
    let rows: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 * 0.01).collect();
    let (x, codebook) = (
        tensor(&rows, [n, d], &device),
        tensor(&codes, [k, d], &device),
    );
    assert_eq!(
        host_ints(nearest(x.clone(), codebook)),
        vec![2; n],
        "2 = 5 = 67"
    );
    codes[2 * d..3 * d].copy_from_slice(&[9.0; 3]);
    let codebook = tensor(&codes, [k, d], &device);
    assert_eq!(host_ints(nearest(x, codebook)), vec![5; n], "5 = 67");

    let mut bad = indices.clone();
    bad[1] = int_tensor(vec![64; indices[1].dims()[0]], &device);
    assert!(matches!(
        KernelPath.decode(codebooks, &bad),
        Err(RvqError::IndexOutOfRange { level: 1, .. })
    ));
}

/// The codebook kernel equals `EmaResidualVectorQuantizerConfig::codebook` (Burn's
/// tensor operations) within 1e-5, and its norms the rows' squared norms: both rules,
/// Euclidean and cosine, over levels with K below, at and past the 4 codes of a cube's
/// group and past 1024 cubes' groups (several groups per cube), D below, at and past a
/// unit's 64 dimensions; with counts of zero and below epsilon, and a code whose sums are
/// zero (its cosine row stays zero: the length is taken as 1e-6). The levels derived
/// together in one launch equal each derived alone, to the bit.
#[test]
fn codebook_kernel_equals_the_rule() {
    let Some(device) = device() else { return };
    let mut centred = uniform(29);
    let mut uniform = move || centred() + 0.5;
    let sizes = [1, 3, 4, 5, 130, 4100];
    for d in [1, 3, 5, 64, 65, 70] {
        let levels: Vec<(Tensor<1>, Tensor<2>)> = sizes
            .iter()
            .map(|&k| {
                let counts: Vec<f32> = (0..k)
                    .map(|i| match i % 5 {
                        0 => 0.0,
                        1 => 1e-7,
                        _ => 10.0 * uniform(),
                    })
                    .collect();
                let mut sums: Vec<f32> = (0..k * d).map(|_| uniform() - 0.5).collect();
                sums[..d].fill(0.0);
                let counts = Tensor::<1>::from_data(TensorData::new(counts, [k]), &device);
                (counts, tensor(&sums, [k, d], &device))
            })
            .collect();
        let (all_counts, all_sums): (Vec<_>, Vec<_>) = levels.iter().cloned().unzip();
        for rule in [CodebookRule::Laplace, CodebookRule::Clamp] {
            for cosine in [false, true] {
                let config = EmaResidualVectorQuantizerConfig::new(sizes.len(), 1.into(), d)
                    .with_codebook_rule(rule)
                    .with_cosine_similarity(cosine);
                let together = KernelPath.codebooks(all_counts.clone(), all_sums.clone(), &config);
                assert_eq!(together.len(), sizes.len());
                for ((k, (counts, sums)), together) in sizes.iter().zip(&levels).zip(together) {
                    let what = format!("K = {k}, D = {d}, {rule:?}, cosine {cosine}");
                    let mut alone =
                        KernelPath.codebooks(vec![counts.clone()], vec![sums.clone()], &config);
                    let got = alone.pop().expect("one codebook");
                    let want = config.codebook(counts.clone(), sums.clone());
                    // NaN where both are (a total count of zero: 0 / 0, as Burn gives it).
                    let close = |a: f32, b: f32| {
                        a == b
                            || (a.is_nan() && b.is_nan())
                            || (a - b).abs() <= 1e-5 * b.abs().max(1.0)
                    };
                    let (vectors, norms) = (got.vectors, got.norms);
                    let vectors = host_floats(vectors);
                    let want_vectors = host_floats(want);
                    for (i, (a, b)) in vectors.iter().zip(&want_vectors).enumerate() {
                        assert!(close(*a, *b), "{what}: codebook[{i}] {a} vs {b}");
                    }
                    let plain = config
                        .clone()
                        .with_cosine_similarity(false)
                        .codebook(counts.clone(), sums.clone());
                    let want_norms = host_floats(plain.powi_scalar(2).sum_dim(1).reshape([*k]));
                    let norms = host_floats(norms.expect("the kernel path's norms"));
                    for (i, (a, b)) in norms.iter().zip(&want_norms).enumerate() {
                        assert!(close(*a, *b), "{what}: norms[{i}] {a} vs {b}");
                    }
                    let bits =
                        |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    let (together_vectors, together_norms) = (together.vectors, together.norms);
                    let together_vectors = host_floats(together_vectors);
                    let together_norms = host_floats(together_norms.expect("norms"));
                    assert_eq!(
                        bits(&together_vectors),
                        bits(&vectors),
                        "{what}: codes together"
                    );
                    assert_eq!(
                        bits(&together_norms),
                        bits(&norms),
                        "{what}: norms together"
                    );
                }
            }
        }
    }
}

/// The kernel path's non-finite check equals Burn's `is_finite().all()`: finite batches
/// (with the largest and the smallest floats) pass, and one NaN, infinity or negative
/// infinity anywhere (first, last, in a later cube's stride) is found, over lengths below,
/// at and past one cube's 256 units and past 1024 cubes' (several values per unit).
#[test]
fn non_finite_check_equals_burns() {
    let Some(device) = device() else { return };
    for (n, d) in [(1, 1), (255, 1), (16, 16), (257, 1), (3000, 100)] {
        let len = n * d;
        let mut values: Vec<f32> = (0..len).map(|i| (i % 13) as f32 - 6.0).collect();
        values[0] = f32::MAX;
        values[len - 1] = f32::MIN_POSITIVE / 4.0;
        let mut cases = vec![("finite", values.clone())];
        for (what, bad) in [
            ("NaN", f32::NAN),
            ("infinity", f32::INFINITY),
            ("-infinity", f32::NEG_INFINITY),
        ] {
            for at in [0, len / 2, len - 1] {
                let mut with_bad = values.clone();
                with_bad[at] = bad;
                cases.push((what, with_bad));
            }
        }
        for (what, values) in cases {
            let x = tensor(&values, [n, d], &device);
            let got = host_bools(KernelPath.non_finite(x.clone()));
            let want = host_bools(x.is_finite().all().bool_not());
            assert_eq!(got, want, "[{n}, {d}], {what}");
            assert_eq!(got, vec![what != "finite"], "[{n}, {d}], {what}");
        }
    }
}

/// The search kernel's epilogue equals the tensor operations it replaces, over two levels
/// (the first without running sums to add to, the second with): for every row whose codes
/// agree on both paths (all but rows within rounding of a tie), the same next residual and
/// running sums to the bit (the same f32 operations, row by row), and the squared errors
/// within 1e-5 where every code agrees; without an output (encode), the residual alone.
#[test]
fn search_epilogue_equals_tensor_ops() {
    let Some(device) = device() else { return };
    let mut uniform = uniform(41);
    let tensor_path = tensor_path();
    for (n, d, k) in [
        (1, 3, 1),
        (65, 17, 65),
        (300, 70, 130),
        (129, 1, 5),
        (64, 64, 7),
    ] {
        // The squared error without the counts (a cosine level of `encode` with an
        // output) is summed in a launch of its own.
        let output_alone = Work {
            output: true,
            ..Work::CODES
        };
        for work in [Work::TRAINING, Work::EVALUATION, Work::CODES, output_alone] {
            let what = format!("N = {n}, D = {d}, K = {k}, {work:?}");
            let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
            let rows = tensor(&x, [n, d], &device);
            let mut kernel_rows = TensorRows::start(rows.clone(), work);
            let mut tensor_rows = TensorRows::start(rows, work);
            let mut agree = vec![true; n];
            let mut errors = Vec::new();
            for _level in 0..2 {
                let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
                let codebook = tensor(&codes, [k, d], &device);
                let got = KernelPath.level(codebook.clone(), &mut kernel_rows, work);
                let want = tensor_path.level(codebook, &mut tensor_rows, work);
                let (a, b) = (host_ints(got.indices), host_ints(want.indices));
                for (row, (a, b)) in a.iter().zip(&b).enumerate() {
                    agree[row] &= a == b;
                }
                errors.push((got.squared_error, want.squared_error));
            }
            let agreeing = agree.iter().filter(|&&a| a).count();
            assert!(
                agreeing * 10 >= n * 9,
                "{what}: {agreeing} of {n} rows agree"
            );
            let same_rows = |name: &str, a: Tensor<2>, b: Tensor<2>| {
                let (a, b) = (host_floats(a), host_floats(b));
                for row in (0..n).filter(|&row| agree[row]) {
                    assert_eq!(
                        a[row * d..(row + 1) * d],
                        b[row * d..(row + 1) * d],
                        "{what}: {name}, row {row}"
                    );
                }
            };
            same_rows("residual", kernel_rows.residual(), tensor_rows.residual());
            match (kernel_rows.finish(), tensor_rows.finish()) {
                (Some(a), Some(b)) => {
                    same_rows("quantized sum", a.quantized, b.quantized);
                    same_rows("residual sum", a.residuals, b.residuals);
                }
                (None, None) => assert!(!work.output, "{what}: no running sums"),
                _ => panic!("{what}: running sums on one path only"),
            }
            for (level, (a, b)) in errors.into_iter().enumerate() {
                match (a, b) {
                    (Some(a), Some(b)) if agreeing == n => {
                        let (a, b) = (host_floats(a)[0], host_floats(b)[0]);
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{what}: level {level} squared error {a} vs {b}"
                        );
                    }
                    (Some(_), Some(_)) => {}
                    (None, None) => assert!(!work.output, "{what}: no squared error"),
                    _ => panic!("{what}: a squared error on one path only"),
                }
            }
        }
    }
}

/// The search split over its codes equals the whole search to the bit (codes, next
/// residual, running sums at a first and a later level, squared-error partials), over splits
/// of one tile and of several, a number of splits that does not divide the tiles, more splits
/// asked than tiles, K not a multiple of the tile, N = 1, D with vectors of 4, 2 and 1, and
/// exact ties across splits (the codebook's second half a copy of its first: the first
/// minimum is in the first half); and the split counts the path picks (`RVQ_SEARCH_SPLITS`
/// aside).
#[test]
fn split_search_equals_the_whole_search() {
    assert_eq!(extension::chosen_splits(4096, 256), 1, "small: no split");
    assert_eq!(extension::chosen_splits(8192, 2048), 2, "codec");
    assert_eq!(
        extension::chosen_splits(16384, 1024),
        1,
        "medium: cubes enough"
    );
    assert_eq!(
        extension::chosen_splits(64, 4096),
        16,
        "one cube, many codes"
    );
    assert_eq!(
        extension::chosen_splits(64, 255),
        1,
        "fewer codes than a split takes"
    );
    assert_eq!(extension::chosen_splits(0, 4096), 16, "no rows");
    let Some(device) = device() else { return };
    let mut uniform = uniform(53);
    for (n, d, k, splits) in [
        (1, 3, 130, vec![2, 3]),
        (65, 17, 300, vec![2, 3, 5, 9]),
        (200, 64, 1000, vec![3, 16]),
        (129, 70, 129, vec![3]),
        (300, 8, 256, vec![2, 4]),
    ] {
        let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
        let mut codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
        let half = k / 2;
        codes.copy_within(0..half * d, half * d);
        let rows = tensor(&x, [n, d], &device);
        let codebook = tensor(&codes, [k, d], &device);
        let second = tensor(&codes[d..].repeat(2)[..k * d], [k, d], &device);
        let pass = |splits: usize| {
            let one = search_in_splits(
                rows.clone(),
                codebook.clone(),
                Pricing::default(),
                None,
                (true, true),
                splits,
            );
            let two = search_in_splits(
                one.next.clone(),
                second.clone(),
                Pricing::default(),
                one.running.as_ref(),
                (true, true),
                splits,
            );
            [one, two].map(|level| {
                let running = level.running.expect("running sums asked");
                (
                    host_ints(level.indices),
                    [
                        level.next,
                        running.quantized,
                        running.residuals,
                        level.partials.reshape([1, -1]),
                    ]
                    .map(host_floats),
                )
            })
        };
        let whole = pass(1);
        let copies = whole[0]
            .0
            .iter()
            .filter(|&&code| (half..2 * half).contains(&(code as usize)));
        assert_eq!(
            copies.count(),
            0,
            "N = {n}, K = {k}: ties go to the first copy"
        );
        for split in splits {
            let what = format!("N = {n}, D = {d}, K = {k}, {split} splits");
            for (level, (got, want)) in pass(split).iter().zip(&whole).enumerate() {
                assert_eq!(got.0, want.0, "{what}, level {level}: codes");
                for (name, (a, b)) in ["next", "quantized sum", "residual sum", "partials"]
                    .iter()
                    .zip(got.1.iter().zip(&want.1))
                {
                    assert_eq!(a, b, "{what}, level {level}: {name}");
                }
            }
        }
    }
}

/// The EMA update made in the per-code sums' launch equals the update by tensor operations
/// (`EmaUpdate::apply`, every other path's) of the same path's plain training pass: the
/// same codes, batch counts, residual and squared error to the bit, the updated counts and
/// sums within 1e-5; with `skip` set, the state to the bit as it was. Over shapes past the
/// 64 rows of a search cube, the 256 rows of a sort block and the 64 dimensions of a sums
/// unit, K past N, and two decays.
#[test]
fn ema_update_in_the_pass_equals_the_tensor_ops() {
    let Some(device) = device() else { return };
    let mut uniform = uniform(53);
    for (n, d, k) in [
        (1, 3, 1),
        (65, 17, 7),
        (300, 70, 130),
        (40, 5, 90),
        (513, 64, 64),
    ] {
        for (decay, skip) in [(0.99, false), (0.8, false), (0.99, true)] {
            let what = format!("N = {n}, D = {d}, K = {k}, decay {decay}, skip {skip}");
            let x: Vec<f32> = (0..n * d).map(|_| uniform()).collect();
            let codes: Vec<f32> = (0..k * d).map(|_| uniform()).collect();
            let counts: Vec<f32> = (0..k).map(|_| 4.0 * (uniform() + 0.5)).collect();
            let rows = tensor(&x, [n, d], &device);
            let codebook = tensor(&codes, [k, d], &device);
            let update = EmaUpdate {
                counts: Tensor::from_data(TensorData::new(counts.clone(), [k]), &device),
                sums: tensor(&codes, [k, d], &device),
                decay,
                skip: Tensor::from_data(TensorData::new(vec![skip], [1]), &device),
            };
            let mut fused_rows = TensorRows::start(rows.clone(), Work::TRAINING);
            let got = KernelPath.level_updating(
                codebook.clone(),
                Pricing::default(),
                &mut fused_rows,
                update.clone(),
            );
            let mut plain_rows = TensorRows::start(rows, Work::TRAINING);
            let plain = KernelPath.level(codebook, &mut plain_rows, Work::TRAINING);
            let want = update.apply(plain);
            let ints = |t: Tensor<1, Int>| host_ints(t);
            assert_eq!(
                ints(got.pass.indices),
                ints(want.pass.indices),
                "{what}: codes"
            );
            let floats = |t: Option<Tensor<1>>| host_floats(t.expect("asked for"));
            assert_eq!(
                floats(got.pass.counts),
                floats(want.pass.counts),
                "{what}: batch counts"
            );
            assert_eq!(
                floats(got.pass.squared_error),
                floats(want.pass.squared_error),
                "{what}: squared error"
            );
            assert_eq!(
                host_floats(fused_rows.residual()),
                host_floats(plain_rows.residual()),
                "{what}: residual"
            );
            let (got_counts, got_sums) = (host_floats(got.counts), host_floats(got.sums));
            if skip {
                assert_eq!(got_counts, counts, "{what}: counts kept");
                assert_eq!(got_sums, codes, "{what}: sums kept");
                continue;
            }
            let close = |name: &str, a: &[f32], b: &[f32]| {
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{what}: {name}[{i}] {a} vs {b}"
                    );
                }
            };
            close("counts", &got_counts, &host_floats(want.counts));
            close("sums", &got_sums, &host_floats(want.sums));
        }
    }
}
