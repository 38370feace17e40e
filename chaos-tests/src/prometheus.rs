//! A private Prometheus server (Debian's `prometheus`), scraping what HTTP service discovery
//! endpoints list every second, with its configuration, data and log in a directory; and
//! instant queries of its HTTP API.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::garage::free_port;
use crate::servers::{log_file, stop};

/// Prometheus: `MARATHON_PROMETHEUS`, else `prometheus` on the PATH.
pub fn prometheus_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MARATHON_PROMETHEUS") {
        return Ok(PathBuf::from(p));
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .context(
            "prometheus is not installed: the metrics tests scrape a job with a real Prometheus; \
             run scripts/setup.sh --test-servers (it runs `apt-get install prometheus`), or set \
             MARATHON_PROMETHEUS to a prometheus binary",
        )
}

/// A running Prometheus, killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    log: PathBuf,
}

/// One series of a query's answer: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

impl Prometheus {
    /// Starts Prometheus in `dir`, scraping every second the targets that the HTTP service
    /// discovery endpoints `sd_urls` list, and waits until it is ready.
    pub fn start(dir: &Path, sd_urls: &[String]) -> Result<Prometheus> {
        let bin = prometheus_binary()?;
        std::fs::create_dir_all(dir)?;
        let sd: String = sd_urls
            .iter()
            .map(|u| format!("      - url: {u}\n        refresh_interval: 1s\n"))
            .collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  \
                 evaluation_interval: 1s\nscrape_configs:\n  - job_name: marathon\n    \
                 http_sd_configs:\n{sd}"
            ),
        )?;
        let port = free_port()?;
        let log = dir.join("prometheus.log");
        let (out, err) = log_file(&log)?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let p = Prometheus {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.get("/-/ready").is_ok_and(|(code, _)| code == 200) {
            if Instant::now() > deadline {
                bail!("prometheus not ready within 30 s:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(p)
    }

    /// What Prometheus logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query's answer: each series with its labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let (code, body) = self.get(&format!("/api/v1/query?query={}", percent(promql)))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {code}: {body}"))?;
        if v["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("query {promql}: no value in {r}"))?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// Waits at most `timeout` for `promql`'s answer to satisfy `ok`, and returns it.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        ok: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql)?;
            if ok(&got) {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("{promql}: still {got:?} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `GET path`: the status code and body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut c = TcpStream::connect(("127.0.0.1", self.port))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            c,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
            self.port
        )?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        let code = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((code, body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// `s` percent-encoded for a query string.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
