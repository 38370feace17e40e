//! Process groups: the collectives that tensor, pipeline and data parallelism use on the CPU,
//! over TCP, or over shared memory between members on one host (`shm`).
//!
//! Members rendezvous through the [`Coordinator`]: each binds a listener, publishes its address
//! under a key namespaced by job, generation and group, and connects to the members of lower
//! rank (a full mesh; pipeline and data-parallel groups are small). Each connection proves both
//! ends hold the generation's group secret ([`crate::handshake`]); greetings are answered
//! concurrently, each within a short deadline, so a silent or hostile connection delays no one,
//! and a rank is taken by the first connection that proves it, once. All-reduce is a ring
//! reduce-scatter followed by a ring all-gather, which moves 2 (p - 1) / p of the buffer per
//! member: the bandwidth-optimal schedule.
//!
//! Once connected, the members choose the group's transport ([`CommTransport`]): shared memory
//! when every member is on this host and none asks for TCP ([`GroupSpec::transport`], or
//! [`TRANSPORT_ENV`]`=tcp` in its environment), TCP otherwise. Rank 0 logs the choice and why.
//! Both give the same results bit for bit: shared memory sums in the ring's order.
//!
//! Every operation has a deadline, and an [`AbortHandle`] can abort the group from any thread:
//! it shuts the sockets down (and wakes a member waiting on shared memory), so a blocked
//! operation returns at once, and every pending and later operation fails with
//! [`RuntimeError::Aborted`]. A member that dies closes its sockets, which its peers see as
//! [`RuntimeError::PeerLost`] rather than waiting for it; on shared memory the sockets stay
//! open for just that.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marathon_elastic::Coordinator;

use crate::error::{Result, RuntimeError};
use crate::handshake::{self, Identity};
use crate::shm::{self, Shm, Watch};

/// Bytes moved per blocking socket call, so deadlines and aborts are checked often.
const IO_PIECE_BYTES: usize = 4 << 20;
/// The longest a connection may take to prove its membership once accepted.
const HANDSHAKE_MAX: Duration = Duration::from_secs(5);

/// Where a group lives and who this member is.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub job: String,
    pub generation: u64,
    /// The group's name, unique in the generation (`dp-0`, `tp-3`, `pp-1`).
    pub name: String,
    pub rank: usize,
    pub size: usize,
    /// The address this member listens on (port 0 picks a free one).
    pub bind: SocketAddr,
    /// How long rendezvous waits for every member.
    pub rendezvous_timeout: Duration,
    /// Deadline of each operation.
    pub op_timeout: Duration,
    /// The generation's group secret, which every connection proves it holds (an elastic
    /// job's, drawn by its leader for each generation; empty for groups of one launch on one
    /// machine, whose members prove only that they belong to its job and group).
    pub secret: Vec<u8>,
    /// What this member lets the group use: shared memory where every member is on this host
    /// ([`CommChoice::Auto`]) or TCP always. One member asking for TCP makes the group TCP.
    pub transport: CommChoice,
}

/// The environment variable that forces TCP on every group of a process: `tcp`, or `auto`
/// (the default) to let [`GroupSpec::transport`] decide.
pub const TRANSPORT_ENV: &str = "MARATHON_COMM_TRANSPORT";

/// What a member lets its group use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CommChoice {
    /// Shared memory when every member is on this host, TCP otherwise.
    #[default]
    Auto,
    /// TCP, even on one host.
    Tcp,
}

/// How a group's members move their buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommTransport {
    Tcp,
    SharedMemory,
}

impl CommTransport {
    fn of(shared_memory: bool) -> Self {
        if shared_memory {
            CommTransport::SharedMemory
        } else {
            CommTransport::Tcp
        }
    }
}

impl std::fmt::Display for CommTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommTransport::Tcp => "tcp",
            CommTransport::SharedMemory => "shared memory",
        })
    }
}

/// How long a loopback group waits for its members by default.
const LOOPBACK_RENDEZVOUS: Duration = Duration::from_secs(60);

