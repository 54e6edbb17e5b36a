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
    /// The device coding runs on (`compress`, `decompress`), and training on one device: the
    /// first of [`Backend::devices`].
    pub fn device(self) -> Result<Device, DemoError> {
        Ok(self.devices(1)?.remove(0))
    }

    /// `count` devices (without autodiff) for training, the first of which is also
    /// [`Backend::device`].
    ///
    /// On the CPU backends: the CPU device `count` times (the workers share the cores). On
    /// WGPU: the adapter WGPU picks by default for one device; for several, the first `count`
    /// adapters found, whatever their kind (discrete, integrated, software). Fails, with the
    /// adapters found, when there are fewer than `count` or one cannot be started.
    #[allow(deprecated)] // ndarray and LibTorch are deprecated in Burn 0.22 but still offered.
    pub fn devices(self, count: usize) -> Result<Vec<Device>, DemoError> {
        if count == 0 {
            return Err(DemoError::Config("--devices must be >= 1, got 0".into()));
        }
        let cpu = |device: Device| Ok(vec![device; count]);
        match self {
            Self::Flex => cpu(Device::flex()),
            #[cfg(feature = "ndarray")]
            Self::NdArray => cpu(Device::ndarray()),
            #[cfg(feature = "tch")]
            Self::Tch => cpu(Device::libtorch()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => gpu::devices(count),
            #[allow(unreachable_patterns)] // parsing refuses a backend not compiled in
            other => Err(DemoError::Config(format!(
                "--backend {}: the demo was built without it",
                other.name()
            ))),
        }
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

/// WGPU's adapters: listed, chosen and started without a panic escaping a worker thread.
#[cfg(feature = "wgpu")]
mod gpu {
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::{Arc, Mutex, PoisonError};

    use burn::tensor::{Device, DeviceKind, DeviceType, Tensor};

    use crate::error::{DemoError, panic_message};

    /// See [`super::Backend::devices`].
    pub(super) fn devices(count: usize) -> Result<Vec<Device>, DemoError> {
        let adapters: Vec<Device> = Device::enumerate(DeviceType::Wgpu).into_vec();
        let found = || format!("adapters found: {adapters:?}");
        if adapters.is_empty() {
            return Err(DemoError::Device(
                "wgpu: no adapter found (no Vulkan, Metal, DX12 or GL driver answered); \
                 train on the CPU with --backend flex"
                    .into(),
            ));
        }
        if adapters.len() < count {
            return Err(DemoError::Device(format!(
                "wgpu: --devices {count} asks for {count} adapters, {} found ({})",
                adapters.len(),
                found()
            )));
        }
        let devices = match count {
            1 => vec![Device::wgpu(DeviceKind::DefaultDevice)],
            _ => adapters[..count].to_vec(),
        };
        for device in &devices {
            start(device).map_err(|reason| {
                DemoError::Device(format!(
                    "wgpu: could not start {device:?}: {reason} ({})",
                    found()
                ))
            })?;
        }
        Ok(devices)
    }

    /// Starts `device` with one small tensor read back: a driver or adapter that fails does
    /// so here, inside CubeCL's device thread, and its panic message becomes the error.
    fn start(device: &Device) -> Result<(), String> {
        let message: Arc<Mutex<Option<String>>> = Arc::default();
        let seen = Arc::clone(&message);
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let text = panic_message(info.payload()).to_string();
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(text);
        }));
        let started = panic::catch_unwind(AssertUnwindSafe(|| {
            Tensor::<1>::zeros([1], device).into_data()
        }));
        panic::set_hook(previous);
        match started {
            Ok(_) => Ok(()),
            Err(_) => {
                let text = message
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                let line = text.lines().next().unwrap_or("it panicked");
                Err(line.chars().take(400).collect())
            }
        }
    }
}
