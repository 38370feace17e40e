//! The simulated etcd of [`super`]: etcd's contract for what agents use (atomic transactions,
//! leases whose keys go when they run out or are revoked, a campaign for a key held under a
//! lease, a watch that delivers every change under a prefix in order), on the simulated clock,
//! with each delivery delayed at random and some watches broken. It records each generation's
//! commit and who read the job's done key, for the checks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use marathon_elastic::plan::Plan;
use marathon_elastic::{Change, Changes, Cluster, Coordinator, ElasticError, JobKeys, Lease};

use super::SimClock;
use crate::rng::Rng;

/// A committed generation, and who committed it when.
#[derive(Debug, Clone)]
pub(super) struct Commit {
    pub(super) at_ms: u64,
    pub(super) by: String,
    pub(super) plan: Plan,
}

/// etcd's state: keys, leases, watches, and what the checks need of their history.
#[derive(Debug)]
pub(super) struct Store {
    pub(super) clock: Arc<SimClock>,
    pub(super) rng: Rng,
    pub(super) delay_max_ms: u64,
    pub(super) p_break: f64,
    pub(super) keys: JobKeys,
    /// Each key's value and the lease it is held under.
    pub(super) map: BTreeMap<String, (Vec<u8>, Option<i64>)>,
    pub(super) next_id: i64,
    /// Each lease's keys, its time to live, and when it runs out once abandoned.
    pub(super) leases: BTreeMap<i64, (BTreeSet<String>, u64, Option<u64>)>,
    /// Leases of live holders that ran out (their keep-alive failed), and from when their
    /// holders can know it, as a keep-alive learns it at its next renewal.
    pub(super) lost: BTreeMap<i64, u64>,
    pub(super) watches: BTreeMap<i64, Watched>,
    /// The agent whose turn it is: the caller of every request.
    pub(super) caller: String,
    /// The agents that have read the job's done key.
    pub(super) knows_done: BTreeSet<String>,
    pub(super) commits: BTreeMap<u64, Commit>,
    pub(super) fenced: u64,
    pub(super) broken: u64,
    pub(super) violations: Vec<String>,
}

/// One agent's watch: what it has not read yet, each change with the time it is delivered.
#[derive(Debug)]
pub(super) struct Watched {
    node: String,
    prefix: String,
    queue: VecDeque<(u64, Change)>,
    broken: bool,
}

impl Store {
    pub(super) fn violation(&mut self, what: String) {
        let at = self.clock.ms();
        self.violations.push(format!("at {at} ms: {what}"));
    }

    pub(super) fn put(&mut self, key: &str, value: &[u8], lease: Option<i64>) {
        if let Some((_, Some(old))) = self.map.get(key) {
            if let Some(l) = self.leases.get_mut(old) {
                l.0.remove(key);
            }
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.0.insert(key.to_owned());
        }
        self.map.insert(key.to_owned(), (value.to_vec(), lease));
        self.changed(key, Some(value));
    }