impl GroupSpec {
    /// A group of processes or threads on this machine, listening on loopback, in
    /// generation 0. Each operation may take up to `op_timeout`.
    pub fn loopback(job: &str, name: &str, rank: usize, size: usize, op_timeout: Duration) -> Self {
        GroupSpec {
            job: job.into(),
            generation: 0,
            name: name.into(),
            rank,
            size,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            rendezvous_timeout: LOOPBACK_RENDEZVOUS,
            op_timeout,
            secret: Vec::new(),
            transport: CommChoice::Auto,
        }
    }

    /// What this member asks of the group's transport: TCP if its spec or its environment
    /// says so, shared memory on this host otherwise.
    fn ask(&self) -> std::result::Result<shm::Ask, String> {
        if self.transport == CommChoice::Tcp {
            return Ok(shm::Ask::Tcp("its group spec says tcp".into()));
        }
        match std::env::var(TRANSPORT_ENV).as_deref() {
            Ok("tcp") => Ok(shm::Ask::Tcp(format!("{TRANSPORT_ENV}=tcp"))),
            Ok("auto") | Ok("") | Err(std::env::VarError::NotPresent) => {
                Ok(shm::Ask::Auto(shm::host_identity()))
            }
            Ok(other) => Err(format!(
                "{TRANSPORT_ENV}={other:?}: expected \"tcp\" or \"auto\""
            )),
            Err(e) => Err(format!("{TRANSPORT_ENV}: {e}")),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            job: self.job.clone(),
            generation: self.generation,
            group: self.name.clone(),
            secret: self.secret.clone(),
        }
    }

    /// The coordinator key where member `rank` publishes its address.
    pub fn key(&self, rank: usize) -> String {
        format!(
            "/marathon/{}/gen-{}/pg/{}/rank-{rank}",
            self.job, self.generation, self.name
        )
    }
}

/// Aborts a [`ProcessGroup`] from another thread.
#[derive(Debug, Clone)]
pub struct AbortHandle {
    aborted: Arc<AtomicBool>,
    streams: Arc<Vec<TcpStream>>,
    /// On shared memory: marks this member gone and wakes everyone waiting.
    shm: Option<shm::Leaver>,
}

impl AbortHandle {
    /// Fails every pending and later operation of the group with [`RuntimeError::Aborted`].
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in self.streams.iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(l) = &self.shm {
            l.leave();
        }
    }
}

/// One member's connections to the other members of a group.
#[derive(Debug)]
pub struct ProcessGroup {
    spec: GroupSpec,
    /// Stream to each peer, indexed by rank; `None` at this member's own rank.
    peers: Vec<Option<TcpStream>>,
    abort: AbortHandle,
    /// Receive buffer of the reduce steps: one chunk, grown to the largest seen.
    scratch: Vec<f32>,
    /// The connections refused at rendezvous, and why; a handshake still running when the group
    /// formed adds its refusal when it ends.
    refused: Arc<Mutex<Vec<String>>>,
    /// The segment, when the group is on shared memory.
    shm: Option<Shm>,
}

