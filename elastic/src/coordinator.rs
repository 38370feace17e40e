//! The coordinator's key-value contract, and the in-process and directory implementations (the
//! etcd one is in [`crate::etcd`]).
//!
//! Process groups find each other by publishing their addresses under keys namespaced by job,
//! generation and group, and waiting for the keys of their peers. Generations advance by
//! compare-and-swap. The etcd implementation keeps the same contract across machines.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cluster::{Changes, Cluster, Lease};
use crate::{Change, ElasticError};

/// A key-value store that every member of a job can reach.
///
/// Keys are `/`-separated paths (`/marathon/<job>/gen-3/pg/dp-0/rank-1`). Values are opaque
/// bytes. Writes are visible to every later read.
pub trait Coordinator: Send + Sync {
    /// Sets `key` to `value`, replacing any earlier value.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError>;

    /// The value of `key`, waiting until it exists or `deadline` passes
    /// ([`ElasticError::Timeout`]).
    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError>;

    /// The value of `key`, if it exists.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError>;

    /// Puts each of `puts` if every key of `when` has its expected value (`None`: the key does
    /// not exist), all in one atomic step with respect to every other writer, or puts nothing.
    /// Returns whether it did.
    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError>;

    /// Sets `key` to `new` if its value is `expected` (`None`: if it does not exist), and in
    /// the same atomic step puts each of `also` (a generation's counter and its plan commit
    /// together, or not at all). Returns whether it did.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
        also: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        let mut puts = Vec::with_capacity(also.len() + 1);
        puts.extend_from_slice(also);
        puts.push((key, new));
        self.transact(&[(key, expected)], &puts)
    }

    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), ElasticError>;

    /// Every key under `prefix`, with its value, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError>;

    /// Fails when whoever waits through this coordinator should give up (the generation it
    /// waits for was aborted). A wait that does not go through [`Coordinator::wait_get`], such
    /// as accepting connections, asks this between its polls.
    fn check(&self) -> Result<(), ElasticError> {
        Ok(())
    }
}

/// A coordinator inside one process, for single-machine runs and tests. It also holds leases,
/// campaigns and watches ([`crate::Cluster`]) for agents that run as threads of one process:
/// a lease lives until it is dropped (its keys go at once) or abandoned (they go when its time
/// runs out), since nothing in one process can lose touch with it.
#[derive(Debug, Default, Clone)]
pub struct InProcessCoordinator {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    /// Locked after `map`, never before.
    live: Mutex<Live>,
}

/// Leases and the changes each watch has not read yet.
#[derive(Debug, Default)]
struct Live {
    next_id: i64,
    leases: HashMap<i64, Held>,
    /// The lease each leased key is held under now: a key written again (under another lease,
    /// or none) leaves its old lease, as in etcd, and goes only with its new one.
    owners: HashMap<String, i64>,
    watches: HashMap<i64, (String, VecDeque<Change>)>,
}

/// A lease's keys, and when it runs out once abandoned.
#[derive(Debug)]
struct Held {
    keys: BTreeSet<String>,
    ttl: Duration,
    expires: Option<Instant>,
}

type Map = HashMap<String, Vec<u8>>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Map> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut map);
        map
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `key` changed, for every watch of a prefix of it, and wakes the waiters.
    fn record(&self, key: &str, value: Option<&[u8]>) {
        for (prefix, queue) in self.live().watches.values_mut() {
            if key.starts_with(prefix.as_str()) {
                queue.push_back(Change {
                    key: key.to_owned(),
                    value: value.map(<[u8]>::to_vec),
                });
            }
        }
        self.changed.notify_all();
    }

    /// Puts `key` under `lease` (`None`: under none).
    fn put(&self, map: &mut Map, key: &str, value: &[u8], lease: Option<i64>) {
        {
            let mut live = self.live();
            match lease {
                Some(id) => live.owners.insert(key.to_owned(), id),
                None => live.owners.remove(key),
            };
        }
        map.insert(key.to_owned(), value.to_vec());
        self.record(key, Some(value));
    }

    fn remove(&self, map: &mut Map, key: &str) {
        self.live().owners.remove(key);
        if map.remove(key).is_some() {
            self.record(key, None);
        }
    }

    /// Deletes the keys still held under lease `id`, which is gone.
    fn release(&self, map: &mut Map, id: i64, keys: &BTreeSet<String>) {
        let held: Vec<&String> = {
            let live = self.live();
            keys.iter()
                .filter(|k| live.owners.get(*k) == Some(&id))
                .collect()
        };
        for key in held {
            self.remove(map, key);
        }
    }

    /// Deletes the keys of every abandoned lease whose time ran out.
    fn expire(&self, map: &mut Map) {
        let now = Instant::now();
        let gone: Vec<(i64, BTreeSet<String>)> = {
            let mut live = self.live();
            let ids: Vec<i64> = live
                .leases
                .iter()
                .filter(|(_, l)| l.expires.is_some_and(|t| t <= now))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| live.leases.remove(&id).map(|l| (id, l.keys)))
                .collect()
        };
        for (id, keys) in &gone {
            self.release(map, *id, keys);
        }
    }

    /// When the next abandoned lease runs out.
    fn next_expiry(&self) -> Option<Instant> {
        self.live().leases.values().filter_map(|l| l.expires).min()
    }

    fn revoke(&self, id: i64) {
        let mut map = self.lock();
        let held = self.live().leases.remove(&id);
        if let Some(l) = held {
            self.release(&mut map, id, &l.keys);
        }
    }
}

