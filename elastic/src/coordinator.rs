//! The coordinator's key-value contract, and the in-process implementation.
//!
//! Process groups find each other by publishing their addresses under keys namespaced by job,
//! generation and group, and waiting for the keys of their peers. The etcd implementation
//! keeps the same contract across machines.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::ElasticError;

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
}

/// A coordinator inside one process, for single-machine runs and tests.
#[derive(Debug, Default)]
pub struct InProcessCoordinator {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl InProcessCoordinator {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Coordinator for InProcessCoordinator {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let started = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ElasticError::timeout(key, now - started));
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A coordinator in a directory, shared by the processes of one machine: each key is a file,
/// written under a temporary name and renamed into place so a reader never sees half a value.
/// The launcher of a single-machine job makes the directory and removes it at the end.
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

impl Coordinator for DirCoordinator {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        let path = self.path(key);
        let unavailable = |e: std::io::Error| ElasticError::Unavailable {
            action: "put",
            key: key.to_owned(),
            reason: format!("{}: {e}", self.dir.display()),
        };
        let tmp = PathBuf::from(format!("{}.tmp{}", path.display(), std::process::id()));
        std::fs::write(&tmp, value).map_err(unavailable)?;
        std::fs::rename(&tmp, &path).map_err(unavailable)
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let (path, started) = (self.path(key), Instant::now());
        loop {
            match std::fs::read(&path) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ElasticError::Unavailable {
                        action: "get",
                        key: key.to_owned(),
                        reason: format!("{}: {e}", path.display()),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(ElasticError::timeout(key, started.elapsed()));
            }
            std::thread::sleep(DIR_POLL);
        }
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
