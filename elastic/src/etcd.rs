//! The coordinator on etcd, through its v3 API.
//!
//! Every call has a timeout, and calls that fail for want of a connection are retried a few
//! times with backoff (the client reconnects underneath). `wait_get` watches the key instead of
//! polling. Leases carry node registrations: [`EtcdCoordinator::register`] puts a key under a
//! lease and keeps the lease alive in the background; when the lease cannot be kept alive the
//! registration says so, and its holder must treat that as its own death.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};

use crate::{Coordinator, ElasticError};

/// How long one etcd call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a call that fails for want of a connection.
const ATTEMPTS_MAX: u32 = 4;

/// Who a client is to etcd, and how it knows etcd is the one it means. The default is plain
/// `http://` endpoints, anonymous.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    /// The CA (PEM) that etcd's server certificate must chain to: TLS, for `https://`
    /// endpoints.
    pub ca_pem: Option<Vec<u8>>,
    /// The certificate and key (PEM) this client presents, for etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A user and its password, for etcd's authentication.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EtcdAccess({}, tls {})",
            self.who(),
            self.ca_pem.is_some()
        )
    }
}

impl EtcdAccess {
    /// Whom etcd sees, for messages: never the password.
    pub fn who(&self) -> String {
        match (&self.user, &self.identity) {
            (Some((user, _)), _) => format!("user {user:?}"),
            (None, Some(_)) => "the client certificate's user".into(),
            (None, None) => "an anonymous client".into(),
        }
    }
}

/// A [`Coordinator`] on an etcd cluster.
#[derive(Clone)]
pub struct EtcdCoordinator {
    client: Client,
    rt: Arc<tokio::runtime::Runtime>,
    endpoints: Vec<String>,
    who: String,
    /// Requests that failed, each retry counted.
    errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdCoordinator({:?})", self.endpoints)
    }
}

