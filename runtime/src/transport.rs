//! How the members of each process group move device memory between them, chosen per group
//! from what the members report about themselves at rendezvous, and logged per group.
//!
//! - CPU ranks: the TCP group itself.
//! - GPU ranks on distinct devices, with NCCL present: NCCL.
//! - GPU ranks that share a device, or where NCCL is absent: host-staged (device to
//!   page-locked host memory, the TCP group, host to device). NCCL refuses two ranks of one
//!   communicator on one GPU ("Duplicate GPU detected"), so on a one-GPU machine every
//!   multi-rank layout runs host-staged.
//!
//! `train.transport` forces a choice: `host-staged` always works; `nccl` is refused, naming the
//! ranks, where members share a GPU or NCCL is missing.

use serde::{Deserialize, Serialize};

use crate::comm::ProcessGroup;
use crate::error::Result;
use crate::groups::Groups;

/// What a rank reports about itself: its host, and the GPU it computes on (a device UUID), if
/// any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub host: String,
    pub gpu: Option<String>,
}

impl DeviceId {
    /// This process on the CPU.
    pub fn cpu() -> Self {
        DeviceId {
            host: host_name(),
            gpu: None,
        }
    }

    /// This process on the GPU whose UUID is `uuid`.
    pub fn gpu(uuid: impl Into<String>) -> Self {
        DeviceId {
            host: host_name(),
            gpu: Some(uuid.into()),
        }
    }

    /// A 64-bit fingerprint that members exchange: equal for the same host and device. Zero's
    /// low bit marks a CPU rank.
    fn fingerprint(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in self
            .host
            .bytes()
            .chain([0])
            .chain(self.gpu.as_deref().unwrap_or_default().bytes())
        {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        (h << 1) | u64::from(self.gpu.is_some())
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// What `train.transport` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// NCCL where it can serve the group, host-staged otherwise.
    #[default]
    Auto,
    HostStaged,
    Nccl,
}

/// How one group's members move device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// CPU ranks: the TCP group.
    Tcp,
    /// Device to host, the TCP group, host to device.
    HostStaged,
    /// NCCL on device memory.
    Nccl,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::HostStaged => "host-staged",
            Transport::Nccl => "nccl",
        })
    }
}

/// The transport for a group whose members (in rank order) report `members`, with NCCL
/// present on this machine or not, and what `choice` asks. Returns the transport and why, or
/// an error naming the ranks when the choice cannot be honoured.
pub fn choose(
    members: &[u64],
    nccl_present: bool,
    choice: TransportChoice,
) -> std::result::Result<(Transport, String), String> {
    let gpus = members.iter().filter(|&&m| m & 1 == 1).count();
    if gpus == 0 {
        return Ok((Transport::Tcp, "CPU ranks".into()));
    }
    if gpus < members.len() {
        let cpu = members.iter().position(|&m| m & 1 == 0).unwrap_or(0);
        return Err(format!(
            "rank {cpu} computes on the CPU while others use GPUs; set train.device alike on \
             every rank"
        ));
    }
    let shared = (0..members.len()).find_map(|i| {
        (i + 1..members.len())
            .find(|&j| members[j] == members[i])
            .map(|j| (i, j))
    });
    let reason = match (shared, nccl_present) {
        (Some((i, j)), _) => format!(
            "ranks {i} and {j} share one GPU, and NCCL refuses two ranks of one communicator on \
             one device"
        ),
        (None, false) => "NCCL is not installed (libnccl.so.2 not found)".into(),
        (None, true) => String::new(),
    };
    match (choice, reason.is_empty()) {
        (TransportChoice::HostStaged, _) => Ok((
            Transport::HostStaged,
            "train.transport = \"host-staged\"".into(),
        )),
        (TransportChoice::Nccl, false) => Err(format!(
            "train.transport = \"nccl\" cannot serve this group: {reason}; use \"auto\" or \
             \"host-staged\""
        )),
        (_, false) => Ok((Transport::HostStaged, reason)),
        (_, true) => Ok((
            Transport::Nccl,
            "every rank on a GPU of its own, NCCL present".into(),
        )),
    }
}

