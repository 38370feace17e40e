//! A private Garage server (a real S3-API object store) for tests: its own directory and free
//! loopback ports, stopped and removed on drop. Fails loudly, saying how to install it, when the
//! binary is missing. The server itself is the chaos suite's (`chaos-tests/src/garage.rs`).

#[allow(dead_code)]
#[path = "../../../chaos-tests/src/garage.rs"]
mod server;

/// A running Garage.
pub struct Garage {
    server: server::Garage,
    _dir: tempfile::TempDir,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().expect("garage directory");
        let server =
            server::Garage::start(dir.path(), "127.0.0.1").unwrap_or_else(|e| panic!("{e:#}"));
        Garage { server, _dir: dir }
    }

    /// Kills the server (SIGKILL) and starts it again on the same data and ports.
    pub fn restart(&mut self) {
        self.server.restart().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Options for `Store::open_with("s3://ckpt/...")`.
    pub fn options(&self) -> Vec<(String, String)> {
        self.server.options()
    }
}