impl EtcdCoordinator {
    /// Connects to the cluster at `endpoints` (`http://host:port`, comma-separated lists split
    /// by the caller), anonymously, waiting at most `timeout`.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Self, ElasticError> {
        Self::connect_with(endpoints, timeout, &EtcdAccess::default())
    }

    /// Connects as `access` says: over TLS, with a client certificate, as a user. A credential
    /// etcd refuses is [`ElasticError::Denied`] at once, never retried.
    pub fn connect_with(
        endpoints: &[String],
        timeout: Duration,
        access: &EtcdAccess,
    ) -> Result<Self, ElasticError> {
        let (endpoint, who) = (endpoints.join(","), access.who());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("marathon-etcd")
            .enable_all()
            .build()
            .map_err(|e| unavailable("start a runtime for", "", e))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(CALL_TIMEOUT)
            // Generous: on a loaded machine a late ping answer must not cost the connection.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(10));
        let options = secured(options, access);
        let client = rt
            .block_on(async {
                tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await
            })
            .map_err(|_| ElasticError::Unavailable {
                action: "connect to",
                key: endpoints.join(","),
                reason: format!(
                    "no answer within {} ms; is etcd running there?",
                    timeout.as_millis()
                ),
            })?
            .map_err(|e| match denial(&e) {
                Some(reason) => denied("connect to", "", &endpoint, &who, reason),
                None => unavailable("connect to", &endpoint, e),
            })?;
        let c = EtcdCoordinator {
            client,
            rt: Arc::new(rt),
            endpoints: endpoints.to_vec(),
            who,
            errors: Arc::default(),
        };
        // The connection is lazy: one call proves the cluster answers.
        // (A status call: every authenticated user may make it, whatever keys its role covers.)
        c.call("reach", &endpoint, |mut c| async move { c.status().await })
            .map_err(|e| match e {
                // Under TLS 1.3 a server verifies the client's certificate after the handshake
                // and, refusing it, closes the connection: the client sees a broken pipe.
                ElasticError::Unavailable { reason, .. }
                    if access.identity.is_some()
                        && ["broken pipe", "connection reset"]
                            .iter()
                            .any(|w| reason.to_lowercase().contains(w)) =>
                {
                    denied(
                        "reach",
                        "",
                        &endpoint,
                        &c.who,
                        format!(
                            "TLS: etcd closed the connection once it saw the client \
                             certificate, as it does with one it does not accept (signed by \
                             another CA than its --trusted-ca-file?): {reason}"
                        ),
                    )
                }
                e => e,
            })?;
        Ok(c)
    }

    /// Requests to etcd that failed so far, each retry counted.
    pub fn request_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Runs `op` with the call timeout, retrying failures to reach etcd with backoff.
    fn call<T, F, Fut>(&self, action: &'static str, key: &str, op: F) -> Result<T, ElasticError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.rt.block_on(async {
            let mut backoff = Duration::from_millis(50);
            let mut attempt = 1;
            loop {
                let result = tokio::time::timeout(CALL_TIMEOUT, op(self.client.clone())).await;
                if !matches!(result, Ok(Ok(_))) {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
                let err = match result {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) if lease_not_found(&e) => {
                        return Err(ElasticError::LeaseLost {
                            action,
                            key: key.to_owned(),
                        })
                    }
                    Ok(Err(e)) => match denial(&e) {
                        Some(reason) => {
                            return Err(denied(
                                action,
                                key,
                                &self.endpoints.join(","),
                                &self.who,
                                reason,
                            ))
                        }
                        None if !transient(&e) => return Err(unavailable(action, key, e)),
                        None => unavailable(action, key, e),
                    },
                    Err(_) => ElasticError::Unavailable {
                        action,
                        key: key.to_owned(),
                        reason: format!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
                    },
                };
                if attempt >= ATTEMPTS_MAX {
                    return Err(err);
                }
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        })
    }

    /// Puts `key` = `value` under a new lease of `ttl` and keeps the lease alive in the
    /// background until the registration is dropped, when the key is revoked at once. If the
    /// lease cannot be kept alive, [`Registration::lost`] turns true.
    pub fn register(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Registration, ElasticError> {
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = self.call("grant a lease for", key, |mut c| async move {
            c.lease_grant(ttl_s, None).await
        })?;
        let (id, granted_s) = (lease.id(), lease.ttl());
        let (k, v) = (key.to_owned(), value.to_vec());
        self.call("register", key, |mut c| {
            let (k, v) = (k.clone(), v.clone());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(id))).await }
        })?;
        let lost = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (client, lost, stop) = (self.client.clone(), lost.clone(), stop.clone());
            let period = Duration::from_millis((ttl_s as u64 * 1000) / 3);
            self.rt.spawn(keep_alive(
                client,
                id,
                period,
                Duration::from_secs(ttl_s as u64),
                lost,
                stop,
            ))
        };
        Ok(Registration {
            coord: self.clone(),
            lease: id,
            ttl: Duration::from_secs(granted_s.max(0) as u64),
            key: key.to_owned(),
            lost,
            stop,
            task: Some(task),
        })
    }
}

impl EtcdCoordinator {
    /// Takes `key` for the holder of `reg` if nobody holds it. The key lives under the
    /// registration's lease, so it goes when its holder dies or leaves, and every watcher sees
    /// the deletion and campaigns again. Returns the holder's value after the attempt (this
    /// holder's `value` when it won).
    pub fn campaign(
        &self,
        key: &str,
        value: &[u8],
        reg: &Registration,
    ) -> Result<Vec<u8>, ElasticError> {
        self.campaign_under(key, value, reg.lease)
    }

    /// [`EtcdCoordinator::campaign`] for the holder of lease `lease`.
    pub(crate) fn campaign_under(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<Vec<u8>, ElasticError> {
        let resp = self.call("campaign for", key, |mut c| {
            let (k, v) = (key.to_owned(), value.to_vec());
            let txn = Txn::new()
                .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    k.clone(),
                    v,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(k, None)]);
            async move { c.txn(txn).await }
        })?;
        if resp.succeeded() {
            return Ok(value.to_vec());
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        // The holder may have gone between the compare and the read: try again next change.
        Ok(holder.unwrap_or_default())
    }
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    /// The new value, or `None` when the key was deleted (or its lease expired).
    pub value: Option<Vec<u8>>,
}

