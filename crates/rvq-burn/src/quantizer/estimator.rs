//! The gradient side of a forward: the commitment loss, the straight-through estimator and
//! the rotation trick, applied once to the levels' results.
//!
//! The straight-through estimator is applied once, after the loop, so `dy/dx` is the identity
//! and the residuals carry no second path to the input; applying it per level multiplies the
//! decoder's gradient by the number of levels or cuts levels > 1 off (encodec issue 25,
//! vector-quantize-pytorch issue 33).
//!
//! Cosine codebooks (vector-quantize-pytorch's `use_cosine_sim`) follow vector-quantize-pytorch's
//! `ResidualVQ` instead: each level's code passes the gradient through the normalization of
//! that level's input, `y = sum_l (n(r_l) + sg(q_l - n(r_l)))` with `r_l = x - sg(q_1 + ... +
//! q_{l-1})` and `n` the L2 normalization (or each level's rotation trick). One estimator on
//! `n(x)` would pass no gradient along `x` itself (`dn(x)/dx` removes that direction), so the
//! encoder could never learn the latents' scale, which the later levels' residuals depend
//! on. The commitment loss of level `l` is `beta * mean((n(r_l) - q_l)^2)`, its gradient
//! through `n(r_l)`.

use burn::tensor::{Bool, Tensor};

use crate::config::EmaResidualVectorQuantizerConfig;
use crate::level::LevelStep;
use crate::output::RvqOutput;
use crate::path::RunningSums;
use crate::util::unit_rows;

/// The forward's output for rows `flat` `[N, D]` (f32, the input's autodiff) from what the
/// levels gave: the per-level and total commitment losses, the output through the
/// straight-through estimator (and the rotation trick, if configured), the codes, the batch
/// histograms and the restarts.
pub(super) fn output(
    flat: Tensor<2>,
    steps: Vec<LevelStep>,
    sums: RunningSums,
    config: &EmaResidualVectorQuantizerConfig,
    update_skipped: Option<Tensor<1, Bool>>,
) -> RvqOutput<2> {
    let [num_vectors, d] = flat.dims();
    let num_levels = steps.len();
    let autodiff = flat.is_autodiff();
    let flat_plain = flat.clone().without_autodiff();
    // loss_l = beta * mean((q_l - r_l)^2) = beta * mean(r_{l+1}^2), and their sum, level
    // after level: each level's terms join the sum before the next level's start, so Burn's
    // fusion sees one growing chain, not one independent chain per level (past five, its
    // search gives up and every operation after them runs unfused).
    let elements = (num_vectors * d) as f64;
    let mut level_losses: Vec<Tensor<1>> = Vec::with_capacity(num_levels);
    let mut total_loss: Option<Tensor<1>> = None;
    for step in &steps {
        let loss = step
            .pass
            .squared_error
            .clone()
            .expect("a forward sums the squared error")
            .div_scalar(elements)
            .mul_scalar(config.beta);
        total_loss = Some(match total_loss {
            None => loss.clone(),
            Some(total) => total.add(loss.clone()),
        });
        level_losses.push(loss);
    }
    let total_loss = total_loss.expect("at least one level");
    let (quantized, loss) = match (config.cosine_similarity, autodiff) {
        (true, true) => {
            let codes: Vec<&Tensor<2>> = steps
                .iter()
                .map(|step| step.unit_codes.as_ref().expect("a cosine level"))
                .collect();
            cosine_autodiff(flat, &codes, total_loss, config)
        }
        // No gradient: the sum of the codes, as vector-quantize-pytorch's evaluation gives.
        (true, false) => (sums.quantized, total_loss),
        (false, _) => {
            let loss = match autodiff {
                true => commitment_loss_autodiff(
                    flat.clone(),
                    &sums,
                    num_levels,
                    total_loss,
                    config.beta,
                ),
                false => total_loss,
            };
            // y = x + sg(q_sum - x): one straight-through estimator, on the sum.
            let straight_through = sums.quantized.clone().sub(flat_plain);
            let straight_through = match autodiff {
                true => straight_through.autodiff(),
                false => straight_through,
            };
            let mut quantized = flat.clone().add(straight_through);
            if autodiff && config.rotation_trick {
                quantized = quantized.add(rotation_gradient(flat, sums.quantized));
            }
            (quantized, loss)
        }
    };
    let restarted_codes = steps.iter().map(|step| step.restarted).collect();
    let (indices, code_counts) = steps
        .into_iter()
        .map(|step| {
            let counts = step.pass.counts.expect("a forward counts");
            (step.pass.indices, counts)
        })
        .unzip();
    RvqOutput {
        quantized,
        indices,
        loss,
        level_losses,
        code_counts,
        restarted_codes,
        update_skipped,
    }
}

