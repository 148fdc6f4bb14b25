//! Device names: the one grammar that `--device` and `training.device` are read with. Opening
//! the device a name stands for is `ops::device::open`'s job.

use std::fmt;
use std::str::FromStr;

/// The names [`DeviceSpec`] accepts, as error messages list them.
pub const DEVICE_NAMES: &str = "auto, cpu, cuda, cuda:N or metal";

/// A device as the user names it: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Metal, then CUDA, then the CPU: the first this build and machine have.
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device of this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first Metal device.
    Metal,
}

/// A name that is not a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?}: expected {DEVICE_NAMES}")]
pub struct UnknownDevice(pub String);

impl FromStr for DeviceSpec {
    type Err = UnknownDevice;

    fn from_str(name: &str) -> Result<Self, UnknownDevice> {
        match name {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| UnknownDevice(name.into())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (name, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("metal", DeviceSpec::Metal),
        ] {
            assert_eq!(name.parse(), Ok(spec));
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!(
            DeviceSpec::Cuda(0).to_string().parse(),
            Ok(DeviceSpec::Cuda(0))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            assert_eq!(bad.parse::<DeviceSpec>(), Err(UnknownDevice(bad.into())));
        }
        assert_eq!(
            "tpu".parse::<DeviceSpec>().unwrap_err().to_string(),
            "unknown device \"tpu\": expected auto, cpu, cuda, cuda:N or metal"
        );
    }

    #[test]
    fn training_device_is_validated_with_the_same_grammar() {
        let issues = |device: &str| {
            let yaml = format!("training:\n  device: {device:?}\n");
            match crate::load_str(&yaml, std::path::Path::new("run.yaml"), &[]) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        let bad = issues("gpu");
        assert!(
            bad.contains("training.device")
                && bad.contains("expected auto, cpu, cuda, cuda:N or metal, got \"gpu\""),
            "{bad}"
        );
        for good in ["auto", "cpu", "cuda", "cuda:2", "metal"] {
            let text = issues(good);
            assert!(!text.contains("training.device"), "{good}: {text}");
        }
    }
}
