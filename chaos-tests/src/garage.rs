//! A private Garage (a real S3-API object store) on free ports, with its data, configuration
//! and log in a directory: started, killed, started again on the same data. Self-contained
//! (std and anyhow), so the storage crate's tests include this file as their Garage too.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const GARAGE_ACCESS_KEY: &str = "GK000000000000000000000001";
pub const GARAGE_SECRET_KEY: &str =
    "0000000000000000000000000000000000000000000000000000000000000001";
pub const GARAGE_BUCKET: &str = "ckpt";

/// A port nobody listens on now, on any address of this machine, that this process has not
/// handed out before. The probe binds the wildcard address: a port some server listens on at one
/// address (etcd on a bridge's address, say) conflicts with it, where a probe on 127.0.0.1 would
/// call it free and two servers would be told the same port. Ports handed out are remembered,
/// since a probe's port is free again the moment the probe closes.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .context("find a free port")?
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return Ok(port);
        }
    }
}

/// `count` consecutive ports nobody listens on now, as [`free_port`] finds one: for a server
/// whose helpers take the ports after its own (an agent's workers' metrics).
pub fn free_ports(count: u16) -> Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    'search: for _ in 0..1000 {
        let base = free_port()?;
        if base.checked_add(count).is_none() {
            continue;
        }
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        for port in base..base + count {
            if given.contains(&port) || TcpListener::bind(("0.0.0.0", port)).is_err() {
                continue 'search;
            }
        }
        given.extend(base..base + count);
        return Ok(base);
    }
    bail!("found no {count} consecutive free ports")
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
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.with_context(|| {
        format!(
            "garage is not installed at {}: chaos scenarios run a real S3-API store; run \
             scripts/setup.sh --test-servers (it runs `cargo install garage --locked --version \
             2.5.0 --root {}`), or set MARATHON_GARAGE to a garage binary",
            bin.display(),
            tools.display()
        )
    })
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .context("open garage.log")?;
        let child = Command::new(garage_binary()?)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_CONFIG_FILE", self.dir.join("garage.toml"))
            .env("GARAGE_DEFAULT_ACCESS_KEY", GARAGE_ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", GARAGE_SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", GARAGE_BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
