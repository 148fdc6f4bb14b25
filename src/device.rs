//! Choosing the compute device. Everything device-specific stays behind candle's `Device`.

use candle_core::Device;

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a device.
    #[error("unknown device {0:?}: expected auto, cpu, cuda, cuda:N or metal")]
    Unknown(String),
    /// The device exists by name but this build or machine lacks it.
    #[error("device {name} is not available: {reason}")]
    Unavailable { name: String, reason: String },
}

/// Opens `name`: `auto` (Metal, then CUDA, then CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn open(name: &str) -> Result<Device, DeviceError> {
    let unavailable = |e: candle_core::Error| DeviceError::Unavailable {
        name: name.to_string(),
        reason: e.to_string(),
    };
    match name {
        "auto" => Ok(auto()),
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError::Unavailable {
                    name: name.into(),
                    reason: "this build has no Metal support (build with --features metal)".into(),
                });
            }
            Device::new_metal(0).map_err(unavailable)
        }
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| DeviceError::Unknown(name.into()))?,
                None => return Err(DeviceError::Unknown(name.into())),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::Unavailable {
                    name: name.into(),
                    reason: "this build has no CUDA support (build with --features cuda)".into(),
                });
            }
            Device::new_cuda(ordinal).map_err(unavailable)
        }
    }
}

fn auto() -> Device {
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// A short name for messages: `cpu`, `cuda:0`, `metal`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert!(matches!(open("cpu"), Ok(Device::Cpu)));
        assert!(matches!(open("gpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(open("cuda:x"), Err(DeviceError::Unknown(_))));
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(
                open("cuda:0"),
                Err(DeviceError::Unavailable { .. })
            ));
        }
    }
}
