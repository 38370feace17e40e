//! The servers a scenario runs against, as real processes on free ports: a cluster of etcd
//! members, and a Garage store ([`crate::garage`]). Each can be killed, stopped and started
//! again on its own data; everything is killed when dropped. A missing server binary is an
//! error that says how to install it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use marathon_elastic::{Coordinator, EtcdCoordinator};

pub use crate::garage::free_port;

fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// etcd: `MARATHON_ETCD`, else `etcd` on the PATH.
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MARATHON_ETCD") {
        return Ok(PathBuf::from(p));
    }
    on_path("etcd").context(
        "etcd is not installed: chaos scenarios run a real etcd cluster; run scripts/setup.sh \
         --test-servers (it runs `apt-get install etcd-server`), or set MARATHON_ETCD to an etcd \
         binary",
    )
}

/// Whether process `pid` is running (a zombie awaiting its reaper counts as gone).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub(crate) fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((log.try_clone()?.into(), log.into()))
}

pub(crate) fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

struct Member {
    name: String,
    url: String,
    peer_url: String,
    child: Option<Child>,
}

/// A cluster of etcd members, each with its data and log under `dir`.
pub struct EtcdCluster {
    dir: PathBuf,
    initial: String,
    members: Vec<Member>,
    /// The members' arguments beyond their names and addresses (TLS).
    extra: Vec<String>,
}

/// The files of an etcd that serves clients over TLS and asks each for a certificate of `ca`.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdCluster({})", self.urls().join(","))
    }
}

impl EtcdCluster {
    /// Starts `size` members that serve clients on `host` (an address of this machine).
    pub fn start(dir: &Path, size: usize, host: &str) -> Result<EtcdCluster> {
        Self::start_with(dir, size, host, None)
    }

    /// As [`EtcdCluster::start`], serving clients over TLS when `tls` is given.
    pub fn start_with(
        dir: &Path,
        size: usize,
        host: &str,
        tls: Option<&ClientTls>,
    ) -> Result<EtcdCluster> {
        etcd_binary()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let extra = tls.map_or(vec![], |t| {
            let path = |p: &Path| p.display().to_string();
            vec![
                "--cert-file".into(),
                path(&t.cert),
                "--key-file".into(),
                path(&t.key),
                "--trusted-ca-file".into(),
                path(&t.ca),
                "--client-cert-auth".into(),
            ]
        });
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                url: format!("{scheme}://{host}:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                child: None,
            });
        }
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let mut cluster = EtcdCluster {
            dir: dir.to_path_buf(),
            initial: initial.join(","),
            members,
            extra,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let (out, err) = log_file(&self.dir.join(format!("etcd-{}.log", m.name)))?;
        let child = Command::new(etcd_binary()?)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.join(format!("etcd-{}", m.name)))
            .args([
                "--listen-client-urls",
                &m.url,
                "--advertise-client-urls",
                &m.url,
            ])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("start etcd")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// The running members' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        stop(&mut self.members[i].child);
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// A client, once the cluster answers.
    pub fn connect(&self, timeout: Duration) -> Result<EtcdCoordinator> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = EtcdCoordinator::connect(&self.urls(), Duration::from_secs(2))
                .and_then(|c| c.get("/marathon-chaos-ping").map(|_| c));
            match attempt {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => bail!(
                    "the etcd cluster at {} never answered within {timeout:?}: {e}; its logs are \
                     in {}",
                    self.urls().join(","),
                    self.dir.display()
                ),
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            stop(&mut m.child);
        }
    }
}