/// The part of a buffer of `len` elements that rank `i` of `size` owns in reduce-scatter and
/// all-gather: as even as possible, the first `len % size` ranks one element larger.
pub fn chunk_range(len: usize, size: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl ProcessGroup {
    /// Joins the group described by `spec`, waiting for every member until `spec.rendezvous_timeout`.
    pub fn connect(coord: &dyn Coordinator, spec: GroupSpec) -> Result<Self> {
        assert!(
            spec.rank < spec.size,
            "rank {} outside group of {}",
            spec.rank,
            spec.size
        );
        let deadline = Instant::now() + spec.rendezvous_timeout;
        let fail = |reason: String| RuntimeError::Rendezvous {
            group: spec.name.clone(),
            rank: spec.rank,
            reason,
        };
        let listener =
            TcpListener::bind(spec.bind).map_err(|e| fail(format!("bind {}: {e}", spec.bind)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| fail(format!("local address: {e}")))?;
        coord
            .put(&spec.key(spec.rank), addr.to_string().as_bytes())
            .map_err(|e| fail(e.to_string()))?;

        let id = spec.identity();
        let mut peers: Vec<Option<TcpStream>> = (0..spec.size).map(|_| None).collect();
        // Connect to every lower rank and prove who we are; it proves who it is.
        for (peer, slot) in peers.iter_mut().enumerate().take(spec.rank) {
            let value = coord
                .wait_get(&spec.key(peer), deadline)
                .map_err(|e| fail(e.to_string()))?;
            let text = String::from_utf8_lossy(&value).into_owned();
            let peer_addr: SocketAddr = text
                .parse()
                .map_err(|_| fail(format!("rank {peer} published a bad address {text:?}")))?;
            let check = || coord.check().map_err(|e| fail(e.to_string()));
            let mut stream = connect_until(peer_addr, deadline, check).map_err(|e| match e {
                Connect::Io(e) => fail(format!("connect to rank {peer} at {peer_addr}: {e}")),
                Connect::Cancelled(e) => e,
            })?;
            handshake::greet(&mut stream, &id, spec.rank, peer, deadline, &check)?
                .map_err(|why| fail(format!("rank {peer} at {peer_addr}: {why}")))?;
            *slot = Some(stream);
        }
        // Accept every higher rank. Each accepted connection proves itself on a thread of its
        // own, within HANDSHAKE_MAX; the first to prove a rank takes it.
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        type Proved = (TcpStream, SocketAddr, std::result::Result<usize, String>);
        let (proved_tx, proved) = std::sync::mpsc::channel::<Proved>();
        let refused = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = spec.size - spec.rank - 1;
        while waiting > 0 {
            for (stream, from, outcome) in proved.try_iter() {
                match outcome {
                    Ok(peer) if peers[peer].is_none() => {
                        peers[peer] = Some(stream);
                        waiting -= 1;
                    }
                    Ok(peer) => {
                        let why = format!("rank {peer} was already taken by another connection");
                        log_refusal(&spec, from, &why);
                        refusal(&refused, from, &why);
                    }
                    // Logged and recorded by its handshake's thread, which may end after the
                    // rendezvous.
                    Err(_) => {}
                }
            }
            if waiting == 0 {
                break;
            }
            match listener.accept() {
                Ok((mut stream, from)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| fail(e.to_string()))?;
                    let (tx, s, refused) = (proved_tx.clone(), spec.clone(), refused.clone());
                    let until = Instant::now() + remaining(deadline).min(HANDSHAKE_MAX);
                    std::thread::spawn(move || {
                        let id = s.identity();
                        let outcome = handshake::answer(&mut stream, &id, s.rank, s.size, until);
                        if let Err(why) = &outcome {
                            log_refusal(&s, from, why);
                            refusal(&refused, from, why);
                        }
                        let _ = tx.send((stream, from, outcome));
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    coord.check().map_err(|e| fail(e.to_string()))?;
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (spec.rank + 1..spec.size)
                            .filter(|&r| peers[r].is_none())
                            .collect();
                        return Err(fail(format!(
                            "ranks {missing:?} did not connect within {} ms",
                            spec.rendezvous_timeout.as_millis()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(fail(format!("accept: {e}"))),
            }
        }
        let mut clones = Vec::new();
        for s in peers.iter().flatten() {
            s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            clones.push(s.try_clone().map_err(|e| fail(e.to_string()))?);
        }
        let shm = if spec.size > 1 {
            let chosen =
                shm::negotiate(&mut peers, spec.rank, spec.ask().map_err(&fail)?, deadline)
                    .map_err(&fail)?;
            if chosen.shm.is_some() {
                // From now on the connections only tell whether a peer is alive, which a wait
                // asks without blocking.
                for s in peers.iter().flatten() {
                    s.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
                }
            }
            if spec.rank == 0 {
                let transport = CommTransport::of(chosen.shm.is_some());
                tracing::info!(
                    "group {}: collectives over {transport} across {} ranks ({})",
                    spec.name,
                    spec.size,
                    chosen.why
                );
            }
            chosen.shm
        } else {
            None
        };
        let abort = AbortHandle {
            aborted: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(clones),
            shm: shm.as_ref().map(Shm::leaver),
        };
        Ok(ProcessGroup {
            spec,
            peers,
            abort,
            scratch: Vec::new(),
            refused,
            shm,
        })
    }

    /// How this group's members move their buffers, as chosen at rendezvous.
    pub fn transport(&self) -> CommTransport {
        CommTransport::of(self.shm.is_some())
    }

    /// The connections refused at rendezvous (another job's or generation's, or an impostor's),
    /// each with its address and why; each was also logged. A connection whose handshake was
    /// still running when the group formed joins the list once its handshake ends.
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn rank(&self) -> usize {
        self.spec.rank
    }

    pub fn size(&self) -> usize {
        self.spec.size
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// A handle that aborts this group from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// Sums `buf` across the group: every member ends with the same total.
    pub fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let deadline = self.begin("all-reduce")?;
        if let Some(done) = self.on_shm(deadline, |shm, watch| {
            shm.all_reduce(buf, watch, || {
                crate::moments::reach(crate::moments::Moment::MidCollective)
            })
        }) {
            return done;
        }
        let done = self.reduce_scatter_until(buf, deadline).and_then(|_| {
            crate::moments::reach(crate::moments::Moment::MidCollective);
            self.all_gather_until(buf, deadline)
        });
        self.fail_fast(done)
    }

    /// Sums `buf` across the group, in place, leaving this member's chunk
    /// ([`chunk_range`] of its rank) holding the total; the rest of `buf` is left partial.
    /// Returns that chunk's range.
    pub fn reduce_scatter(&mut self, buf: &mut [f32]) -> Result<Range<usize>> {
        let deadline = self.begin("reduce-scatter")?;
        let (len, p, r) = (buf.len(), self.spec.size, self.spec.rank);
        if let Some(done) = self.on_shm(deadline, |shm, watch| shm.reduce_scatter(buf, watch)) {
            return done.map(|_| chunk_range(len, p, r));
        }
        let done = self.reduce_scatter_until(buf, deadline);
        self.fail_fast(done)
    }

    /// Gathers every member's chunk ([`chunk_range`] of its rank) of `buf`, in place.
    pub fn all_gather(&mut self, buf: &mut [f32]) -> Result<()> {
        let deadline = self.begin("all-gather")?;
        if let Some(done) = self.on_shm(deadline, |shm, watch| shm.all_gather(buf, watch)) {
            return done;
        }
        let done = self.all_gather_until(buf, deadline);
        self.fail_fast(done)
    }

    fn reduce_scatter_until(&mut self, buf: &mut [f32], deadline: Instant) -> Result<Range<usize>> {
        let op = "reduce-scatter";
        let (p, r) = (self.spec.size, self.spec.rank);
        let mine = chunk_range(buf.len(), p, r);
        if p == 1 {
            return Ok(mine);
        }
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        let largest = chunk_range(buf.len(), p, 0).len();
        if self.scratch.len() < largest {
            self.scratch.resize(largest, 0.0);
        }
        // Chunk c starts at rank c + 1 and gathers one addend per hop, ending at rank c.
        for s in 0..p - 1 {
            let send = chunk_range(buf.len(), p, (r + 2 * p - 1 - s) % p);
            let recv = chunk_range(buf.len(), p, (r + 2 * p - 2 - s) % p);
            let incoming = &mut self.scratch[..recv.len()];
            let (to, from) = (
                peer_stream(&self.peers, next),
                peer_stream(&self.peers, prev),
            );
            exchange(
                &self.spec,
                &self.abort,
                op,
                (to, next, &buf[send]),
                (from, prev, as_bytes_mut(incoming)),
                deadline,
            )?;
            for (x, &y) in buf[recv].iter_mut().zip(incoming.iter()) {
                *x += y;
            }
        }
        Ok(mine)
    }

    fn all_gather_until(&mut self, buf: &mut [f32], deadline: Instant) -> Result<()> {
        let op = "all-gather";
        let (p, r) = (self.spec.size, self.spec.rank);
        if p == 1 {
            return Ok(());
        }
        let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
        for s in 0..p - 1 {
            let send = chunk_range(buf.len(), p, (r + p - s) % p);
            let recv = chunk_range(buf.len(), p, (r + 2 * p - 1 - s) % p);
            let (sent, received) = disjoint(buf, send, recv);
            exchange(
                &self.spec,
                &self.abort,
                op,
                (self.stream(next), next, sent),
                (self.stream(prev), prev, as_bytes_mut(received)),
                deadline,
            )?;
        }
        Ok(())
    }

    /// Copies `root`'s `buf` to every member.
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let op = "broadcast";
        let deadline = self.begin(op)?;
        assert!(
            root < self.spec.size,
            "broadcast root {root} outside group of {}",
            self.spec.size
        );
        if let Some(done) = self.on_shm(deadline, |shm, watch| shm.broadcast(buf, root, watch)) {
            return done;
        }
        let done = self.broadcast_until(buf, root, deadline);
        self.fail_fast(done)
    }

    fn broadcast_until(&mut self, buf: &mut [f32], root: usize, deadline: Instant) -> Result<()> {
        let op = "broadcast";
        if self.spec.rank == root {
            for peer in (0..self.spec.size).filter(|&q| q != root) {
                send_all(
                    &self.spec,
                    &self.abort,
                    op,
                    self.stream(peer),
                    peer,
                    as_bytes(buf),
                    deadline,
                )?;
            }
            Ok(())
        } else {
            recv_all(
                &self.spec,
                &self.abort,
                op,
                self.stream(root),
                root,
                as_bytes_mut(buf),
                deadline,
            )
        }
    }

    /// Sends `buf` to `peer`, which must [`ProcessGroup::recv`] the same length.
    pub fn send(&mut self, buf: &[f32], peer: usize) -> Result<()> {
        let deadline = self.begin("send")?;
        self.check_peer(peer);
        if let Some(done) = self.on_shm(deadline, |shm, watch| {
            shm.exchange("send", (as_bytes(buf), peer), (&mut [], peer), watch)
        }) {
            return done;
        }
        let done = send_all(
            &self.spec,
            &self.abort,
            "send",
            self.stream(peer),
            peer,
            as_bytes(buf),
            deadline,
        );
        self.fail_fast(done)
    }

    /// Sends `out` to `to` while receiving `into` from `from`, concurrently, so two neighbours
    /// that send to each other at once (a pipeline's steady state) never wait on each other's
    /// socket buffers.
    pub fn send_recv(
        &mut self,
        out: &[f32],
        to: usize,
        into: &mut [f32],
        from: usize,
    ) -> Result<()> {
        let op = "send-recv";
        let deadline = self.begin(op)?;
        self.check_peer(to);
        self.check_peer(from);
        if let Some(done) = self.on_shm(deadline, |shm, watch| {
            shm.exchange(op, (as_bytes(out), to), (as_bytes_mut(into), from), watch)
        }) {
            return done;
        }
        let done = exchange(
            &self.spec,
            &self.abort,
            op,
            (self.stream(to), to, out),
            (self.stream(from), from, as_bytes_mut(into)),
            deadline,
        );
        self.fail_fast(done)
    }

    /// Receives `buf.len()` elements from `peer`.
    pub fn recv(&mut self, buf: &mut [f32], peer: usize) -> Result<()> {
        let deadline = self.begin("recv")?;
        self.check_peer(peer);
        if let Some(done) = self.on_shm(deadline, |shm, watch| {
            shm.exchange("recv", (&[], peer), (as_bytes_mut(buf), peer), watch)
        }) {
            return done;
        }
        let done = recv_all(
            &self.spec,
            &self.abort,
            "recv",
            self.stream(peer),
            peer,
            as_bytes_mut(buf),
            deadline,
        );
        self.fail_fast(done)
    }

    /// Runs `op` on the shared memory segment, if the group has one (None otherwise), and
    /// names a failure as the TCP path does.
    fn on_shm<T>(
        &mut self,
        deadline: Instant,
        op: impl FnOnce(&mut Shm, &Watch) -> std::result::Result<T, shm::Failed>,
    ) -> Option<Result<T>> {
        let shm = self.shm.as_mut()?;
        let watch = Watch {
            peers: &self.peers,
            aborted: &self.abort.aborted,
            deadline,
        };
        let done = op(shm, &watch).map_err(|shm::Failed { op, stall }| {
            let (group, rank) = (self.spec.name.clone(), self.spec.rank);
            match stall {
                shm::Stall::Aborted => RuntimeError::Aborted { op, group, rank },
                shm::Stall::Timeout { peer } => RuntimeError::CommTimeout {
                    op,
                    group,
                    rank,
                    peer,
                    timeout_ms: self.spec.op_timeout.as_millis(),
                },
                shm::Stall::Lost { peer, reason } => RuntimeError::PeerLost {
                    op,
                    group,
                    rank,
                    peer,
                    reason,
                },
            }
        });
        Some(self.fail_fast(done))
    }

    /// A failed operation leaves the streams mid-message, so the group is done: abort it, which
    /// also fails the peers' pending operations at once instead of at their deadlines. The
    /// runtime forms a new group.
    fn fail_fast<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.abort.abort();
        }
        result
    }

    /// Checks the group is usable and returns the operation's deadline.
    fn begin(&self, op: &'static str) -> Result<Instant> {
        if self.abort.aborted.load(Ordering::SeqCst) {
            return Err(RuntimeError::Aborted {
                op,
                group: self.spec.name.clone(),
                rank: self.spec.rank,
            });
        }
        Ok(Instant::now() + self.spec.op_timeout)
    }

    fn stream(&self, peer: usize) -> &TcpStream {
        self.check_peer(peer);
        peer_stream(&self.peers, peer)
    }

    fn check_peer(&self, peer: usize) {
        assert!(peer != self.spec.rank, "rank {peer} cannot talk to itself");
        assert!(
            peer < self.spec.size,
            "rank {peer} outside group of {}",
            self.spec.size
        );
    }
}

fn peer_stream(peers: &[Option<TcpStream>], peer: usize) -> &TcpStream {
    peers[peer].as_ref().expect("every peer is connected")
}

/// Sends to one peer while receiving from another (or the same one), so neither side's socket
/// buffer fills while both wait to write.
fn exchange(
    spec: &GroupSpec,
    abort: &AbortHandle,
    op: &'static str,
    (to, to_rank, out): (&TcpStream, usize, &[f32]),
    (from, from_rank, into): (&TcpStream, usize, &mut [u8]),
    deadline: Instant,
) -> Result<()> {
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_all(spec, abort, op, to, to_rank, as_bytes(out), deadline));
        let received = recv_all(spec, abort, op, from, from_rank, into, deadline);
        let sent = sender.join().unwrap_or_else(|_| {
            Err(lost(
                spec,
                abort,
                op,
                to_rank,
                "the sending thread panicked".into(),
            ))
        });
        received.and(sent)
    })
}

fn send_all(
    spec: &GroupSpec,
    abort: &AbortHandle,
    op: &'static str,
    mut s: &TcpStream,
    peer: usize,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<()> {
    // One system call at a time, each with the time left: a peer that trickles data cannot
    // stretch the operation past its deadline.
    while !bytes.is_empty() {
        let timeout = left(deadline)
            .ok_or_else(|| io_error(spec, abort, op, peer, ErrorKind::TimedOut.into()))?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| io_error(spec, abort, op, peer, e))?;
        match s.write(&bytes[..bytes.len().min(IO_PIECE_BYTES)]) {
            Ok(0) => return Err(io_error(spec, abort, op, peer, ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(spec, abort, op, peer, e)),
        }
    }
    Ok(())
}

fn recv_all(
    spec: &GroupSpec,
    abort: &AbortHandle,
    op: &'static str,
    mut s: &TcpStream,
    peer: usize,
    mut bytes: &mut [u8],
    deadline: Instant,
) -> Result<()> {
    while !bytes.is_empty() {
        let timeout = left(deadline)
            .ok_or_else(|| io_error(spec, abort, op, peer, ErrorKind::TimedOut.into()))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| io_error(spec, abort, op, peer, e))?;
        let piece = bytes.len().min(IO_PIECE_BYTES);
        match s.read(&mut bytes[..piece]) {
            Ok(0) => {
                return Err(io_error(
                    spec,
                    abort,
                    op,
                    peer,
                    ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => bytes = &mut std::mem::take(&mut bytes)[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(spec, abort, op, peer, e)),
        }
    }
    Ok(())
}

/// Records a connection refused at rendezvous, with its address and why.
fn refusal(refused: &Mutex<Vec<String>>, from: SocketAddr, why: &str) {
    refused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(format!("{from}: {why}"));
}

/// Logs a connection refused at rendezvous, with its address and why.
fn log_refusal(spec: &GroupSpec, from: SocketAddr, why: &str) {
    tracing::info!(
        "rendezvous of group {} (rank {}, generation {}): refused a connection from {from}: {why}",
        spec.name,
        spec.rank,
        spec.generation
    );
}

/// Time left before `deadline`, or None once it has passed.
fn left(deadline: Instant) -> Option<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    (!d.is_zero()).then_some(d)
}

/// Names a failed socket call: aborted, timed out, or the peer is gone.
fn io_error(
    spec: &GroupSpec,
    abort: &AbortHandle,
    op: &'static str,
    peer: usize,
    e: std::io::Error,
) -> RuntimeError {
    if abort.aborted.load(Ordering::SeqCst) {
        return RuntimeError::Aborted {
            op,
            group: spec.name.clone(),
            rank: spec.rank,
        };
    }
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => RuntimeError::CommTimeout {
            op,
            group: spec.name.clone(),
            rank: spec.rank,
            peer,
            timeout_ms: spec.op_timeout.as_millis(),
        },
        ErrorKind::UnexpectedEof | ErrorKind::WriteZero => {
            lost(spec, abort, op, peer, "it closed the connection".into())
        }
        _ => lost(spec, abort, op, peer, e.to_string()),
    }
}

fn lost(
    spec: &GroupSpec,
    _abort: &AbortHandle,
    op: &'static str,
    peer: usize,
    reason: String,
) -> RuntimeError {
    RuntimeError::PeerLost {
        op,
        group: spec.name.clone(),
        rank: spec.rank,
        peer,
        reason,
    }
}

/// Why a connection to a peer was not made.
enum Connect {
    Io(std::io::Error),
    /// `check` failed between attempts: the generation was aborted or superseded.
    Cancelled(RuntimeError),
}

/// Connects to `addr` until `deadline`, in attempts of at most [`CONNECT_SLICE`], asking
/// `check` between them: a peer that is unreachable (its node partitioned, its packets
/// dropped) does not hold a rendezvous that was aborted until the deadline.
fn connect_until(
    addr: SocketAddr,
    deadline: Instant,
    check: impl Fn() -> Result<()>,
) -> std::result::Result<TcpStream, Connect> {
    loop {
        match TcpStream::connect_timeout(&addr, remaining(deadline).min(CONNECT_SLICE)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(Connect::Io(e)),
            Err(_) => {
                check().map_err(Connect::Cancelled)?;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The longest single connection attempt at rendezvous.
const CONNECT_SLICE: Duration = Duration::from_millis(250);

/// Time left before `deadline`, at least a millisecond (a zero socket timeout means "none").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Two disjoint ranges of one buffer: the first shared, the second mutable.
fn disjoint(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

fn as_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 has alignment 1; the length covers the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn as_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`, and every byte pattern is a valid f32, so writes through the
    // byte view cannot produce an invalid value.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_evenly() {
        for len in [0, 1, 7, 8, 1001] {
            for size in 1..6 {
                let ranges: Vec<_> = (0..size).map(|i| chunk_range(len, size, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[size - 1].end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }
}
