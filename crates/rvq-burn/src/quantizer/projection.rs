//! The learned projections between the model's space and the codebooks' (`codebook_dim`):
//! vector-quantize-pytorch's `project_in` and `project_out` on `ResidualVQ`, each a linear
//! layer with bias (Burn's [`Linear`], trainable like any parameter).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};

/// `project_in` `[D -> C]` and `project_out` `[C -> D]`. Burn stores a linear layer's weight
/// as `[in, out]`; PyTorch as `[out, in]`.
#[derive(Module, Debug)]
pub struct Projection {
    /// Into the codebooks' space.
    pub project_in: Linear,
    /// Back out of it.
    pub project_out: Linear,
}

/// One projection's values on the host, in PyTorch's layout: `weight` `[out, in]`
/// row-major, `bias` `[out]`.
#[cfg(feature = "pytorch")]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LinearValues {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Projection {
    /// Both layers with PyTorch's (and Burn's) default init, `U(-1/sqrt(in), 1/sqrt(in))`.
    pub(crate) fn init(model_dim: usize, codebook_dim: usize, device: &Device) -> Self {
        Self {
            project_in: LinearConfig::new(model_dim, codebook_dim).init(device),
            project_out: LinearConfig::new(codebook_dim, model_dim).init(device),
        }
    }

    /// `x` `[N, D]` in the codebooks' space, `[N, C]`.
    pub(crate) fn project_in(&self, x: Tensor<2>) -> Tensor<2> {
        apply(&self.project_in, x)
    }

    /// `x` `[N, C]` back in the model's space, `[N, D]`.
    pub(crate) fn project_out(&self, x: Tensor<2>) -> Tensor<2> {
        apply(&self.project_out, x)
    }

    /// Both layers' values, `(project_in, project_out)`.
    #[cfg(feature = "pytorch")]
    pub(crate) fn values(&self) -> (LinearValues, LinearValues) {
        (values(&self.project_in), values(&self.project_out))
    }

    /// The layers with `values` (`(project_in, project_out)`, shapes checked by the caller),
    /// on the device and with the parameter ids of these.
    #[cfg(feature = "pytorch")]
    pub(crate) fn with_values(&self, (inward, outward): (&LinearValues, &LinearValues)) -> Self {
        Self {
            project_in: with_values(&self.project_in, inward),
            project_out: with_values(&self.project_out, outward),
        }
    }
}

/// `x W + b`, the layer's parameters on `x`'s device; a plain input gives a plain output
/// (no autodiff, whatever device the parameters live on).
fn apply(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    let device = x.device();
    let plain = |t: Tensor<2>| match device.is_autodiff() {
        true => t,
        false => t.without_autodiff(),
    };
    let weight = plain(layer.weight.val()).to_device(&device);
    let bias = layer.bias.as_ref().map(|bias| {
        plain(bias.val().unsqueeze::<2>())
            .to_device(&device)
            .squeeze_dim(0)
    });
    linear(x, weight, bias)
}

#[cfg(feature = "pytorch")]
fn values(layer: &Linear) -> LinearValues {
    use crate::util::host_floats;
    // Burn's [in, out] to PyTorch's [out, in].
    let weight = host_floats(layer.weight.val().without_autodiff().transpose());
    let bias = layer.bias.as_ref().map_or_else(Vec::new, |bias| {
        host_floats(bias.val().without_autodiff().unsqueeze::<2>())
    });
    LinearValues { weight, bias }
}

