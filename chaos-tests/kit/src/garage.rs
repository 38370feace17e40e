//! A private Garage server (a real S3-API object store) for tests: its own directory and free
//! loopback ports, stopped and removed on drop. The server is the chaos harness's
//! (`marathon_chaos::garage`).

/// A running Garage.
#[derive(Debug)]
pub struct Garage {
    server: marathon_chaos::garage::Garage,
    _dir: tempfile::TempDir,
}

impl Garage {
    /// Starts one; panics saying how to install Garage when it is missing.
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().expect("garage directory");
        let server = marathon_chaos::garage::Garage::start(dir.path(), "127.0.0.1")
            .unwrap_or_else(|e| panic!("{e:#}"));
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
