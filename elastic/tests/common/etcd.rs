//! A private etcd for tests: its own data directory and free loopback ports, killed on drop.
//! Fails loudly, saying how to install it, when the binary is missing.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use marathon_elastic::EtcdCoordinator;

/// A private etcd on free loopback ports with its own data directory, killed on drop.
pub struct Etcd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub url: String,
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

/// A port nobody listens on now, on any address, not handed out before by this process (a
/// probe's port is free again once the probe closes).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// Starts etcd member `name` of the cluster `initial` (`name=peer-url,...`), with its data
/// and log in `dir`, listening for clients on `url` and for peers on `peer_url`.
pub fn spawn_member(
    dir: &Path,
    name: &str,
    url: &str,
    peer_url: &str,
    initial: &str,
    extra: &[String],
) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("etcd log");
    Command::new(etcd_binary())
        .args(["--name", name, "--data-dir"])
        .arg(dir.join(format!("data-{name}")))
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args([
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
        ])
        .args([
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
        ])
        .args(extra)
        .stdout(log.try_clone().expect("etcd log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start etcd")
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let initial = format!("test={peer_url}");
        let child = spawn_member(dir.path(), "test", &url, &peer_url, &initial, &[]);
        Etcd { child, dir, url }
    }

    pub fn connect(&self) -> EtcdCoordinator {
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

impl Etcd {
    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private etcd cluster of several members on loopback, each with its own data directory,
/// killed on drop.
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
    /// Each member's client URL.
    pub urls: Vec<String>,
}

impl EtcdCluster {
    pub fn start(size: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = spawn_member(dir.path(), &format!("m{i}"), &url, &peer_url, &initial, &[]);
            members.push(Some(child));
            urls.push(url);
        }
        EtcdCluster {
            members,
            _dir: dir,
            urls,
        }
    }

    /// Waits until every member answers, then connects to them all.
    pub fn connect(&self) -> EtcdCoordinator {
        let deadline = Instant::now() + Duration::from_secs(30);
        for url in self.urls.iter().chain([&self.urls.join(",")]) {
            let urls: Vec<String> = url.split(',').map(String::from).collect();
            loop {
                match EtcdCoordinator::connect(&urls, Duration::from_secs(2)) {
                    Ok(c) if urls.len() == self.urls.len() => return c,
                    Ok(_) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(e) => panic!("etcd member at {url} never answered: {e}"),
                }
            }
        }
        unreachable!("the last round connects to every member")
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
