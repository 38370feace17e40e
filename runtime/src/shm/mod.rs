//! Shared memory for the members of a process group that live on one host: the same
//! collectives as the TCP ring, moved through one mapped segment at memory speed.
//!
//! The members choose it at rendezvous, over the TCP connections that have just proved each
//! member holds the group secret: every member reports its host (boot id, host name, network
//! and mount namespaces, user), and when all match and none asks for TCP, rank 0 creates a
//! file under `/dev/shm` with an unguessable name (`O_EXCL`, mode 0600, its pages reserved up
//! front so a full `/dev/shm` is a refusal now rather than a `SIGBUS` later) and sends its name.
//! The others map it and say so; rank 0 then unlinks it, so nothing is left behind whoever
//! dies, and tells everyone the outcome. A member that cannot map it turns the group to TCP.
//!
//! The segment holds, after a header of control words (one cache line per rank and per
//! direction of each pair):
//!
//! - two buffers of `p` slots of `p` windows each, for the collectives. Each collective moves
//!   its buffer in pieces, alternating between the two buffers, with a barrier after each
//!   phase: a member writes only its own slot, and a buffer is written again only after every
//!   member has passed the next piece's first barrier, by which time everyone's reads of it are
//!   done.
//! - one ring per ordered pair of members for `send` and `recv`: a byte stream with a head the
//!   sender advances and a tail the receiver advances, so a send returns once its bytes are in
//!   the ring, as a TCP send returns once they are in the socket buffer.
//!
//! A member that waits spins briefly (only when the group has no more members than the
//! machine has cores), yields its core for a while, then sleeps on a futex word of its own (its
//! "bell"), which a peer rings when it publishes something; so eight members on two cores do not
//! burn them. Every slice of sleep it checks the abort flag, the deadline, and whether a peer it
//! waits for left the group (its `gone` word) or died (its TCP connection, kept open for this,
//! reads end of file).
//!
//! Sums are bitwise those of the TCP ring: the element of chunk `c` ([`chunk_range`]) is summed
//! by rank `c` in the ring's order, `x[c+1] + x[c+2] + ... + x[c]`, one addition at a time.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::chunk_range;

mod negotiate;
mod segment;

pub(crate) use negotiate::{host_identity, negotiate, Ask};
use segment::{futex_wait, Segment};

/// Elements summed at a time, kept in the first-level cache.
const BLOCK: usize = 2048;
/// The longest a member sleeps before it checks its peers' connections and the deadline.
const SLICE: Duration = Duration::from_millis(20);
/// How long a member spins before it yields, when the group has no more members than the
/// machine has cores (otherwise it yields at once: the peer it waits for may need the core).
const SPIN: Duration = Duration::from_micros(30);
/// How long a member yields its core before it sleeps on its bell: a peer that was waiting for
/// a core runs meanwhile, without the cost of a sleep and a wake.
const YIELD: Duration = Duration::from_micros(100);

/// Why a wait ended without what it waited for.
#[derive(Debug)]
pub(crate) enum Stall {
    Aborted,
    Timeout { peer: usize },
    Lost { peer: usize, reason: String },
}

/// A failed operation: the phase it failed in (`reduce-scatter`, `all-gather`, `send`, ...)
/// and why.
#[derive(Debug)]
pub(crate) struct Failed {
    pub op: &'static str,
    pub stall: Stall,
}

/// What a wait watches besides the segment: the member's own abort flag, its TCP connections
/// to its peers (end of file there is a dead peer), and the operation's deadline.
pub(crate) struct Watch<'a> {
    pub peers: &'a [Option<TcpStream>],
    pub aborted: &'a AtomicBool,
    pub deadline: Instant,
}

/// Wakes the abort path of a group on shared memory: marks the member gone and rings every
/// bell, its own included, so its pending wait returns at once.
#[derive(Debug, Clone)]
pub(crate) struct Leaver {
    seg: Arc<Segment>,
    rank: usize,
}

impl Leaver {
    pub fn leave(&self) {
        self.seg.leave(self.rank);
    }
}

/// One member's side of a group on shared memory.
#[derive(Debug)]
pub(crate) struct Shm {
    seg: Arc<Segment>,
    rank: usize,
    /// Barriers this member has passed: every member passes the same ones in the same order.
    barriers: u64,
    /// Collective pieces this member has moved; the piece's parity picks its buffer.
    pieces: u64,
    spin: Duration,
}

