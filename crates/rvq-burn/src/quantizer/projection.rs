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
    pub(crate) fn into_codebooks(&self, x: Tensor<2>) -> Tensor<2> {
        apply(&self.project_in, x)
    }

    /// `x` `[N, C]` back in the model's space, `[N, D]`.
    pub(crate) fn out_of_codebooks(&self, x: Tensor<2>) -> Tensor<2> {
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
