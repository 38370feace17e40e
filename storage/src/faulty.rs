//! A store wrapper that injects faults, for tests: failed and slow requests, torn writes, and
//! writes that never happen, on paths chosen by a substring. Draws from a seed, so a failing
//! test replays.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// What goes wrong, and where.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability that a request fails with a transient error.
    pub error_rate: f64,
    /// Added to every request.
    pub delay: Duration,
    /// Puts to paths containing this fail permanently (the writer "crashes" before them).
    pub refuse_puts_to: Option<String>,
    /// Puts to paths containing this store only the first half of the payload, then fail (a
    /// torn write on a store without atomic puts).
    pub tear_puts_to: Option<String>,
}

/// Requests seen and faults injected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub requests: u64,
    pub errors: u64,
    pub refused: u64,
    pub torn: u64,
}

struct State {
    faults: Faults,
    rng: u64,
    counts: FaultCounts,
}

/// An [`ObjectStore`] that forwards to `inner` through [`Faults`].
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<Mutex<State>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Faults, seed: u64) -> Self {
        FaultyStore {
            inner,
            state: Arc::new(Mutex::new(State {
                faults,
                rng: seed ^ 0x9e37_79b9_7f4a_7c15,
                counts: FaultCounts::default(),
            })),
        }
    }

    /// Changes the faults from now on.
    pub fn set(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn counts(&self) -> FaultCounts {
        self.lock().counts.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another handle on the same inner store and fault state, for requests that outlive the
    /// call that starts them (an upload's parts, a stream of deletions).
    fn share(&self) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner: self.inner.clone(),
            state: self.state.clone(),
        })
    }

    /// Decides one request's fate: its delay and whether it fails.
    async fn enter(&self, op: &'static str, path: &Path) -> object_store::Result<()> {
        let (delay, fail) = {
            let mut s = self.lock();
            s.counts.requests += 1;
            // SplitMix64.
            s.rng = s.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let u = (z ^ (z >> 31)) as f64 / u64::MAX as f64;
            let fail = u < s.faults.error_rate;
            if fail {
                s.counts.errors += 1;
            }
            (s.faults.delay, fail)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fail {
            return Err(injected(format!("{op} {path}: injected transient failure")));
        }
        Ok(())
    }

    fn matches(rule: &Option<String>, path: &Path) -> bool {
        rule.as_deref().is_some_and(|p| path.as_ref().contains(p))
    }
}

fn injected(msg: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: msg.into(),
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?})", self.lock().faults)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.enter("put", location).await?;
        let faults = self.lock().faults.clone();
        if Self::matches(&faults.refuse_puts_to, location) {
            self.lock().counts.refused += 1;
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "injected: the writer stopped before this put".into(),
            });
        }
        if Self::matches(&faults.tear_puts_to, location) {
            self.lock().counts.torn += 1;
            let bytes: Bytes = payload.into();
            let half = bytes.slice(..bytes.len() / 2);
            self.inner.put_opts(location, half.into(), opts).await?;
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "injected: the writer stopped halfway through this put".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.enter("start upload", location).await?;
        if Self::matches(&self.lock().faults.refuse_puts_to, location) {
            self.lock().counts.refused += 1;
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "injected: the writer stopped before this upload".into(),
            });
        }
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            store: self.share(),
            location: location.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.enter("get", location).await?;
        self.inner.get_opts(location, options).await
    }

    // Since object_store 0.13 a store implements only the stream of deletions, and `delete`
    // (in `ObjectStoreExt`) is a stream of one. Each object in the stream is still a request of
    // its own through the faults, deleted from the inner store on its own, so an injected
    // failure fails that object and no other.
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let store = self.share();
        locations
            .then(move |location| {
                let store = store.clone();
                async move {
                    let location = location?;
                    store.enter("delete", &location).await?;
                    store.inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    // `copy` and `copy_if_not_exists` (in `ObjectStoreExt` since object_store 0.13) both come
    // here, their difference in `options.mode`.
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.enter("copy", to).await?;
        self.inner.copy_opts(from, to, options).await
    }
}

/// A multipart upload whose parts and completion go through the faults too.
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    store: Arc<FaultyStore>,
    location: Path,
}

impl fmt::Debug for FaultyUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyUpload({})", self.location)
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let part = self.inner.put_part(data);
        let (store, location) = (self.store.clone(), self.location.clone());
        Box::pin(async move {
            store.enter("upload part", &location).await?;
            part.await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.store.enter("complete upload", &self.location).await?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}
