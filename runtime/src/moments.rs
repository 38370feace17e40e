//! Named moments of a worker's life, at which the chaos suite (`marathon chaos`) lands a fault
//! exactly: in the middle of a step, of a collective, of a peer state transfer, during a
//! rendezvous, between the shards and the manifest of a checkpoint.
//!
//! Off unless `MARATHON_CHAOS_MOMENTS` names a directory; then a moment costs a file rename.
//! The harness arms a moment by creating `<dir>/<moment>.arm`. The first worker to reach it
//! renames that file to `<dir>/<moment>.hit-<pid>` (a rename is atomic: one worker wins) and
//! waits there until the harness, having landed its fault, removes the file.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable naming the moments' directory.
pub const MOMENTS_ENV: &str = "MARATHON_CHAOS_MOMENTS";

/// A worker held at a moment goes on by itself after this long, harness or not.
const HOLD_MAX: Duration = Duration::from_secs(60);

/// A moment a fault can land at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Moment {
    /// After a step's forward and backward passes, before its gradients are reduced.
    MidStep,
    /// Halfway through an all-reduce: its reduce-scatter done, its all-gather not begun.
    MidCollective,
    /// On the committing rank, every shard and index written, the manifest not yet.
    BeforeManifest,
    /// A worker given a new generation, before it connects its process groups: its peers
    /// are in their rendezvous, waiting for it.
    Rendezvous,
    /// Halfway through a peer state transfer: the parameters sent, the optimizer state not.
    Transfer,
}

impl Moment {
    pub const ALL: [Moment; 5] = [
        Moment::MidStep,
        Moment::MidCollective,
        Moment::BeforeManifest,
        Moment::Rendezvous,
        Moment::Transfer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Moment::MidStep => "mid-step",
            Moment::MidCollective => "mid-collective",
            Moment::BeforeManifest => "before-manifest",
            Moment::Rendezvous => "rendezvous",
            Moment::Transfer => "transfer",
        }
    }
}

/// Called by the worker as it passes `moment`: holds it there while the harness lands a
/// fault, if the harness armed this moment.
pub fn reach(moment: Moment) {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(dir) = DIR.get_or_init(|| std::env::var_os(MOMENTS_ENV).map(PathBuf::from)) else {
        return;
    };
    let armed = dir.join(format!("{}.arm", moment.name()));
    let hit = dir.join(format!("{}.hit-{}", moment.name(), std::process::id()));
    if std::fs::rename(&armed, &hit).is_err() {
        return;
    }
    let held = Instant::now();
    while hit.exists() && held.elapsed() < HOLD_MAX {
        std::thread::sleep(Duration::from_millis(5));
    }
}