/// Every member's fingerprint of `me`, gathered over `group` in rank order.
fn gather(group: &mut ProcessGroup, me: &DeviceId) -> Result<Vec<u64>> {
    let (rank, size) = (group.rank(), group.size());
    let f = me.fingerprint();
    let mut all = vec![0f32; 2 * size];
    // The words travel bit for bit, as the f32s that share their bits.
    all[2 * rank] = f32::from_bits(f as u32);
    all[2 * rank + 1] = f32::from_bits((f >> 32) as u32);
    group.all_gather(&mut all)?;
    Ok(all
        .chunks_exact(2)
        .map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
        .collect())
}

/// Chooses the transport of each of this rank's groups from what their members report, and
/// logs each choice on the group's first member. Every member of every group calls it.
pub fn negotiate(
    groups: &mut Groups,
    me: &DeviceId,
    nccl_present: bool,
    choice: TransportChoice,
) -> Result<Vec<(String, Transport)>> {
    let mut chosen = Vec::new();
    for g in [
        groups.tp.as_mut(),
        groups.pp.as_mut(),
        groups.dp.as_mut(),
        groups.emb.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        let members = gather(g, me)?;
        let (transport, why) = choose(&members, nccl_present, choice).map_err(|reason| {
            crate::error::RuntimeError::Rendezvous {
                group: g.name().to_string(),
                rank: g.rank(),
                reason,
            }
        })?;
        if g.rank() == 0 {
            tracing::info!(
                "group {}: {transport} across {} ranks ({why})",
                g.name(),
                g.size()
            );
        }
        chosen.push((g.name().to_string(), transport));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[(&str, Option<&str>)]) -> Vec<u64> {
        list.iter()
            .map(|(h, g)| {
                DeviceId {
                    host: h.to_string(),
                    gpu: g.map(str::to_string),
                }
                .fingerprint()
            })
            .collect()
    }

    #[test]
    fn cpu_ranks_use_tcp() {
        let m = ids(&[("a", None), ("b", None)]);
        let (t, _) = choose(&m, true, TransportChoice::Auto).unwrap();
        assert_eq!(t, Transport::Tcp);
    }

    #[test]
    fn distinct_gpus_with_nccl_use_nccl() {
        let m = ids(&[
            ("a", Some("GPU-0")),
            ("a", Some("GPU-1")),
            ("b", Some("GPU-0")),
        ]);
        let (t, _) = choose(&m, true, TransportChoice::Auto).unwrap();
        assert_eq!(t, Transport::Nccl);
        // Forced host-staged is honoured.
        let (t, why) = choose(&m, true, TransportChoice::HostStaged).unwrap();
        assert_eq!(t, Transport::HostStaged);
        assert!(why.contains("host-staged"), "{why}");
    }

    #[test]
    fn a_shared_gpu_is_host_staged_and_named() {
        let m = ids(&[
            ("a", Some("GPU-0")),
            ("a", Some("GPU-1")),
            ("a", Some("GPU-0")),
        ]);
        let (t, why) = choose(&m, true, TransportChoice::Auto).unwrap();
        assert_eq!(t, Transport::HostStaged);
        assert!(why.contains("ranks 0 and 2 share one GPU"), "{why}");
        let err = choose(&m, true, TransportChoice::Nccl).unwrap_err();
        assert!(
            err.contains("ranks 0 and 2") && err.contains("nccl"),
            "{err}"
        );
    }

    #[test]
    fn without_nccl_distinct_gpus_are_host_staged() {
        let m = ids(&[("a", Some("GPU-0")), ("b", Some("GPU-0"))]);
        let (t, why) = choose(&m, false, TransportChoice::Auto).unwrap();
        assert_eq!(t, Transport::HostStaged);
        assert!(why.contains("NCCL is not installed"), "{why}");
        assert!(choose(&m, false, TransportChoice::Nccl).is_err());
    }

    #[test]
    fn mixed_devices_are_refused() {
        let m = ids(&[("a", Some("GPU-0")), ("a", None)]);
        let err = choose(&m, true, TransportChoice::Auto).unwrap_err();
        assert!(err.contains("rank 1 computes on the CPU"), "{err}");
    }
}