impl InProcessCoordinator {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Coordinator for InProcessCoordinator {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        let mut map = self.shared.lock();
        self.shared.put(&mut map, key, value, None);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError> {
        Ok(self.shared.lock().get(key).cloned())
    }

    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        let mut map = self.shared.lock();
        if when
            .iter()
            .any(|(k, expected)| map.get(*k).map(Vec::as_slice) != *expected)
        {
            return Ok(false);
        }
        for (k, v) in puts {
            self.shared.put(&mut map, k, v, None);
        }
        Ok(true)
    }

    fn delete(&self, key: &str) -> Result<(), ElasticError> {
        let mut map = self.shared.lock();
        self.shared.remove(&mut map, key);
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError> {
        let map = self.shared.lock();
        let mut out: Vec<_> = map
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let started = Instant::now();
        let mut map = self.shared.lock();
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ElasticError::timeout(key, now - started));
            }
            map = self
                .shared
                .changed
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A lease of an [`InProcessCoordinator`].
#[derive(Debug)]
struct InProcessLease {
    shared: Arc<Shared>,
    id: i64,
    key: String,
    ttl: Duration,
    /// Abandoned: dropping it revokes nothing.
    abandoned: bool,
}

impl Lease for InProcessLease {
    fn lost(&self) -> bool {
        let _map = self.shared.lock();
        !self.shared.live().leases.contains_key(&self.id)
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn update(&self, value: &[u8]) -> Result<(), ElasticError> {
        let mut map = self.shared.lock();
        if !self.shared.live().leases.contains_key(&self.id) {
            return Err(ElasticError::LeaseLost {
                action: "update",
                key: self.key.clone(),
            });
        }
        self.shared.put(&mut map, &self.key, value, Some(self.id));
        Ok(())
    }

    fn abandon(mut self: Box<Self>) {
        self.abandoned = true;
        let _map = self.shared.lock();
        if let Some(l) = self.shared.live().leases.get_mut(&self.id) {
            l.expires = Some(Instant::now() + l.ttl);
        }
        self.shared.changed.notify_all();
    }

    fn id(&self) -> i64 {
        self.id
    }
}

impl Drop for InProcessLease {
    fn drop(&mut self) {
        if !self.abandoned {
            self.shared.revoke(self.id);
        }
    }
}

/// A watch of an [`InProcessCoordinator`].
#[derive(Debug)]
struct InProcessWatch {
    shared: Arc<Shared>,
    id: i64,
}

impl Changes for InProcessWatch {
    fn next(&self, timeout: Duration) -> Result<Option<Change>, ElasticError> {
        let deadline = Instant::now() + timeout;
        let mut map = self.shared.lock();
        loop {
            let next = self
                .shared
                .live()
                .watches
                .get_mut(&self.id)
                .and_then(|(_, q)| q.pop_front());
            if next.is_some() {
                return Ok(next);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Wake for a change, or when an abandoned lease runs out.
            let until = self
                .shared
                .next_expiry()
                .map_or(deadline, |t| t.min(deadline));
            map = self
                .shared
                .changed
                .wait_timeout(map, until.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.shared.expire(&mut map);
        }
    }
}

impl Drop for InProcessWatch {
    fn drop(&mut self) {
        self.shared.live().watches.remove(&self.id);
    }
}

impl Cluster for InProcessCoordinator {
    fn keys(&self) -> &dyn Coordinator {
        self
    }

    fn register(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, ElasticError> {
        let mut map = self.shared.lock();
        let id = {
            let mut live = self.shared.live();
            live.next_id += 1;
            let id = live.next_id;
            live.leases.insert(
                id,
                Held {
                    keys: BTreeSet::from([key.to_owned()]),
                    ttl,
                    expires: None,
                },
            );
            id
        };
        self.shared.put(&mut map, key, value, Some(id));
        Ok(Box::new(InProcessLease {
            shared: self.shared.clone(),
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
        let mut map = self.shared.lock();
        if let Some(holder) = map.get(key) {
            return Ok(holder.clone());
        }
        match self.shared.live().leases.get_mut(&lease.id()) {
            Some(held) => held.keys.insert(key.to_owned()),
            // A lease that ran out holds nothing.
            None => return Ok(Vec::new()),
        };
        self.shared.put(&mut map, key, value, Some(lease.id()));
        Ok(value.to_vec())
    }

    fn watch(&self, prefix: &str) -> Result<Box<dyn Changes>, ElasticError> {
        let _map = self.shared.lock();
        let mut live = self.shared.live();
        live.next_id += 1;
        let id = live.next_id;
        live.watches
            .insert(id, (prefix.to_owned(), VecDeque::new()));
        Ok(Box::new(InProcessWatch {
            shared: self.shared.clone(),
            id,
        }))
    }
}

/// A coordinator in a directory, shared by the processes of one machine: each key is a file
/// holding the key, a zero byte and the value, written under a temporary name and renamed into
/// place so a reader never sees half a value. Compare-and-swap holds a lock directory (whose
/// creation is atomic) for its read and write. The launcher of a single-machine job makes the
/// directory and removes it at the end.
#[derive(Debug, Clone)]
pub struct DirCoordinator {
    dir: PathBuf,
}

/// How often [`DirCoordinator::wait_get`] looks for a key that is not there yet.
const DIR_POLL: Duration = Duration::from_millis(2);

impl DirCoordinator {
    /// Uses `dir`, which must exist.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirCoordinator { dir: dir.into() }
    }

    /// The file of `key`: the key with its separators escaped, so every key is one file.
    fn path(&self, key: &str) -> PathBuf {
        let name: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{name}.{:016x}", fnv1a(key)))
    }
}

/// FNV-1a: distinguishes keys whose escaped names collide (`a/b` and `a_b`).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl DirCoordinator {
    fn unavailable(&self, action: &'static str, key: &str, e: std::io::Error) -> ElasticError {
        ElasticError::Unavailable {
            action,
            key: key.to_owned(),
            reason: format!("{}: {e}", self.dir.display()),
        }
    }

    /// Reads a key's file: its key and value, or `None` when it does not exist.
    fn read(
        &self,
        path: &std::path::Path,
        key: &str,
    ) -> Result<Option<(String, Vec<u8>)>, ElasticError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let at = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                let k = String::from_utf8_lossy(&bytes[..at]).into_owned();
                Ok(Some((k, bytes.get(at + 1..).unwrap_or_default().to_vec())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.unavailable("get", key, e)),
        }
    }

    /// Runs `f` holding the directory's lock, waiting for it at most a few seconds.
    fn locked<T>(
        &self,
        key: &str,
        f: impl FnOnce() -> Result<T, ElasticError>,
    ) -> Result<T, ElasticError> {
        let lock = self.dir.join(".lock");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::create_dir(&lock) {
                Ok(()) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(DIR_POLL);
                }
                Err(e) => return Err(self.unavailable("lock for compare-and-swap", key, e)),
            }
        }
        let result = f();
        let _ = std::fs::remove_dir(&lock);
        result
    }
}

impl Coordinator for DirCoordinator {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        let path = self.path(key);
        let tmp = PathBuf::from(format!("{}.tmp{}", path.display(), std::process::id()));
        let mut body = Vec::with_capacity(key.len() + 1 + value.len());
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value);
        std::fs::write(&tmp, body).map_err(|e| self.unavailable("put", key, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.unavailable("put", key, e))
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let (path, started) = (self.path(key), Instant::now());
        loop {
            if let Some((_, v)) = self.read(&path, key)? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(ElasticError::timeout(key, started.elapsed()));
            }
            std::thread::sleep(DIR_POLL);
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError> {
        Ok(self.read(&self.path(key), key)?.map(|(_, v)| v))
    }

    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        let first = when.first().map_or("", |(k, _)| *k);
        self.locked(first, || {
            for (k, expected) in when {
                if self.get(k)?.as_deref() != *expected {
                    return Ok(false);
                }
            }
            // In order: a caller puts the key readers watch last, so a reader that sees it
            // finds the others in place.
            for (k, v) in puts {
                self.put(k, v)?;
            }
            Ok(true)
        })
    }