    pub(super) fn delete(&mut self, key: &str) {
        if let Some((_, lease)) = self.map.remove(key) {
            if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                l.0.remove(key);
            }
            self.changed(key, None);
        }
    }

    /// Queues `key`'s change on every watch of it, each after its own delay and after what
    /// that watch has queued; or breaks the watch.
    fn changed(&mut self, key: &str, value: Option<&[u8]>) {
        let now = self.clock.ms();
        for w in self.watches.values_mut() {
            if w.broken || !key.starts_with(&w.prefix) {
                continue;
            }
            if self.rng.chance(self.p_break) {
                w.broken = true;
                w.queue.clear();
                self.broken += 1;
                continue;
            }
            let last = w.queue.back().map_or(0, |(t, _)| *t);
            let at = last.max(now + self.rng.below(self.delay_max_ms + 1));
            w.queue.push_back((
                at,
                Change {
                    key: key.to_owned(),
                    value: value.map(<[u8]>::to_vec),
                },
            ));
        }
    }

    fn revoke(&mut self, id: i64) {
        if let Some((keys, _, _)) = self.leases.remove(&id) {
            for k in keys {
                self.map.remove(&k);
                self.changed(&k, None);
            }
        }
    }

    /// The lease that holds `key`, run out as a partition from etcd would make it: its keys go
    /// now, and its holder learns it `lag_ms` later.
    pub(super) fn lose_lease_of(&mut self, key: &str, lag_ms: u64) -> bool {
        let Some(&(_, Some(id))) = self.map.get(key) else {
            return false;
        };
        let at = self.clock.ms() + lag_ms;
        self.lost.insert(id, at);
        self.revoke(id);
        true
    }

    /// Revokes every abandoned lease whose time ran out.
    pub(super) fn expire(&mut self) {
        let now = self.clock.ms();
        let out: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, _, until))| until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in out {
            self.revoke(id);
        }
    }

    /// A transaction that moves the generation counter: checked, and recorded as a commit.
    /// A transaction that moves the generation counter from what `when` expects: a proposal,
    /// checked, and recorded as a commit when it won. One that rewrites the counter unchanged
    /// is a write fenced by the generation (a worker's), not a proposal.
    fn committing(&mut self, when: &[(&str, Option<&[u8]>)], puts: &[(&str, &[u8])], won: bool) {
        let counter = self.keys.generation();
        let Some((_, value)) = puts.iter().find(|(k, _)| *k == counter) else {
            return;
        };
        let expected = when.iter().find(|(k, _)| *k == counter).map(|(_, v)| *v);
        if expected == Some(Some(*value)) {
            return;
        }
        let caller = self.caller.clone();
        if self.knows_done.contains(&caller) {
            self.violation(format!(
                "{caller} knew the job was done, and proposed a plan"
            ));
        }
        if !won {
            self.fenced += 1;
            return;
        }
        let Some(to) = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            let v = String::from_utf8_lossy(value).into_owned();
            self.violation(format!("{caller} set the generation counter to {v:?}"));
            return;
        };
        let plan_key = self.keys.plan(to);
        let plan = puts
            .iter()
            .find(|(k, _)| *k == plan_key)
            .and_then(|(_, v)| serde_json::from_slice::<Plan>(v).ok());
        let Some(plan) = plan else {
            self.violation(format!(
                "{caller} moved the generation to {to} without its plan"
            ));
            return;
        };
        self.commit(to, plan);
    }

    /// Records generation `to`'s plan, checking it against the one before.
    pub(super) fn commit(&mut self, to: u64, plan: Plan) {
        let newest = self.commits.keys().next_back().copied().unwrap_or(0);
        if self.commits.contains_key(&to) {
            self.violation(format!("a second plan for generation {to}"));
        } else if to != newest + 1 {
            self.violation(format!("generation {to} committed after {newest}"));
        }
        let commit = Commit {
            at_ms: self.clock.ms(),
            by: self.caller.clone(),
            plan,
        };
        self.commits.insert(to, commit);
    }
}

/// The simulated etcd, shared by every agent and the world.
#[derive(Debug, Clone)]
pub(super) struct Etcd(pub(super) Arc<Mutex<Store>>);

impl Etcd {
    pub(super) fn lock(&self) -> MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Coordinator for Etcd {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        self.lock().put(key, value, None);
        Ok(())
    }

