//! The servers a scenario runs against, as real processes on free loopback ports: a cluster of
//! etcd members and a Garage store (an S3-API object store). Each can be killed, stopped and
//! started again on its own data; everything is killed when dropped. A missing server binary is
//! an error that says how to install it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use marathon_elastic::{Coordinator, EtcdCoordinator};

pub const GARAGE_ACCESS_KEY: &str = "GK000000000000000000000001";
pub const GARAGE_SECRET_KEY: &str =
    "0000000000000000000000000000000000000000000000000000000000000001";
pub const GARAGE_BUCKET: &str = "ckpt";

/// A port nobody listens on now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("find a free loopback port")?
        .port())
}

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

/// Garage: `MARATHON_GARAGE`, else where `scripts/setup.sh` installs it (`MARATHON_TOOLS`, by
/// default ~/.cache/marathon/tools), else `garage` on the PATH.
pub fn garage_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MARATHON_GARAGE") {
        return Ok(PathBuf::from(p));
    }
    let tools = std::env::var_os("MARATHON_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/marathon/tools"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/marathon/tools"));
    let bin = tools.join("bin/garage");
    if bin.is_file() {
        return Ok(bin);
    }
    on_path("garage").with_context(|| {
        format!(
            "garage is not installed at {}: chaos scenarios run a real S3-API store; run \
             scripts/setup.sh --test-servers (it runs `cargo install garage --locked --version \
             2.5.0 --root {}`), or set MARATHON_GARAGE to a garage binary",
            bin.display(),
            tools.display()
        )
    })
}

/// Sends `sig` (`-STOP`, `-CONT`, `-KILL`) to `pid`.
pub fn signal(sig: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill {sig} {pid}: no such process");
    }
    Ok(())
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

fn log_file(path: &Path) -> Result<(Stdio, Stdio)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok((log.try_clone()?.into(), log.into()))
}

fn stop(child: &mut Option<Child>) {
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
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdCluster({})", self.urls().join(","))
    }
}

impl EtcdCluster {
    /// Starts `size` members that serve clients on `host` (an address of this machine).
    pub fn start(dir: &Path, size: usize, host: &str) -> Result<EtcdCluster> {
        etcd_binary()?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                url: format!("http://{host}:{}", free_port()?),
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

/// A single-node Garage with its data, configuration and log under `dir`.
pub struct Garage {
    dir: PathBuf,
    child: Option<Child>,
    host: String,
    pub s3_port: u16,
    admin_port: u16,
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Garage({}:{})", self.host, self.s3_port)
    }
}

impl Garage {
    /// Starts a Garage that serves S3 on `host` (an address of this machine).
    pub fn start(dir: &Path, host: &str) -> Result<Garage> {
        garage_binary()?;
        std::fs::create_dir_all(dir)?;
        let (s3_port, rpc_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let d = dir.display();
        let secret: String = (0..32)
            .map(|i| {
                format!(
                    "{:02x}",
                    (s3_port as usize * 31 + i * 97 + rpc_port as usize) % 256
                )
            })
            .collect();
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{host}:{s3_port}\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n"
        );
        std::fs::write(dir.join("garage.toml"), config)?;
        let mut g = Garage {
            dir: dir.to_path_buf(),
            child: None,
            host: host.to_string(),
            s3_port,
            admin_port,
        };
        g.spawn()?;
        Ok(g)
    }

    fn spawn(&mut self) -> Result<()> {
        let (out, err) = log_file(&self.dir.join("garage.log"))?;
        let child = Command::new(garage_binary()?)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_CONFIG_FILE", self.dir.join("garage.toml"))
            .env("GARAGE_DEFAULT_ACCESS_KEY", GARAGE_ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", GARAGE_SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", GARAGE_BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("start garage")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(self.admin_port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!(
                    "garage exited with {status}; its log is {}",
                    self.dir.join("garage.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "garage not healthy within 30 s; its log is {}",
                    self.dir.join("garage.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    /// Starts the server again on its data and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// The object store options a client needs, in object_store's key names.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            (
                "aws_endpoint",
                format!("http://{}:{}", self.host, self.s3_port),
            ),
            ("aws_region", "garage".into()),
            ("aws_access_key_id", GARAGE_ACCESS_KEY.into()),
            ("aws_secret_access_key", GARAGE_SECRET_KEY.into()),
            ("aws_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether Garage's admin API answers 200 on /health (it answers 503 until it can serve).
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}