#[cfg(feature = "pytorch")]
fn with_values(layer: &Linear, values: &LinearValues) -> Linear {
    use burn::module::Param;
    use burn::tensor::TensorData;
    let weight = layer.weight.val();
    let [d_in, d_out] = weight.dims();
    let device = weight.device();
    let torch = Tensor::<2>::from_data(
        TensorData::new(values.weight.clone(), [d_out, d_in]),
        &device,
    );
    let mut new_weight = Param::from_tensor(torch.transpose());
    new_weight.id = layer.weight.id;
    let bias = layer.bias.as_ref().map(|bias| {
        let data = TensorData::new(values.bias.clone(), [d_out]);
        let mut new_bias = Param::from_tensor(Tensor::<1>::from_data(data, &device));
        new_bias.id = bias.id;
        new_bias
    });
    Linear {
        weight: new_weight,
        bias,
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::config::EmaResidualVectorQuantizerConfig;
    use crate::options::ForwardOptions;
    use crate::quantizer::EmaResidualVectorQuantizer;
    use crate::util::{host_floats, host_ints};

    /// The four parameters' values `[W_in, b_in, W_out, b_out]` (Burn's layout).
    fn parameters(rvq: &EmaResidualVectorQuantizer) -> [Vec<f32>; 4] {
        let p = rvq.projection.as_ref().unwrap();
        let bias =
            |layer: &Linear| host_floats(layer.bias.as_ref().unwrap().val().unsqueeze::<2>());
        [
            host_floats(p.project_in.weight.val()),
            bias(&p.project_in),
            host_floats(p.project_out.weight.val()),
            bias(&p.project_out),
        ]
    }

    /// `rvq` with parameter `which` (as in [`parameters`]) replaced by `values`.
    fn with_parameter(rvq: &mut EmaResidualVectorQuantizer, which: usize, values: &[f32]) {
        let p = rvq.projection.as_ref().unwrap();
        let layer = if which < 2 {
            &p.project_in
        } else {
            &p.project_out
        };
        let device = layer.weight.val().device();
        let mut new = layer.clone();
        if which.is_multiple_of(2) {
            let shape = layer.weight.val().dims();
            let data = TensorData::new(values.to_vec(), shape);
            new.weight = Param::from_tensor(Tensor::<2>::from_data(data, &device));
        } else {
            let data = TensorData::new(values.to_vec(), [values.len()]);
            new.bias = Some(Param::from_tensor(Tensor::<1>::from_data(data, &device)));
        }
        let p = rvq.projection.as_mut().unwrap();
        match which < 2 {
            true => p.project_in = new,
            false => p.project_out = new,
        }
    }

    /// Gradients through the projections against central finite differences, Euclidean and
    /// cosine: of `sum(G * y)` for `project_out` (where `y` is linear in it), and of the
    /// commitment loss for `project_in` (the codes held fixed: every perturbed forward is
    /// checked to choose the same ones). The straight-through part of `project_in`'s gradient
    /// is no derivative of the forward; the interop cases check it against
    /// vector-quantize-pytorch's numbers.
    #[test]
    fn projection_gradients_equal_finite_differences() {
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        // Seeded: every run checks the same layer and batch.
        plain.seed(5);
        device.seed(5);
        for cosine in [false, true] {
            let mut rvq = EmaResidualVectorQuantizerConfig::new(3, 8.into(), 6)
                .with_codebook_dim(Some(3))
                .with_cosine_similarity(cosine)
                .with_kmeans_init(true)
                .init(&device);
            let x = Tensor::<2>::random([32, 6], Distribution::Normal(0.0, 1.0), &plain);
            let _ = rvq.forward(x.clone().autodiff());
            rvq.sync_state();
            let g = Tensor::<2>::random([32, 6], Distribution::Normal(0.0, 1.0), &plain);
            let no_update = ForwardOptions {
                update_ema: false,
                ..ForwardOptions::default()
            };
            // Value, codes and gradients of parameter `which` for the objective of `which`.
            let objective = |rvq: &EmaResidualVectorQuantizer, which: usize| {
                let out = rvq.forward_with(x.clone().autodiff(), &no_update);
                let codes: Vec<Vec<i64>> = out.indices.iter().cloned().map(host_ints).collect();
                let value = match which < 2 {
                    true => out.loss,
                    false => out.quantized.mul(g.clone().autodiff()).sum(),
                };
                (value, codes)
            };
            for which in 0..4 {
                let (value, codes) = objective(&rvq, which);
                let grads = value.backward();
                let p = rvq.projection.as_ref().unwrap();
                let layer = if which < 2 {
                    &p.project_in
                } else {
                    &p.project_out
                };
                let grad = match which % 2 {
                    0 => host_floats(layer.weight.val().grad(&grads).unwrap()),
                    _ => host_floats(
                        layer
                            .bias
                            .as_ref()
                            .unwrap()
                            .val()
                            .grad(&grads)
                            .unwrap()
                            .unsqueeze::<2>(),
                    ),
                };
                let base = parameters(&rvq)[which].clone();
                for i in 0..base.len() {
                    let mut at = |delta: f32| {
                        let mut values = base.clone();
                        values[i] += delta;
                        with_parameter(&mut rvq, which, &values);
                        let (value, moved) = objective(&rvq, which);
                        (moved == codes).then(|| value.without_autodiff().into_scalar::<f64>())
                    };
                    // The largest step that keeps every code (a row near a boundary between
                    // two codes takes a smaller one).
                    let numeric = [2e-3f32, 5e-4, 1e-4]
                        .into_iter()
                        .find_map(|eps| {
                            let (up, down) = (at(eps)?, at(-eps)?);
                            Some((up - down) / (2.0 * f64::from(eps)))
                        })
                        .unwrap_or_else(|| {
                            panic!("parameter {which}[{i}]: every step moves codes")
                        });
                    with_parameter(&mut rvq, which, &base);
                    let analytic = f64::from(grad[i]);
                    assert!(
                        (numeric - analytic).abs() <= 1e-3 + 1e-2 * analytic.abs(),
                        "cosine {cosine}, parameter {which}[{i}]: finite difference {numeric}, \
                         gradient {analytic}"
                    );
                }
            }
        }
    }
}
