//! What a node agent needs of its coordination service beyond keys: leases that keep a node's
//! keys alive while it lives, a campaign for a key held under a lease (the leader), and a watch
//! of every change under a prefix. etcd provides them across machines ([`crate::etcd`]); the
//! in-process coordinator provides them to the agents of one process
//! ([`crate::InProcessCoordinator`]), so the same agent code runs against either.

use std::time::Duration;

use crate::{Change, Coordinator, ElasticError, EtcdCoordinator, Registration, Watch};

/// Keys, leases, campaigns and watches.
pub trait Cluster: Coordinator {
    /// The same coordinator, for what takes keys only.
    fn keys(&self) -> &dyn Coordinator;
    /// Puts `key` = `value` under a new lease of `ttl`, kept alive until the lease is dropped
    /// (the key is deleted at once) or abandoned (it goes when the time runs out).
    fn register(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, ElasticError>;
    /// Takes `key` for the holder of `lease` if nobody holds it; the key goes with the lease.
    /// Returns the holder's value after the attempt (`value` when it won).
    fn campaign(&self, key: &str, value: &[u8], lease: &dyn Lease)
        -> Result<Vec<u8>, ElasticError>;
    /// Every change under `prefix` from now on, in order.
    fn watch(&self, prefix: &str) -> Result<Box<dyn Changes>, ElasticError>;
    /// Requests that failed so far (each retry counted), for the agent's metrics.
    fn request_errors(&self) -> u64 {
        0
    }
}

/// A key kept alive under a lease.
pub trait Lease: Send + Sync {
    /// Whether the lease ran out: its key is gone, and its holder must stop as if dead.
    fn lost(&self) -> bool;
    /// Its time to live as granted.
    fn ttl(&self) -> Duration;
    /// Replaces the key's value, keeping the lease.
    fn update(&self, value: &[u8]) -> Result<(), ElasticError>;
    /// Stops keeping the lease alive without revoking it, as a crashed holder would.
    fn abandon(self: Box<Self>);
    /// The lease's identity in its coordinator.
    fn id(&self) -> i64;
}

/// The changes under a watched prefix.
pub trait Changes: Send {
    /// The next change, waiting at most `timeout`; `Ok(None)` when none came.
    fn next(&self, timeout: Duration) -> Result<Option<Change>, ElasticError>;
}

impl Lease for Registration {
    fn lost(&self) -> bool {
        Registration::lost(self)
    }

    fn ttl(&self) -> Duration {
        Registration::ttl(self)
    }

    fn update(&self, value: &[u8]) -> Result<(), ElasticError> {
        Registration::update(self, value)
    }

    fn abandon(self: Box<Self>) {
        Registration::abandon(*self)
    }

    fn id(&self) -> i64 {
        self.lease_id()
    }
}

impl Changes for Watch {
    fn next(&self, timeout: Duration) -> Result<Option<Change>, ElasticError> {
        Watch::next(self, timeout)
    }
}

impl Cluster for EtcdCoordinator {
    fn keys(&self) -> &dyn Coordinator {
        self
    }

    fn register(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, ElasticError> {
        Ok(Box::new(EtcdCoordinator::register(self, key, value, ttl)?))
    }

    fn campaign(
        &self,
        key: &str,
        value: &[u8],
        lease: &dyn Lease,
    ) -> Result<Vec<u8>, ElasticError> {
        self.campaign_under(key, value, lease.id())
    }

    fn watch(&self, prefix: &str) -> Result<Box<dyn Changes>, ElasticError> {
        Ok(Box::new(self.watch_prefix(prefix)?))
    }

    fn request_errors(&self) -> u64 {
        EtcdCoordinator::request_errors(self)
    }
}

/// The conformance suite every [`Cluster`] implementation passes.
pub mod conformance {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Changes, Cluster};

    /// Leases as etcd grants them: whole seconds, no fewer than two.
    const TTL: Duration = Duration::from_secs(2);

    /// Runs every check against `c`; keys are made unique with `prefix`.
    pub fn run(c: Arc<dyn Cluster>, prefix: &str) {
        leases_hold_their_keys_until_dropped_or_run_out(&*c, prefix);
        one_campaigner_leads_until_its_lease_goes(&*c, prefix);
    }