impl Drop for Shm {
    /// A member that drops its group leaves it, as its closed sockets tell its TCP peers.
    fn drop(&mut self) {
        self.seg.leave(self.rank);
    }
}

impl Shm {
    fn new(seg: Segment, rank: usize) -> Self {
        let size = seg.layout.size;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Shm {
            seg: Arc::new(seg),
            rank,
            barriers: 0,
            pieces: 0,
            spin: if size <= cores { SPIN } else { Duration::ZERO },
        }
    }

    pub fn leaver(&self) -> Leaver {
        Leaver {
            seg: self.seg.clone(),
            rank: self.rank,
        }
    }

    fn size(&self) -> usize {
        self.seg.layout.size
    }

    /// Waits until `ready` holds. `pending` names the peers it still waits for: those whose
    /// departure fails the wait, the first of them named at the deadline.
    fn wait(
        &self,
        watch: &Watch,
        ready: impl Fn() -> bool,
        pending: impl Fn() -> Vec<usize>,
    ) -> Result<(), Stall> {
        if ready() {
            return Ok(());
        }
        let spun = Instant::now();
        while spun.elapsed() < self.spin {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if ready() {
                return Ok(());
            }
        }
        let yielded = Instant::now();
        while yielded.elapsed() < YIELD {
            std::thread::yield_now();
            if ready() {
                return Ok(());
            }
        }
        let (seg, me) = (&*self.seg, self.rank);
        loop {
            if watch.aborted.load(SeqCst) {
                return Err(Stall::Aborted);
            }
            let waiting = pending();
            let lost = waiting.iter().find_map(|&peer| {
                if seg.gone(peer).load(SeqCst) != 0 {
                    return Some((peer, "it left the group".to_string()));
                }
                let reason = watch.peers[peer].as_ref().and_then(closed)?;
                Some((peer, reason))
            });
            // Looked at after the departures: what a peer published before it left counts, as
            // the bytes a TCP peer sent before closing its socket still arrive.
            if waiting.is_empty() || ready() {
                return Ok(());
            }
            if let Some((peer, reason)) = lost {
                return Err(Stall::Lost { peer, reason });
            }
            let left = watch.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stall::Timeout { peer: waiting[0] });
            }
            // A peer publishes, then rings; this member announces its sleep, then looks once
            // more, then sleeps only if the bell has not changed: no ring is missed.
            let rung = seg.bell(me).load(SeqCst);
            seg.asleep(me).store(1, SeqCst);
            if !ready() && !watch.aborted.load(SeqCst) {
                futex_wait(seg.bell(me), rung, left.min(SLICE));
            }
            seg.asleep(me).store(0, SeqCst);
            if ready() {
                return Ok(());
            }
        }
    }

    /// Waits until every member has reached this barrier.
    fn barrier(&mut self, watch: &Watch) -> Result<(), Stall> {
        self.barriers += 1;
        let (k, p, seg) = (self.barriers, self.size(), &*self.seg);
        seg.arrived(self.rank).store(k, SeqCst);
        let all = || (0..p).all(|q| seg.arrived(q).load(SeqCst) >= k);
        // Of the members arriving together at least the last sees them all, and it wakes the
        // others: sleepers are woken once a barrier, not at every arrival.
        if all() {
            for q in (0..p).filter(|&q| q != self.rank) {
                seg.ring_bell(q);
            }
        }
        self.wait(watch, all, || {
            (0..p)
                .filter(|&q| seg.arrived(q).load(SeqCst) < k)
                .collect()
        })
    }

    /// The buffer of the next piece.
    fn next_buffer(&mut self) -> usize {
        self.pieces += 1;
        (self.pieces % 2) as usize
    }

    /// Sums `buf` across the group: every member ends with the total, bitwise what the TCP
    /// ring gives. `halfway` runs once, when the first piece has been summed.
    pub fn all_reduce(
        &mut self,
        buf: &mut [f32],
        watch: &Watch,
        halfway: impl FnOnce(),
    ) -> Result<(), Failed> {
        self.reduce(buf, watch, true, halfway)
    }

    /// Sums `buf` across the group, leaving this member's chunk holding the total.
    pub fn reduce_scatter(&mut self, buf: &mut [f32], watch: &Watch) -> Result<(), Failed> {
        self.reduce(buf, watch, false, || {})
    }

    /// Reduce-scatter, and with `gather` the all-gather after it. Piece `j` holds the `j`-th
    /// window of every member's chunk.
    fn reduce(
        &mut self,
        buf: &mut [f32],
        watch: &Watch,
        gather: bool,
        halfway: impl FnOnce(),
    ) -> Result<(), Failed> {
        let (p, me, w) = (self.size(), self.rank, self.seg.layout.window);
        let rs = |stall| Failed {
            op: "reduce-scatter",
            stall,
        };
        let ag = |stall| Failed {
            op: "all-gather",
            stall,
        };
        let chunks: Vec<Range<usize>> = (0..p).map(|c| chunk_range(buf.len(), p, c)).collect();
        let pieces = chunks[0].len().div_ceil(w);
        let mut halfway = Some(halfway);
        let seg = self.seg.clone();
        for j in 0..pieces {
            let b = self.next_buffer();
            let part = |c: usize| window(&chunks[c], j, w);
            // Every other member's window of this member's values, into its own slot.
            for c in (0..p).filter(|&c| c != me) {
                let src = &buf[part(c)];
                // SAFETY: this member's slot, which no one reads until the barrier below.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        seg.slot(b, me).add(c * w),
                        src.len(),
                    )
                };
            }
            self.barrier(watch).map_err(rs)?;
            self.sum_window(b, part(me), buf, gather);
            if let Some(f) = halfway.take() {
                f();
            }
            if !gather {
                continue;
            }
            self.barrier(watch).map_err(ag)?;
            for c in (0..p).filter(|&c| c != me) {
                let dst = &mut buf[part(c)];
                // SAFETY: rank c's sums of its window, written before the barrier above and
                // left alone until every member has passed the next piece's first barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        seg.slot(b, c).add(c * w),
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
            }
        }
        if let Some(f) = halfway.take() {
            f();
        }
        Ok(())
    }

    /// Sums this member's window `mine` of buffer `b` in the TCP ring's order: the values of
    /// ranks `me + 1, me + 2, ...` from their slots, this member's own last. Writes the sums into
    /// `buf`, and with `publish` into this member's slot for the others to gather.
    fn sum_window(&self, b: usize, mine: Range<usize>, buf: &mut [f32], publish: bool) {
        let (p, me, w) = (self.size(), self.rank, self.seg.layout.window);
        let seg = &*self.seg;
        let n = mine.len();
        let mut acc = [0f32; BLOCK];
        for at in (0..n).step_by(BLOCK) {
            let m = BLOCK.min(n - at);
            let acc = &mut acc[..m];
            let theirs = |q: usize| {
                // SAFETY: rank q's values for this member's window, written before the barrier
                // this member has passed and not written again until the next piece's first
                // barrier.
                unsafe { std::slice::from_raw_parts(seg.slot(b, q).add(me * w + at), m) }
            };
            acc.copy_from_slice(theirs((me + 1) % p));
            for k in 2..p {
                for (a, x) in acc.iter_mut().zip(theirs((me + k) % p)) {
                    *a += *x;
                }
            }
            let own = &mut buf[mine.start + at..mine.start + at + m];
            for (a, x) in acc.iter_mut().zip(own.iter()) {
                *a += *x;
            }
            own.copy_from_slice(acc);
            if publish {
                // SAFETY: this member's own window of its slot, which no one reads before
                // the next barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(acc.as_ptr(), seg.slot(b, me).add(me * w + at), m)
                };
            }
        }
    }

    /// Gathers every member's chunk of `buf`, in place. Piece `j` holds the `j`-th window of
    /// every chunk, a slot wide.
    pub fn all_gather(&mut self, buf: &mut [f32], watch: &Watch) -> Result<(), Failed> {
        let (p, me, w) = (self.size(), self.rank, self.seg.layout.slot_elems());
        let chunks: Vec<Range<usize>> = (0..p).map(|c| chunk_range(buf.len(), p, c)).collect();
        let seg = self.seg.clone();
        for j in 0..chunks[0].len().div_ceil(w) {
            let b = self.next_buffer();
            let src = &buf[window(&chunks[me], j, w)];
            // SAFETY: this member's slot, read by the others only after the barrier below.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), seg.slot(b, me), src.len()) };
            self.barrier(watch).map_err(|stall| Failed {
                op: "all-gather",
                stall,
            })?;
            for c in (0..p).filter(|&c| c != me) {
                let dst = &mut buf[window(&chunks[c], j, w)];
                // SAFETY: rank c's slot, written before the barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(seg.slot(b, c), dst.as_mut_ptr(), dst.len())
                };
            }
        }
        Ok(())
    }

    /// Copies `root`'s `buf` to every member, a whole buffer at a time.
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize, watch: &Watch) -> Result<(), Failed> {
        let whole = self.size() * self.seg.layout.slot_elems();
        let seg = self.seg.clone();
        for start in (0..buf.len()).step_by(whole) {
            let part = start..buf.len().min(start + whole);
            let b = self.next_buffer();
            if self.rank == root {
                let src = &buf[part.clone()];
                // SAFETY: the root alone writes this buffer now; the others read it after the
                // barrier. A buffer's slots are contiguous.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), seg.slot(b, 0), src.len()) };
            }
            self.barrier(watch).map_err(|stall| Failed {
                op: "broadcast",
                stall,
            })?;
            if self.rank != root {
                let dst = &mut buf[part];
                // SAFETY: written by the root before the barrier.
                unsafe {
                    std::ptr::copy_nonoverlapping(seg.slot(b, 0), dst.as_mut_ptr(), dst.len())
                };
            }
        }
        Ok(())
    }

    /// Writes `out` into the ring to `to` while reading `into` from the ring from `from`
    /// (either may be empty), until both are done.
    pub fn exchange(
        &mut self,
        op: &'static str,
        (mut out, to): (&[u8], usize),
        (mut into, from): (&mut [u8], usize),
        watch: &Watch,
    ) -> Result<(), Failed> {
        let (seg, me) = (self.seg.clone(), self.rank);
        let cap = seg.layout.ring_bytes as u64;
        // Moved a quarter ring at a time, so the reader starts while the writer goes on.
        let piece = seg.layout.ring_bytes / 4;
        let can_send = |out: &[u8]| {
            !out.is_empty() && seg.head(me, to).load(SeqCst) - seg.tail(me, to).load(SeqCst) < cap
        };
        let can_recv = |into: &[u8]| {
            !into.is_empty() && seg.head(from, me).load(SeqCst) > seg.tail(from, me).load(SeqCst)
        };
        loop {
            let mut moved = false;
            if can_send(out) {
                let head = seg.head(me, to).load(SeqCst);
                let free = cap - (head - seg.tail(me, to).load(SeqCst));
                let at = (head % cap) as usize;
                let n = (free as usize)
                    .min(out.len())
                    .min(seg.layout.ring_bytes - at)
                    .min(piece);
                // SAFETY: the free part of this member's ring to `to`, which `to` reads only
                // once the head below covers it.
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), seg.ring(me, to).add(at), n) };
                seg.head(me, to).store(head + n as u64, SeqCst);
                seg.ring_bell(to);
                out = &out[n..];
                moved = true;
            }
            if can_recv(into) {
                let tail = seg.tail(from, me).load(SeqCst);
                let filled = seg.head(from, me).load(SeqCst) - tail;
                let at = (tail % cap) as usize;
                let n = (filled as usize)
                    .min(into.len())
                    .min(seg.layout.ring_bytes - at);
                // SAFETY: the written part of `from`'s ring to this member, which `from`
                // writes again only once the tail below has passed it.
                unsafe {
                    std::ptr::copy_nonoverlapping(seg.ring(from, me).add(at), into.as_mut_ptr(), n)
                };
                seg.tail(from, me).store(tail + n as u64, SeqCst);
                seg.ring_bell(from);
                into = &mut std::mem::take(&mut into)[n..];
                moved = true;
            }
            if out.is_empty() && into.is_empty() {
                return Ok(());
            }
            if !moved {
                let (o, i) = (out, &*into);
                self.wait(
                    watch,
                    || can_send(o) || can_recv(i),
                    || {
                        let mut who = Vec::new();
                        if !i.is_empty() {
                            who.push(from);
                        }
                        if !o.is_empty() && to != from {
                            who.push(to);
                        }
                        who
                    },
                )
                .map_err(|stall| Failed { op, stall })?;
            }
        }
    }
}

/// The `j`-th window of `w` elements of `chunk`, empty once past its end.
fn window(chunk: &Range<usize>, j: usize, w: usize) -> Range<usize> {
    let start = (chunk.start + j * w).min(chunk.end);
    start..(start + w).min(chunk.end)
}

/// Why `stream`'s peer is gone, if it is: end of file or an error on a connection that carries
/// nothing once the group is on shared memory.
fn closed(stream: &TcpStream) -> Option<String> {
    match stream.peek(&mut [0u8; 1]) {
        Ok(0) => Some("it closed the connection".into()),
        Ok(_) => None,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => None,
        Err(e) => Some(e.to_string()),
    }
}
