//! Which device the demo trains on.

use burn::tensor::Device;

use crate::error::DemoError;

/// A backend the demo was compiled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Burn's pure-Rust CPU backend.
    Flex,
    /// Burn's ndarray CPU backend, with `--features ndarray`.
    NdArray,
    /// WGPU (Vulkan, Metal, DX12 or GL; any GPU), with `--features wgpu`.
    Wgpu,
    /// Burn's LibTorch backend on the CPU (PyTorch's own kernels; deprecated by Burn), with
    /// `--features tch` and LibTorch 2.9.0 (`scripts/libtorch-env.sh`).
    Tch,
}

impl Default for Backend {
    /// WGPU when compiled in, else the fastest CPU backend compiled in: LibTorch, then flex
    /// (measured on the demo: README).
    fn default() -> Self {
        if cfg!(feature = "wgpu") {
            Self::Wgpu
        } else if cfg!(feature = "tch") {
            Self::Tch
        } else {
            Self::Flex
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DemoError;

    fn from_str(name: &str) -> Result<Self, DemoError> {
        match name {
            "flex" => Ok(Self::Flex),
            "ndarray" if cfg!(feature = "ndarray") => Ok(Self::NdArray),
            "ndarray" => Err(DemoError::Config(
                "--backend ndarray needs the demo built with --features ndarray".into(),
            )),
            "tch" if cfg!(feature = "tch") => Ok(Self::Tch),
            "tch" => Err(DemoError::Config(
                "--backend tch needs the demo built with --features tch".into(),
            )),
            "wgpu" if cfg!(feature = "wgpu") => Ok(Self::Wgpu),
            "wgpu" => Err(DemoError::Config(
                "--backend wgpu needs the demo built with --features wgpu".into(),
            )),
            other => Err(DemoError::Config(format!(
                "--backend {other:?}: expected flex, ndarray, tch or wgpu"
            ))),
        }
    }
}

impl Backend {
    /// The (non-autodiff) device.
    #[allow(deprecated)] // ndarray is deprecated in Burn 0.22 but still offered.
    pub fn device(self) -> Device {
        match self {
            Self::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            Self::NdArray => Device::ndarray(),
            #[cfg(not(feature = "ndarray"))]
            Self::NdArray => unreachable!("parsing refuses ndarray without the feature"),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(not(feature = "wgpu"))]
            Self::Wgpu => unreachable!("parsing refuses wgpu without the feature"),
            #[cfg(feature = "tch")]
            Self::Tch => Device::libtorch(),
            #[cfg(not(feature = "tch"))]
            Self::Tch => unreachable!("parsing refuses tch without the feature"),
        }
    }

    /// `count` devices for data-parallel training: the CPU device `count` times (the
    /// workers then share the cores), or the first `count` discrete GPUs.
    #[allow(deprecated)]
    pub fn devices(self, count: usize) -> Vec<Device> {
        (0..count)
            .map(|index| match self {
                #[cfg(feature = "wgpu")]
                Self::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(index)),
                _ => {
                    let _ = index;
                    self.device()
                }
            })
            .collect()
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex (CPU)",
            Self::NdArray => "ndarray (CPU)",
            Self::Wgpu => "wgpu",
            Self::Tch => "tch (LibTorch, CPU)",
        }
    }
}