    /// The next change under the watch within `limit`.
    fn next(watch: &dyn Changes, limit: Duration) -> crate::Change {
        watch
            .next(limit)
            .expect("the watch works")
            .expect("a change before the deadline")
    }

    fn leases_hold_their_keys_until_dropped_or_run_out(c: &dyn Cluster, prefix: &str) {
        let nodes = format!("{prefix}/leases/nodes/");
        let watch = c.watch(&nodes).expect("watch");
        let a = c
            .register(&format!("{nodes}a"), b"8", TTL)
            .expect("register a");
        assert!(!a.lost() && a.ttl() >= TTL);
        // Seen in order: the registration, then its update.
        a.update(b"7").expect("update");
        let seen = next(&*watch, TTL);
        assert_eq!(
            (seen.key.as_str(), seen.value.as_deref()),
            (&*format!("{nodes}a"), Some(&b"8"[..]))
        );
        assert_eq!(next(&*watch, TTL).value.as_deref(), Some(&b"7"[..]));
        // Kept past its time to live while held.
        std::thread::sleep(TTL + Duration::from_millis(500));
        assert_eq!(
            c.get(&format!("{nodes}a")).expect("get"),
            Some(b"7".to_vec())
        );
        assert!(!a.lost());
        // Dropped: deleted at once, and the watch sees it.
        drop(a);
        assert_eq!(c.get(&format!("{nodes}a")).expect("get"), None);
        assert_eq!(next(&*watch, TTL).value, None);
        // Abandoned, as by a crashed holder: gone once its time runs out, not before.
        let b = c
            .register(&format!("{nodes}b"), b"8", TTL)
            .expect("register b");
        assert_eq!(next(&*watch, TTL).key, format!("{nodes}b"));
        let abandoned = Instant::now();
        b.abandon();
        let gone = next(&*watch, TTL * 3);
        assert_eq!((gone.key, gone.value), (format!("{nodes}b"), None));
        assert!(
            abandoned.elapsed() >= Duration::from_millis(500),
            "expired {:?} after it was abandoned",
            abandoned.elapsed()
        );
        // Nothing else happened under the prefix.
        assert!(watch
            .next(Duration::from_millis(100))
            .expect("watch")
            .is_none());
        // A key registered again under a new lease (an agent restarted under its old name)
        // stays when the old lease goes.
        let key = format!("{nodes}c");
        let old = c.register(&key, b"old", TTL).expect("register c");
        let new = c.register(&key, b"new", TTL).expect("register c again");
        drop(old);
        assert_eq!(c.get(&key).expect("get"), Some(b"new".to_vec()));
        assert!(!new.lost());
        drop(new);
        assert_eq!(c.get(&key).expect("get"), None);
    }

    fn one_campaigner_leads_until_its_lease_goes(c: &dyn Cluster, prefix: &str) {
        let job = format!("{prefix}/campaign/");
        let key = format!("{job}leader");
        let a = c.register(&format!("{job}nodes/a"), b"1", TTL).expect("a");
        let b = c.register(&format!("{job}nodes/b"), b"1", TTL).expect("b");
        assert_eq!(c.campaign(&key, b"a", &*a).expect("a campaigns"), b"a");
        // b learns who leads instead of taking over.
        assert_eq!(c.campaign(&key, b"b", &*b).expect("b campaigns"), b"a");
        let watch = c.watch(&job).expect("watch");
        // The leader's lease goes, and its leadership with it.
        drop(a);
        let deadline = Instant::now() + TTL;
        loop {
            let change = next(&*watch, deadline.saturating_duration_since(Instant::now()));
            if change.key == key && change.value.is_none() {
                break;
            }
        }
        assert_eq!(
            c.campaign(&key, b"b", &*b).expect("b campaigns again"),
            b"b"
        );
        assert_eq!(c.get(&key).expect("get"), Some(b"b".to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::conformance;
    use crate::InProcessCoordinator;

    #[test]
    fn in_process_coordinator_passes_the_cluster_conformance_suite() {
        conformance::run(Arc::new(InProcessCoordinator::new()), "/marathon/cluster");
    }
}