/// The total commitment loss on the autodiff device, with the gradient of every level's term.
///
/// `sum_l beta * mean((x - c_l)^2)` with `c_l = q_1 + ... + q_l` (constants), since
/// `r_l - q_l = x - c_l`. Its gradient `2 beta / (N D) * sum_l (x - c_l)` equals that of the
/// single term `beta * M * mean((x - mean_l c_l)^2)`, so one autodiff expression serves all
/// levels; the value is then corrected to the exact sum of the level losses with a constant.
fn commitment_loss_autodiff(
    flat: Tensor<2>,
    sums: &RunningSums,
    num_levels: usize,
    total_loss: Tensor<1>,
    beta: f64,
) -> Tensor<1> {
    // c_l = x - r_{l+1}; mean_l c_l = x - mean_l r_{l+1}
    let flat_plain = flat.clone().without_autodiff();
    let mean_residual = sums.residuals.clone().div_scalar(num_levels as f64);
    let centre = flat_plain.sub(mean_residual).autodiff(); // [N, D] constant
    let surrogate = flat
        .sub(centre)
        .powi_scalar(2)
        .mean()
        .mul_scalar(beta * num_levels as f64);
    let correction = total_loss
        .sub(surrogate.clone().without_autodiff())
        .autodiff();
    surrogate.add(correction)
}

/// The output and total commitment loss of cosine levels on the autodiff device, level by
/// level as vector-quantize-pytorch's `ResidualVQ` computes them: with `r_l = x - c_{l-1}`,
/// `c_{l-1} = q_1 + ... + q_{l-1}` (constants) and `s_l = n(r_l)`, the output `sum_l (s_l +
/// sg(q_l - s_l))` (plus each level's rotation-trick term, if configured) and the loss `sum_l
/// beta * mean((s_l - q_l)^2)`, its value then corrected to the exact sum of the level losses
/// with a constant, as [`commitment_loss_autodiff`] does.
fn cosine_autodiff(
    flat: Tensor<2>,
    codes: &[&Tensor<2>],
    total_loss: Tensor<1>,
    config: &EmaResidualVectorQuantizerConfig,
) -> (Tensor<2>, Tensor<1>) {
    let mut before: Option<Tensor<2>> = None; // c_{l-1}
    let mut output: Option<Tensor<2>> = None;
    let mut surrogate: Option<Tensor<1>> = None;
    for &code in codes {
        let residual = match &before {
            None => flat.clone(),
            Some(sum) => flat.clone().sub(sum.clone().autodiff()),
        };
        let source = unit_rows(residual); // s_l
        let source_plain = source.clone().without_autodiff();
        let mut level = source
            .clone()
            .add(code.clone().sub(source_plain).autodiff());
        if config.rotation_trick {
            level = level.add(rotation_gradient(source.clone(), code.clone()));
        }
        let term = source
            .sub(code.clone().autodiff())
            .powi_scalar(2)
            .mean()
            .mul_scalar(config.beta);
        output = Some(match output {
            None => level,
            Some(sum) => sum.add(level),
        });
        surrogate = Some(match surrogate {
            None => term,
            Some(total) => total.add(term),
        });
        before = Some(match before {
            None => code.clone(),
            Some(sum) => sum.add(code.clone()),
        });
    }
    let (output, surrogate) = (
        output.expect("at least one level"),
        surrogate.expect("at least one level"),
    );
    let correction = total_loss
        .sub(surrogate.clone().without_autodiff())
        .autodiff();
    (output, surrogate.add(correction))
}

/// The rotation trick's correction to the straight-through output `y = x + sg(q - x)`: a
/// term of value zero whose gradient turns `dy/dx` from the identity into `lambda R`, where
/// `R` rotates each row's direction `u = x / |x|` onto `q^ = q / |q|` and `lambda = |q| / |x|`
/// (Fifty et al. 2024, section 4.2; `R`, `lambda` are constants).
///
/// `R v = v - 2 (v.w) w + 2 (v.u) q^` with `w = (u + q^) / |u + q^|`: two Householder
/// reflections, `[N, D]` work, nothing of size `D x D`. With `f(x) = lambda R x` the term is
/// `(f - sg(f)) - (x - sg(x))`, exactly zero in value (so the output keeps the
/// straight-through estimator's floats) and of gradient `lambda R^T g - g`. Norms below 1e-6
/// are taken as 1e-6 in the divisions, as vector-quantize-pytorch does.
fn rotation_gradient(x: Tensor<2>, quantized: Tensor<2>) -> Tensor<2> {
    const EPS: f64 = 1e-6;
    let norm = |t: &Tensor<2>| t.clone().powi_scalar(2).sum_dim(1).sqrt(); // [N, 1]
    let x_plain = x.clone().without_autodiff();
    let (x_norm, q_norm) = (norm(&x_plain), norm(&quantized));
    let u = x_plain.div(x_norm.clone().clamp_min(EPS)); // [N, D]
    let q_hat = quantized.div(q_norm.clone().clamp_min(EPS)); // [N, D]
    let w = u.clone().add(q_hat.clone());
    let w = w.clone().div(norm(&w).clamp_min(EPS)); // [N, D]
    let scale = q_norm.div(x_norm.clamp_min(EPS)); // [N, 1]
    let (u, q_hat, w, scale) = (
        u.autodiff(),
        q_hat.autodiff(),
        w.autodiff(),
        scale.autodiff(),
    );
    let along = |direction: &Tensor<2>| x.clone().mul(direction.clone()).sum_dim(1); // [N, 1]
    let rotated = x
        .clone()
        .sub(along(&w).mul_scalar(2.0).mul(w.clone()))
        .add(along(&u).mul_scalar(2.0).mul(q_hat))
        .mul(scale); // lambda R x
    let identity = x.clone().sub(x.detach());
    rotated.clone().sub(rotated.detach()).sub(identity)
}