    fn wait_get(&self, key: &str, _deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        // Nothing else runs while a caller waits: a key that is not there now never comes.
        self.get(key)?.ok_or_else(|| ElasticError::Timeout {
            key: key.to_owned(),
            waited_ms: 0,
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError> {
        Ok(self.lock().map.get(key).map(|(v, _)| v.clone()))
    }

    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        let mut s = self.lock();
        let won = when
            .iter()
            .all(|(k, expected)| s.map.get(*k).map(|(v, _)| v.as_slice()) == *expected);
        s.committing(when, puts, won);
        if won {
            for (k, v) in puts {
                s.put(k, v, None);
            }
        }
        Ok(won)
    }

    fn delete(&self, key: &str) -> Result<(), ElasticError> {
        self.lock().delete(key);
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError> {
        let mut s = self.lock();
        let done = s.keys.done();
        if s.map.contains_key(&done) {
            let caller = s.caller.clone();
            s.knows_done.insert(caller);
        }
        Ok(s.map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect())
    }
}

impl Cluster for Etcd {
    fn keys(&self) -> &dyn Coordinator {
        self
    }

    fn register(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, ElasticError> {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.leases
            .insert(id, (BTreeSet::new(), ttl.as_millis() as u64, None));
        s.put(key, value, Some(id));
        Ok(Box::new(SimLease {
            etcd: self.clone(),
            id,
            key: key.to_owned(),
            ttl,
            abandoned: false,
        }))
    }

    fn campaign(
        &self,
        key: &str,
        value: &[u8],
        lease: &dyn Lease,
    ) -> Result<Vec<u8>, ElasticError> {
        let mut s = self.lock();
        if !s.map.contains_key(key) && s.leases.contains_key(&lease.id()) {
            s.put(key, value, Some(lease.id()));
        }
        Ok(s.map.get(key).map(|(v, _)| v.clone()).unwrap_or_default())
    }

    fn watch(&self, prefix: &str) -> Result<Box<dyn Changes>, ElasticError> {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        let watched = Watched {
            node: s.caller.clone(),
            prefix: prefix.to_owned(),
            queue: VecDeque::new(),
            broken: false,
        };
        s.watches.insert(id, watched);
        Ok(Box::new(SimWatch {
            etcd: self.clone(),
            id,
        }))
    }
}

#[derive(Debug)]
struct SimLease {
    etcd: Etcd,
    id: i64,
    key: String,
    ttl: Duration,
    abandoned: bool,
}

impl Lease for SimLease {
    fn lost(&self) -> bool {
        let s = self.etcd.lock();
        match s.lost.get(&self.id) {
            Some(&known) => s.clock.ms() >= known,
            None => !s.leases.contains_key(&self.id),
        }
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn update(&self, value: &[u8]) -> Result<(), ElasticError> {
        let mut s = self.etcd.lock();
        if !s.leases.contains_key(&self.id) {
            return Err(ElasticError::LeaseLost {
                action: "update",
                key: self.key.clone(),
            });
        }
        s.put(&self.key, value, Some(self.id));
        Ok(())
    }

    fn abandon(mut self: Box<Self>) {
        self.abandoned = true;
        let mut s = self.etcd.lock();
        let now = s.clock.ms();
        if let Some(l) = s.leases.get_mut(&self.id) {
            l.2 = Some(now + l.1);
        }
    }

    fn id(&self) -> i64 {
        self.id
    }
}

impl Drop for SimLease {
    fn drop(&mut self) {
        if !self.abandoned {
            self.etcd.lock().revoke(self.id);
        }
    }
}

#[derive(Debug)]
struct SimWatch {
    etcd: Etcd,
    id: i64,
}

impl Changes for SimWatch {
    /// The next change delivered by now; a simulated watch never waits.
    fn next(&self, _timeout: Duration) -> Result<Option<Change>, ElasticError> {
        let mut s = self.etcd.lock();
        let (now, done) = (s.clock.ms(), s.keys.done());
        let Some(w) = s.watches.get_mut(&self.id) else {
            return Ok(None);
        };
        if w.broken {
            let prefix = w.prefix.clone();
            s.watches.remove(&self.id);
            return Err(ElasticError::Unavailable {
                action: "watch",
                key: prefix,
                reason: "the simulated connection broke".into(),
            });
        }
        if w.queue.front().is_none_or(|(at, _)| *at > now) {
            return Ok(None);
        }
        let (_, change) = w.queue.pop_front().expect("a change is due");
        if change.key == done && change.value.is_some() {
            let node = w.node.clone();
            s.knows_done.insert(node);
        }
        Ok(Some(change))
    }
}

impl Drop for SimWatch {
    fn drop(&mut self) {
        self.etcd.lock().watches.remove(&self.id);
    }
}
