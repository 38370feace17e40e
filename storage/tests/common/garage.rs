//! A private Garage server (a real S3-API object store) for tests: its own directory and free
//! loopback ports, stopped and removed on drop. Fails loudly, saying how to install it, when the
//! binary is missing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "GK000000000000000000000001";
pub const SECRET_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";
pub const BUCKET: &str = "ckpt";

/// Where `scripts/setup.sh` installs Garage, or `MARATHON_GARAGE`.
pub fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MARATHON_GARAGE") {
        return PathBuf::from(p);
    }
    let tools = std::env::var_os("MARATHON_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/marathon/tools"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/marathon/tools"));
    let bin = tools.join("bin/garage");
    assert!(
        bin.is_file(),
        "garage is not installed at {}: these tests need a real S3-API store; run scripts/setup.sh \
         (it runs `cargo install garage --locked --version 2.5.0 --root {}`), or set \
         MARATHON_GARAGE to a garage binary",
        bin.display(),
        tools.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running Garage.
pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    pub s3_port: u16,
    admin_port: u16,
}

impl Garage {
    pub fn start() -> Garage {
        let bin = garage_binary();
        let dir = tempfile::tempdir().expect("garage directory");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let d = dir.path().display();
        let secret: String = (0..32)
            .map(|i| {
                format!(
                    "{:02x}",
                    (std::process::id() as usize * 31 + i * 97 + s3_port as usize) % 256
                )
            })
            .collect();
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n"
        );
        std::fs::write(dir.path().join("garage.toml"), config).expect("write garage.toml");
        let child = spawn(&bin, dir.path());
        let mut g = Garage {
            child,
            dir,
            s3_port,
            admin_port,
        };
        g.wait_healthy();
        g
    }

    /// Kills the server (SIGKILL) and starts it again on the same data and ports.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&garage_binary(), self.dir.path());
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(self.admin_port) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("garage exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "garage not healthy within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Options for `Store::open_with("s3://ckpt/...")`.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.s3_port)),
            ("aws_region", "garage".into()),
            ("aws_access_key_id", ACCESS_KEY.into()),
            ("aws_secret_access_key", SECRET_KEY.into()),
            ("aws_allow_http", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `garage server` on the configuration in `dir`, appending to its log there.
fn spawn(bin: &std::path::Path, dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("garage.log"))
        .expect("garage log");
    Command::new(bin)
        .args(["server", "--single-node", "--default-bucket"])
        .env("GARAGE_CONFIG_FILE", dir.join("garage.toml"))
        .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
        .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
        .env("GARAGE_DEFAULT_BUCKET", BUCKET)
        .env("RUST_LOG", "garage=warn")
        .stdout(log.try_clone().expect("garage log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
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
