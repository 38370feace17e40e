//! Object stores by URL, and retries.
//!
//! `file:///abs/dir` or a plain path (the default), `memory://`, `s3://bucket/prefix`,
//! `az://container/prefix` and `gs://bucket/prefix`, each through the object_store crate.
//! Credentials and endpoints come from the usual environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`;
//! `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`; `GOOGLE_SERVICE_ACCOUNT`, ...).

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::{Result, StorageError};

/// A store and the prefix inside it that a URL names.
#[derive(Debug, Clone)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The URL it was opened from, for messages.
    pub url: String,
    /// For a local directory: the directory, whose files the writer syncs to disk, since the
    /// local store's puts reach only the page cache.
    pub local_dir: Option<std::path::PathBuf>,
    /// A local directory opened as it is, not wrapped: its objects are files that the writer
    /// writes itself, straight from its staging buffer. A wrapped store (a fault injector)
    /// must see every write, and has none.
    direct: Option<std::path::PathBuf>,
}

impl Store {
    /// A store from a URL or a local path. Local directories are created if missing.
    pub fn open(url: &str) -> Result<Store> {
        Self::open_with(url, std::iter::empty::<(String, String)>())
    }

    /// As [`Store::open`], with options for the cloud stores on top of the environment's, in
    /// object_store's key names (`aws_endpoint`, `aws_region`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_allow_http`, `azure_storage_account_name`, ...).
    pub fn open_with(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Store> {
        let options: Vec<(String, String)> = options.into_iter().collect();
        let bad = |reason: String| StorageError::Url {
            url: url.to_string(),
            reason,
        };
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("file", url),
        };
        let split = |rest: &str| -> (String, Path) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            (bucket.to_string(), Path::from(prefix.trim_matches('/')))
        };
        let inner: Arc<dyn ObjectStore> = match scheme {
            "file" => {
                let dir = std::path::Path::new(rest);
                std::fs::create_dir_all(dir).map_err(|e| {
                    bad(format!(
                        "cannot create the directory {}: {e}",
                        dir.display()
                    ))
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| bad(e.to_string()))?;
                return Ok(Store {
                    inner: Arc::new(fs),
                    prefix: Path::default(),
                    url: url.to_string(),
                    local_dir: Some(dir.to_path_buf()),
                    direct: Some(dir.to_path_buf()),
                });
            }
            "memory" => Arc::new(object_store::memory::InMemory::new()),
            "s3" => {
                let (bucket, _) = split(rest);
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options());
                if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                    // After the client options, which would replace it.
                    b = b.with_allow_http(true);
                }
                b = configure(b, &options, &bad, |b, k, v| b.with_config(k, v))?;
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" | "azure" => {
                let (container, _) = split(rest);
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_retry(retry_config())
                    .with_client_options(client_options());
                let b = configure(b, &options, &bad, |b, k, v| b.with_config(k, v))?;
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "gs" => {
                let (bucket, _) = split(rest);
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options());
                let b = configure(b, &options, &bad, |b, k, v| b.with_config(k, v))?;
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            other => {
                return Err(bad(format!(
                "unknown scheme {other}://; use a path, file://, memory://, s3://, az:// or gs://"
            )))
            }
        };
        let prefix = if scheme == "memory" {
            Path::from(rest.trim_matches('/'))
        } else {
            split(rest).1
        };
        Ok(Store {
            inner,
            prefix,
            url: url.to_string(),
            local_dir: None,
            direct: None,
        })
    }

    /// Makes the object `name` durable: on a local directory, syncs the file and its directory
    /// to disk; other stores are durable once a put returns.
    pub async fn sync(&self, name: &str) -> Result<()> {
        let Some(dir) = &self.local_dir else {
            return Ok(());
        };
        let file = dir.join(name);
        let sync = move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            if let Some(parent) = file.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        tokio::task::spawn_blocking(sync)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| StorageError::Url {
                url: self.url.clone(),
                reason: format!("sync {name} to disk: {e}"),
            })
    }

    /// The file of object `name` when this process may write it itself (see `direct`), for a
    /// name of plain segments (letters, digits, `.`, `_`, `-`), which the local store keeps as
    /// they are.
    pub(crate) fn direct_file(&self, name: &str) -> Option<std::path::PathBuf> {
        let dir = self.direct.as_ref()?;
        let plain = |seg: &str| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let segs: Vec<&str> = name.split('/').collect();
        segs.iter()
            .all(|s| plain(s))
            .then(|| segs.iter().fold(dir.clone(), |p, s| p.join(s)))
    }

    /// `name` under this store's prefix.
    pub fn path(&self, name: &str) -> Path {
        let mut p = self.prefix.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// The same store and prefix with `inner` wrapped, such as by the fault injector.
    pub fn wrapped(&self, inner: Arc<dyn ObjectStore>) -> Store {
        Store {
            inner,
            prefix: self.prefix.clone(),
            url: self.url.clone(),
            local_dir: self.local_dir.clone(),
            direct: None,
        }
    }
}

/// Applies `options` to a store builder through `set`, naming an unknown key.
fn configure<B, K>(
    mut builder: B,
    options: &[(String, String)],
    bad: &dyn Fn(String) -> StorageError,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B>
where
    K: std::str::FromStr,
    K::Err: std::fmt::Display,
{
    for (k, v) in options {
        let key = k.parse().map_err(|e| bad(format!("option {k}: {e}")))?;
        builder = set(builder, key, v);
    }
    Ok(builder)
}

/// HTTP stores retry transient failures themselves: capped exponential backoff.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: 8,
        retry_timeout: Duration::from_secs(180),
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_timeout(Duration::from_secs(120))
        .with_connect_timeout(Duration::from_secs(10))
}

/// Whether an object store error may go away on its own.
pub fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error::*;
    !matches!(
        e,
        NotFound { .. }
            | AlreadyExists { .. }
            | Precondition { .. }
            | NotModified { .. }
            | NotImplemented { .. }
            | NotSupported { .. }
            | InvalidPath { .. }
            | PermissionDenied { .. }
            | Unauthenticated { .. }
            | UnknownConfigurationKey { .. }
    )
}

/// Attempts of one request before its error is returned.
pub const ATTEMPTS_MAX: u32 = 5;

/// Runs `op` until it succeeds, fails for good, or has failed [`ATTEMPTS_MAX`] times, sleeping
/// 50 ms, 100 ms, ... (at most 2 s) between attempts.
pub async fn retry<T, Fut>(mut op: impl FnMut() -> Fut) -> object_store::Result<T>
where
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < ATTEMPTS_MAX && is_transient(&e) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            done => return done,
        }
    }
}
