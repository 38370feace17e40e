//! marathon-elastic: who is in the job and what each member does.
//!
//! Owns membership, leases, generations, rendezvous, the leader, plans (live slots to a
//! (tp, pp, dp) assignment and a microbatch split) and fencing. The deciding core does no I/O:
//! events and the current time go in, actions come out. A [`Coordinator`] trait with an etcd
//! implementation and an in-process one carries the decisions between machines.
//!
//! Never knows about tensors or object stores.
//!
//! - [`coordinator`]: the key-value contract (in-process and directory implementations) that
//!   process groups rendezvous through; [`cluster`] adds leases, watches and election;
//! - [`etcd`]: the etcd coordinator;
//! - [`job`]: the job's key layout and its generation-fenced writes;
//! - [`plan`]: live slots to a generation's layout, survivors kept in place, each slot's rank
//!   placed by `marathon_model::Place`;
//! - [`membership`]: the I/O-free core that decides when to abort, re-plan and start a
//!   generation;
//! - [`pace`]: stragglers from every rank's compute time.
//!
//! The agent that runs them is `marathon_runtime::agent`.

pub mod cluster;
pub mod coordinator;
pub mod etcd;
pub mod job;
pub mod membership;
pub mod pace;
pub mod plan;

pub use cluster::{Changes, Cluster, Lease};
pub use coordinator::{Coordinator, DirCoordinator, InProcessCoordinator};
pub use etcd::{Change, EtcdAccess, EtcdCoordinator, Registration, Watch};
pub use job::{JobKey, JobKeys};

use std::time::Duration;

/// Errors of the elastic crate.
#[derive(Debug, thiserror::Error)]
pub enum ElasticError {
    /// A key did not appear before the deadline.
    #[error("coordinator: key {key} did not appear within {waited_ms} ms")]
    Timeout { key: String, waited_ms: u128 },
    /// The coordinator cannot be reached or refused the request.
    #[error("coordinator: {action} {key}: {reason}")]
    Unavailable {
        action: &'static str,
        key: String,
        reason: String,
    },
    /// The coordinator refused who the client is or what it asked: a credential it does not
    /// accept (a wrong password, a certificate of another CA) or a key the user's role may not
    /// touch. Asking again cannot help.
    /// `reason` names the endpoint and whom it refused.
    #[error("coordinator: {action} {key} {reason}")]
    Denied {
        action: &'static str,
        key: String,
        reason: String,
    },
    /// A key of the job holds what marathon cannot read: written by another version, or
    /// edited by hand. Asking again cannot help.
    #[error("coordinator: {key} {reason}; the key belongs to marathon: run one version on every node and do not edit it")]
    Corrupt { key: String, reason: String },
    /// A write under a lease that ran out: its keys are gone, and whoever held it is presumed
    /// dead. Asking again cannot help.
    #[error("coordinator: {action} {key}: its lease ran out; the job presumes its holder dead")]
    LeaseLost { action: &'static str, key: String },
}

impl ElasticError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ElasticError::Denied { .. }
                | ElasticError::Corrupt { .. }
                | ElasticError::LeaseLost { .. }
        )
    }

    pub(crate) fn timeout(key: &str, waited: Duration) -> Self {
        ElasticError::Timeout {
            key: key.to_owned(),
            waited_ms: waited.as_millis(),
        }
    }
}

/// Runs `op` until it succeeds or `budget` has passed, backing off from 50 ms to 1 s between
/// tries: a coordinator that is briefly unreachable (an etcd member lost, a leader election)
/// costs a pause, not the job. Returns the last error when the budget runs out.
pub fn retrying<T>(
    budget: Duration,
    mut op: impl FnMut() -> Result<T, ElasticError>,
) -> Result<T, ElasticError> {
    let deadline = std::time::Instant::now() + budget;
    let mut backoff = Duration::from_millis(50);
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && std::time::Instant::now() + backoff < deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}
