//! The etcd coordinator against a real etcd: the coordinator conformance suite, leases that
//! expire when their holder stops keeping them alive, and a holder that learns it lost its lease
//! when etcd goes away.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marathon_elastic::coordinator::conformance;
use marathon_elastic::{Coordinator, EtcdCoordinator};

/// A private etcd on free loopback ports with its own data directory, killed on drop.
struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MARATHON_ETCD") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "etcd is not installed: these tests need a real etcd server; run scripts/setup.sh \
             --test-servers (it runs `apt-get install etcd-server`), or set MARATHON_ETCD to an \
             etcd binary"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(etcd_binary())
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start etcd");
        Etcd {
            child,
            _dir: dir,
            url,
        }
    }

    fn connect(&self) -> EtcdCoordinator {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match EtcdCoordinator::connect(std::slice::from_ref(&self.url), Duration::from_secs(2))
            {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("etcd at {} never answered: {e}", self.url),
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn etcd_coordinator_passes_the_conformance_suite() {
    let etcd = Etcd::start();
    conformance::run(Arc::new(etcd.connect()), "/marathon/conformance");
}

#[test]
fn a_registration_expires_after_its_holder_stops_and_is_revoked_when_dropped() {
    let etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(2);
    // Kept alive well past its TTL.
    let kept = c
        .register("/marathon/job/nodes/a", b"8 slots", ttl)
        .expect("register a");
    std::thread::sleep(ttl * 2);
    assert_eq!(
        c.get("/marathon/job/nodes/a").expect("get"),
        Some(b"8 slots".to_vec())
    );
    assert!(!kept.lost());
    // Dropped: revoked at once.
    drop(kept);
    assert_eq!(c.get("/marathon/job/nodes/a").expect("get"), None);
    // Abandoned, as by a crashed holder: gone once the TTL runs out, and a watcher sees it.
    let b = c
        .register("/marathon/job/nodes/b", b"8 slots", ttl)
        .expect("register b");
    let started = Instant::now();
    b.abandon();
    while c.get("/marathon/job/nodes/b").expect("get").is_some() {
        assert!(
            started.elapsed() < ttl + Duration::from_secs(2),
            "the lease outlived its TTL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "expired too early"
    );
}

#[test]
fn a_holder_whose_lease_cannot_be_kept_alive_learns_it_is_dead() {
    let mut etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(2);
    let reg = c
        .register("/marathon/job/nodes/c", b"8 slots", ttl)
        .expect("register");
    let _ = etcd.child.kill();
    let _ = etcd.child.wait();
    let started = Instant::now();
    while !reg.lost() {
        assert!(
            started.elapsed() < ttl + Duration::from_secs(5),
            "the loss was never noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= ttl - Duration::from_millis(500),
        "declared lost too early"
    );
    // Calls to a dead cluster fail with the key and the reason, within their timeouts.
    let err = c.get("/marathon/job/nodes/c").expect_err("etcd is gone");
    assert!(err.to_string().contains("/marathon/job/nodes/c"), "{err}");
}