/// The changes under a prefix, as they happen; see [`EtcdCoordinator::watch_prefix`].
#[derive(Debug)]
pub struct Watch {
    changes: std::sync::mpsc::Receiver<Result<Change, String>>,
    task: tokio::task::JoinHandle<()>,
    /// The runtime the watch runs on, kept alive as long as the watch even when the
    /// coordinator that started it is dropped.
    _rt: Arc<tokio::runtime::Runtime>,
}

impl Watch {
    /// The next change, waiting at most `timeout`; `Ok(None)` when none came.
    pub fn next(&self, timeout: Duration) -> Result<Option<Change>, ElasticError> {
        match self.changes.recv_timeout(timeout) {
            Ok(Ok(c)) => Ok(Some(c)),
            Ok(Err(reason)) => Err(ElasticError::Unavailable {
                action: "watch",
                key: String::new(),
                reason,
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(ElasticError::Unavailable {
                    action: "watch",
                    key: String::new(),
                    reason: "the watch ended".into(),
                })
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EtcdCoordinator {
    /// Watches every key under `prefix` from now on: puts, deletes and lease expiries arrive in
    /// order, without polling.
    pub fn watch_prefix(&self, prefix: &str) -> Result<Watch, ElasticError> {
        let mut client = self.client.clone();
        let p = prefix.to_owned();
        let mut stream = self
            .rt
            .block_on(async move {
                tokio::time::timeout(
                    CALL_TIMEOUT,
                    open_watch(&mut client, p, WatchOptions::new().with_prefix()),
                )
                .await
            })
            .map_err(|_| ElasticError::Unavailable {
                action: "watch",
                key: prefix.to_owned(),
                reason: format!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
            })?
            .map_err(|e| unavailable("watch", prefix, e))?;
        let (tx, changes) = std::sync::mpsc::channel();
        let task = self.rt.spawn(async move {
            // The stream lives as long as the task: dropping it would end the watch.
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if let Some(reason) = cancelled(&msg) {
                            let _ = tx.send(Err(reason));
                            return;
                        }
                        for e in msg.events() {
                            let Some(kv) = e.kv() else { continue };
                            let change = Change {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                value: (e.event_type() == EventType::Put)
                                    .then(|| kv.value().to_vec()),
                            };
                            if tx.send(Ok(change)).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Watch {
            changes,
            task,
            _rt: self.rt.clone(),
        })
    }
}

/// Opens a watch of `key` and waits for etcd to confirm it, so that every change after this
/// returns (or from the start revision in `options`) arrives on the stream. The client hands
/// the stream back before etcd has answered, with the confirmation as its first message; a
/// caller that went on at once could miss a change made before etcd set the watch up. The
/// stream carries the watch: dropping it ends the watch. etcd's refusal to create it is an
/// error.
async fn open_watch(
    client: &mut Client,
    key: String,
    options: WatchOptions,
) -> Result<WatchStream, etcd_client::Error> {
    let mut stream = client.watch(key, Some(options)).await?;
    match stream.message().await? {
        Some(msg) => match cancelled(&msg) {
            Some(reason) => Err(etcd_client::Error::WatchError(reason)),
            None if msg.created() => Ok(stream),
            None => Err(etcd_client::Error::WatchError(
                "etcd answered the watch without confirming it".into(),
            )),
        },
        None => Err(etcd_client::Error::WatchError(
            "the watch ended before etcd confirmed it".into(),
        )),
    }
}

/// Why etcd cancelled a watch, when `msg` says it did (its start revision compacted away, or
/// the watch refused): no more events come on it.
fn cancelled(msg: &WatchResponse) -> Option<String> {
    msg.canceled().then(|| {
        if msg.compact_revision() > 0 {
            format!(
                "etcd cancelled the watch: revisions up to {} are compacted",
                msg.compact_revision()
            )
        } else {
            format!("etcd cancelled the watch: {}", msg.cancel_reason())
        }
    })
}

/// Keeps lease `id` alive every `period`; if no keep-alive succeeds for `ttl`, or etcd says the
/// lease no longer exists (revoked, or expired while this holder could not reach it), the
/// lease is gone and `lost` is set. After a failed keep-alive it tries again every
/// [`KEEP_ALIVE_RETRY`], not a whole period later: etcd counts the lease's time from the last
/// keep-alive it received, so one that waits out a short outage (an etcd member lost, a
/// leader election) must land as soon as etcd answers again.
async fn keep_alive(
    mut client: Client,
    id: i64,
    period: Duration,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut last_ok = Instant::now();
    let mut keeper = None;
    loop {
        if keeper.is_none() {
            match tokio::time::timeout(period, client.lease_keep_alive(id)).await {
                Ok(Ok(k)) => keeper = Some(k),
                // The client's word for a first answer of TTL 0 on a new stream.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                _ => {}
            }
        }
        let ok = match keeper.as_mut() {
            Some((k, stream)) => {
                if k.keep_alive().await.is_err() {
                    false
                } else {
                    match tokio::time::timeout(period, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => true,
                        // A TTL of 0 in the answer: the lease no longer exists, and waiting
                        // out the TTL would only let this holder act for a dead node longer.
                        Ok(Ok(Some(_))) => {
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        _ => false,
                    }
                }
            }
            None => false,
        };
        if ok {
            last_ok = Instant::now();
        } else {
            keeper = None;
            if last_ok.elapsed() >= ttl {
                lost.store(true, Ordering::SeqCst);
                return;
            }
        }
        let next = if ok { period } else { KEEP_ALIVE_RETRY };
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// How soon a failed keep-alive is tried again.
const KEEP_ALIVE_RETRY: Duration = Duration::from_millis(100);

/// A key kept alive under a lease; see [`EtcdCoordinator::register`].
pub struct Registration {
    coord: EtcdCoordinator,
    lease: i64,
    ttl: Duration,
    key: String,
    lost: Arc<AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({} lease {:x})", self.key, self.lease)
    }
}

impl Registration {
    pub(crate) fn lease_id(&self) -> i64 {
        self.lease
    }

    /// Whether the lease expired: the key is gone, and the holder must stop as if dead.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The lease's time to live as etcd granted it: whole seconds, and never below etcd's
    /// minimum (1.5 election timeouts, 2 s with etcd's defaults).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Replaces the registered value, keeping the lease.
    pub fn update(&self, value: &[u8]) -> Result<(), ElasticError> {
        let lease = self.lease;
        self.coord.call("update", &self.key, |mut c| {
            let (k, v) = (self.key.clone(), value.to_vec());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })?;
        Ok(())
    }

    /// Stops keeping the lease alive without revoking it, as a crashed holder would: the key
    /// disappears when the lease's time runs out.
    pub fn abandon(mut self) {
        self.stop.notify_one();
        self.task.take();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.stop.notify_one();
            task.abort();
            let lease = self.lease;
            let _ = self
                .coord
                .call("revoke the lease of", &self.key, |mut c| async move {
                    c.lease_revoke(lease).await
                });
        }
    }
}

impl Coordinator for EtcdCoordinator {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        self.call("put", key, |mut c| {
            let (k, v) = (key.to_owned(), value.to_vec());
            async move { c.put(k, v, None).await }
        })
        .map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError> {
        let resp = self.call("get", key, |mut c| {
            let k = key.to_owned();
            async move { c.get(k, None).await }
        })?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let started = Instant::now();
        // A watch that breaks (a member lost, a connection reset) is started again from a new
        // read until the deadline.
        loop {
            let resp = self.call("get", key, |mut c| {
                let k = key.to_owned();
                async move { c.get(k, None).await }
            })?;
            if let Some(kv) = resp.kvs().first() {
                return Ok(kv.value().to_vec());
            }
            // Watch from just after the read, so a put in between is not missed.
            let from = resp.header().map_or(0, |h| h.revision()) + 1;
            let mut client = self.client.clone();
            let k = key.to_owned();
            let watched = self.rt.block_on(async move {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(left, async move {
                    let mut stream = open_watch(
                        &mut client,
                        k,
                        WatchOptions::new().with_start_revision(from),
                    )
                    .await?;
                    while let Some(msg) = stream.message().await? {
                        // A cancelled watch sends nothing more: a broken watch, read again.
                        if let Some(reason) = cancelled(&msg) {
                            return Err(etcd_client::Error::WatchError(reason));
                        }
                        for e in msg.events() {
                            if e.event_type() == EventType::Put {
                                if let Some(kv) = e.kv() {
                                    return Ok(Some(kv.value().to_vec()));
                                }
                            }
                        }
                    }
                    Ok::<_, etcd_client::Error>(None)
                })
                .await
            });
            match watched {
                Ok(Ok(Some(v))) => return Ok(v),
                Err(_) => return Err(ElasticError::timeout(key, started.elapsed())),
                Ok(Ok(None)) | Ok(Err(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Ok(None)) => return Err(ElasticError::timeout(key, started.elapsed())),
                Ok(Err(e)) => return Err(unavailable("watch", key, e)),
            }
        }
    }

    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        let first = when.first().map_or("", |(k, _)| *k);
        let resp = self.call("transaction", first, |mut c| {
            let compares: Vec<Compare> = when
                .iter()
                .map(|(k, expected)| match expected {
                    // A key that never existed, or was deleted, has create revision 0.
                    None => Compare::create_revision(*k, CompareOp::Equal, 0),
                    Some(v) => Compare::value(*k, CompareOp::Equal, v.to_vec()),
                })
                .collect();
            let ops: Vec<TxnOp> = puts
                .iter()
                .map(|(k, v)| TxnOp::put(*k, v.to_vec(), None))
                .collect();
            let txn = Txn::new().when(compares).and_then(ops);
            async move { c.txn(txn).await }
        })?;
        Ok(resp.succeeded())
    }

    fn delete(&self, key: &str) -> Result<(), ElasticError> {
        self.call("delete", key, |mut c| {
            let k = key.to_owned();
            async move { c.delete(k, None).await }
        })
        .map(|_| ())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError> {
        let resp = self.call("list", prefix, |mut c| {
            let p = prefix.to_owned();
            async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
        })?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }
}

/// Whether an etcd error is about reaching the cluster, which a retry may cure.
/// etcd's answer to a write under a lease that no longer exists.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("requested lease not found"))
}

fn transient(e: &etcd_client::Error) -> bool {
    matches!(
        e,
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)
    ) || matches!(
        e,
        // gRPC's UNAVAILABLE (14) and DEADLINE_EXCEEDED (4).
        etcd_client::Error::GRpcStatus(s) if matches!(i32::from(s.code()), 14 | 4)
    )
}

/// `options` with TLS and credentials as `access` gives them.
fn secured(mut options: ConnectOptions, access: &EtcdAccess) -> ConnectOptions {
    if access.ca_pem.is_some() || access.identity.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &access.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &access.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    if let Some((user, password)) = &access.user {
        options = options
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    options
}

/// Why etcd refused a credential or a request, if that is what `e` is: a failed
/// authentication, a permission the user lacks, or a TLS handshake that a certificate failed
/// (theirs or ours). These are never transient.
fn denial(e: &etcd_client::Error) -> Option<String> {
    // gRPC's UNAUTHENTICATED (16), PERMISSION_DENIED (7), and INVALID_ARGUMENT (3), which
    // etcd answers a wrong password with.
    if let etcd_client::Error::GRpcStatus(s) = e {
        let code = i32::from(s.code());
        if matches!(code, 16 | 7) || (code == 3 && s.message().contains("authentication failed")) {
            return Some(s.message().to_string());
        }
    }
    // A TLS handshake that failed on a certificate, wherever in the chain of errors it shows.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    let lower = text.to_lowercase();
    ["certificate", "unknownissuer", "unknownca", "fatal alert"]
        .iter()
        .any(|w| lower.contains(w))
        .then(|| format!("TLS: {text}"))
}

/// etcd at `endpoint` refused `who` (a credential, or a request its role does not cover).
fn denied(
    action: &'static str,
    key: &str,
    endpoint: &str,
    who: &str,
    reason: String,
) -> ElasticError {
    ElasticError::Denied {
        action,
        key: key.to_owned(),
        reason: format!("at {endpoint} as {who}: refused: {reason}"),
    }
}

fn unavailable(action: &'static str, key: &str, e: impl std::fmt::Display) -> ElasticError {
    ElasticError::Unavailable {
        action,
        key: key.to_owned(),
        reason: e.to_string(),
    }
}
