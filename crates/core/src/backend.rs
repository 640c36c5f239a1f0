//! The one place that names burn's backends.
//!
//! Everything else in shrink takes a [`Device`] and never asks which backend is behind it. A
//! backend that was not compiled in is an error naming the cargo feature that enables it, so a
//! config can say `backend = "wgpu"` on any build and get a useful answer.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The compute backends shrink knows about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend (`burn-flex`), always compiled in: the default.
    #[default]
    Flex,
    /// burn-ndarray, the CPU backend named in the design card (deprecated upstream), behind the
    /// cargo feature `ndarray` of shrink-core.
    Ndarray,
    /// burn-wgpu (Vulkan, Metal, DX12 or a software Vulkan driver), behind the cargo feature
    /// `wgpu` of shrink-core.
    Wgpu,
}

impl BackendKind {
    /// Every backend, compiled in or not.
    pub const ALL: [BackendKind; 3] = [BackendKind::Flex, BackendKind::Ndarray, BackendKind::Wgpu];

    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// The label reports use for "what ran it": the burn crate behind the backend.
    pub fn runner_label(self) -> &'static str {
        match self {
            BackendKind::Flex => "burn-flex",
            BackendKind::Ndarray => "burn-ndarray",
            BackendKind::Wgpu => "burn-wgpu",
        }
    }

    /// The cargo feature of shrink-core (and of the xtask) that compiles this backend in.
    pub fn cargo_feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Flex => None,
            BackendKind::Ndarray => Some("ndarray"),
            BackendKind::Wgpu => Some("wgpu"),
        }
    }

    /// Whether this build of shrink-core contains the backend.
    pub fn is_compiled_in(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The inference device of this backend (no autodiff).
    ///
    /// # Errors
    /// [`Error::BackendNotCompiled`] when the backend's cargo feature was not enabled.
    pub fn device(self) -> Result<Device, Error> {
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            BackendKind::Ndarray => ndarray_device(),
            BackendKind::Wgpu => wgpu_device(),
        }
    }

    /// The error [`BackendKind::device`] gives when this backend is not compiled in (`None`
    /// for flex, which always is): it names the cargo feature to enable.
    pub fn not_compiled_error(self) -> Option<Error> {
        Some(Error::BackendNotCompiled { backend: self.name(), feature: self.cargo_feature()? })
    }

    /// The training device of this backend: the inference device with autodiff enabled.
    ///
    /// # Errors
    /// As [`BackendKind::device`].
    pub fn autodiff_device(self) -> Result<Device, Error> {
        Ok(self.device()?.autodiff())
    }
}

// burn-ndarray is deprecated upstream; this is the one module allowed to construct it.
#[cfg(feature = "ndarray")]
#[allow(deprecated)]
fn ndarray_device() -> Result<Device, Error> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Result<Device, Error> {
    Err(BackendKind::Ndarray.not_compiled_error().expect("ndarray has a feature"))
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, Error> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, Error> {
    Err(BackendKind::Wgpu.not_compiled_error().expect("wgpu has a feature"))
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| Error::UnknownBackend(s.to_string()))
    }
}

/// Sets the number of CPU threads burn's CPU backends use (rayon's global pool).
///
/// Only the first call in a process takes effect: rayon's global pool cannot be resized.
/// Returns the number of threads actually in use.
pub fn set_cpu_threads(threads: usize) -> usize {
    let threads = threads.max(1);
    // An error here means the pool was already built (by an earlier call or by burn itself);
    // the thread count reported below is then the one really in use.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in BackendKind::ALL {
            assert_eq!(b.name().parse::<BackendKind>().unwrap(), b);
        }
        assert!(matches!("cuda".parse::<BackendKind>(), Err(Error::UnknownBackend(_))));
    }

    /// Runs whatever features the build has: the message is checked for every backend with a
    /// feature (the one the device constructors return when it is missing), and each backend's
    /// device is an error exactly when it is not compiled in.
    #[test]
    fn missing_backend_names_its_feature() {
        for b in [BackendKind::Ndarray, BackendKind::Wgpu] {
            let feature = b.cargo_feature().unwrap();
            let err = b.not_compiled_error().unwrap().to_string();
            assert!(err.contains(&format!("`{feature}`")) && err.contains(b.name()), "{err}");
        }
        assert!(BackendKind::Flex.not_compiled_error().is_none());
        assert_eq!(BackendKind::Ndarray.is_compiled_in(), cfg!(feature = "ndarray"));
        assert_eq!(BackendKind::Wgpu.is_compiled_in(), cfg!(feature = "wgpu"));
        for b in BackendKind::ALL {
            match b.device() {
                Ok(_) => assert!(b.is_compiled_in(), "{b}"),
                Err(e) => {
                    assert!(!b.is_compiled_in(), "{b}: {e}");
                    assert_eq!(e.to_string(), b.not_compiled_error().unwrap().to_string());
                }
            }
        }
    }
}
