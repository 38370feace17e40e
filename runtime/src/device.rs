//! Where the trainer computes: the CPU (the default) or GPUs (`train.device = "cuda"`, feature
//! `cuda`). The engines themselves are in [`crate::engine`].

use serde::{Deserialize, Serialize};

/// The device a job trains on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device {other:?}; use cpu or cuda")),
        }
    }
}