    fn delete(&self, key: &str) -> Result<(), ElasticError> {
        match std::fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.unavailable("delete", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| self.unavailable("list", prefix, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| self.unavailable("list", prefix, e))?
                .path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') || name.contains(".tmp") {
                continue;
            }
            if let Some((k, v)) = self.read(&path, prefix)? {
                if k.starts_with(prefix) {
                    out.push((k, v));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The conformance suite every [`Coordinator`] implementation passes.
pub mod conformance {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::Coordinator;
    use crate::ElasticError;

    /// Runs every check against `c`; keys are made unique with `prefix`.
    pub fn run(c: Arc<dyn Coordinator>, prefix: &str) {
        put_then_get(&*c, prefix);
        wait_sees_a_later_put(c.clone(), prefix);
        missing_key_times_out(&*c, prefix);
        compare_and_swap_has_one_winner(c.clone(), prefix);
        transaction_checks_every_condition(&*c, prefix);
        list_and_delete(&*c, prefix);
        generations_fence_old_writers(&*c, prefix);
    }

    /// Plans commit with their generation, once; writes fenced by an old generation fail.
    fn generations_fence_old_writers(c: &dyn Coordinator, prefix: &str) {
        use crate::job::{fenced_put, generation, propose, JobKeys};
        use crate::plan::Plan;
        let keys = JobKeys::new(&format!("conformance{}", prefix.replace('/', "-")));
        let plan = |dp: usize| Plan {
            tp: 1,
            pp: 1,
            dp,
            blocks: vec![],
            microbatches: vec![1; dp],
            standby: vec![],
        };
        assert_eq!(generation(c, &keys).expect("read"), 0);
        assert!(propose(c, &keys, 0, 1, &plan(2), &[]).expect("first plan"));
        assert!(!propose(c, &keys, 0, 1, &plan(3), &[]).expect("a rival first plan"));
        let stored = c.get(&keys.plan(1)).expect("get").expect("the plan");
        let stored: Plan = serde_json::from_slice(&stored).expect("a plan");
        assert_eq!(stored.dp, 2, "the winner's plan");
        assert!(fenced_put(c, &keys, 1, &[(&keys.committed(1), b"step 1")]).expect("commit"));
        assert!(propose(c, &keys, 1, 2, &plan(1), &[]).expect("second plan"));
        // The old generation can write nothing now, in one key or several.
        let late = [
            (keys.committed(1), b"late".as_slice()),
            (keys.done(), b"done"),
        ];
        let late: Vec<(&str, &[u8])> = late.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert!(!fenced_put(c, &keys, 1, &late).expect("a fenced commit"));
        assert_eq!(
            c.get(&keys.committed(1)).expect("get"),
            Some(b"step 1".to_vec())
        );
        assert_eq!(c.get(&keys.done()).expect("get"), None);
        assert!(!propose(c, &keys, 1, 2, &plan(5), &[]).expect("a stale proposal"));
        assert_eq!(generation(c, &keys).expect("read"), 2);
    }

    fn compare_and_swap_has_one_winner(c: Arc<dyn Coordinator>, prefix: &str) {
        let key = format!("{prefix}/generation");
        let plan = format!("{prefix}/gen-0/plan");
        assert!(c
            .compare_and_swap(&key, None, b"0", &[(&plan, b"first")])
            .expect("create"));
        assert!(!c
            .compare_and_swap(&key, None, b"0", &[(&plan, b"second")])
            .expect("create again"));
        assert!(!c
            .compare_and_swap(&key, Some(b"7"), b"8", &[(&plan, b"stale")])
            .expect("stale"));
        // The extra key was written with the winning swap only.
        assert_eq!(c.get(&plan).expect("get"), Some(b"first".to_vec()));
        // Eight threads race to advance the counter from every value; each value is taken by
        // exactly one of them.
        let wins: usize = (0..8)
            .map(|_| {
                let (c, key) = (c.clone(), key.clone());
                std::thread::spawn(move || {
                    let mut won = 0;
                    for g in 0..20u32 {
                        let (from, to) = (g.to_string(), (g + 1).to_string());
                        if c.compare_and_swap(&key, Some(from.as_bytes()), to.as_bytes(), &[])
                            .expect("swap")
                        {
                            won += 1;
                        }
                    }
                    won
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("racer"))
            .sum();
        assert_eq!(c.get(&key).expect("get"), Some(b"20".to_vec()));
        assert_eq!(wins, 20);
    }

    /// A transaction puts all or nothing, and only when every condition holds: a key still
    /// at its value and another still absent (a commit record fenced by generation).
    fn transaction_checks_every_condition(c: &dyn Coordinator, prefix: &str) {
        let (fence, record, other) = (
            format!("{prefix}/tx/fence"),
            format!("{prefix}/tx/record"),
            format!("{prefix}/tx/other"),
        );
        c.put(&fence, b"1").expect("put");
        let when = |f: &'static [u8]| [(fence.as_str(), Some(f)), (record.as_str(), None)];
        let puts = |v: &'static [u8]| [(record.as_str(), v), (other.as_str(), v)];
        assert!(!c.transact(&when(b"2"), &puts(b"stale")).expect("fenced"));
        assert_eq!(c.get(&record).expect("get"), None);
        assert_eq!(c.get(&other).expect("get"), None, "all or nothing");
        assert!(c.transact(&when(b"1"), &puts(b"first")).expect("first"));
        assert!(!c.transact(&when(b"1"), &puts(b"second")).expect("taken"));
        assert_eq!(c.get(&record).expect("get"), Some(b"first".to_vec()));
        assert_eq!(c.get(&other).expect("get"), Some(b"first".to_vec()));
    }

    fn list_and_delete(c: &dyn Coordinator, prefix: &str) {
        let dir = format!("{prefix}/nodes/");
        for n in ["b", "a", "c"] {
            c.put(&format!("{dir}{n}"), n.as_bytes()).expect("put");
        }
        c.put(&format!("{prefix}/nodesX"), b"outside").expect("put");
        let keys: Vec<String> = c
            .list(&dir)
            .expect("list")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [format!("{dir}a"), format!("{dir}b"), format!("{dir}c")]
        );
        c.delete(&format!("{dir}b")).expect("delete");
        c.delete(&format!("{dir}b")).expect("delete a missing key");
        assert_eq!(c.list(&dir).expect("list").len(), 2);
        assert_eq!(c.get(&format!("{dir}b")).expect("get"), None);
    }

    fn put_then_get(c: &dyn Coordinator, prefix: &str) {
        let key = format!("{prefix}/a");
        c.put(&key, b"one").expect("put");
        c.put(&key, b"two").expect("put again");
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(c.wait_get(&key, soon).expect("get"), b"two");
    }

    fn wait_sees_a_later_put(c: Arc<dyn Coordinator>, prefix: &str) {
        let key = format!("{prefix}/later");
        let writer = {
            let (c, key) = (c.clone(), key.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                c.put(&key, b"here").expect("put");
            })
        };
        let got = c
            .wait_get(&key, Instant::now() + Duration::from_secs(5))
            .expect("wait_get");
        assert_eq!(got, b"here");
        writer.join().expect("writer thread");
    }

    fn missing_key_times_out(c: &dyn Coordinator, prefix: &str) {
        let key = format!("{prefix}/never");
        let started = Instant::now();
        let e = c
            .wait_get(&key, started + Duration::from_millis(100))
            .expect_err("no such key");
        assert!(matches!(e, ElasticError::Timeout { .. }), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(e.to_string().contains(&key), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn in_process_coordinator_passes_the_conformance_suite() {
        conformance::run(Arc::new(InProcessCoordinator::new()), "/marathon/test");
    }

    #[test]
    fn dir_coordinator_passes_the_conformance_suite() {
        let dir = std::env::temp_dir().join(format!("marathon-coord-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        conformance::run(Arc::new(DirCoordinator::new(&dir)), "/marathon/test");
        // Keys that escape to the same name stay apart.
        let c = DirCoordinator::new(&dir);
        c.put("/a/b", b"slash").unwrap();
        c.put("/a_b", b"underscore").unwrap();
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(c.wait_get("/a/b", soon).unwrap(), b"slash");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
