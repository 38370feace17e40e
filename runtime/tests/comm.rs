//! Process groups on both transports, TCP sockets on loopback and shared memory: each
//! collective against a reference computed locally, the two transports against each other bit
//! for bit, abort, timeout and a lost peer, members in separate processes, and the choice of
//! transport and its log line.

// The helpers unwrap as the tests do: an unexpected error is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marathon_elastic::{DirCoordinator, InProcessCoordinator};
use marathon_runtime::comm::{
    chunk_range, CommChoice, CommTransport, GroupSpec, ProcessGroup, TRANSPORT_ENV,
};
use marathon_runtime::RuntimeError;

/// Every test of an operation runs on both transports: what a member asks for, and what a
/// group of threads of this process gets.
const TRANSPORTS: [(CommChoice, CommTransport); 2] = [
    (CommChoice::Tcp, CommTransport::Tcp),
    (CommChoice::Auto, CommTransport::SharedMemory),
];

fn spec(name: &str, rank: usize, size: usize, timeout: Duration) -> GroupSpec {
    // Rendezvous keeps its own generous deadline: only operations are timed here.
    GroupSpec::loopback("test", name, rank, size, timeout)
}

/// Runs `f(group)` on `size` threads, one member each, each asking for `choice`, and returns
/// their results by rank. Every member checks it got `want`.
fn on_group<T: Send + 'static>(
    (choice, want): (CommChoice, CommTransport),
    name: &str,
    size: usize,
    timeout: Duration,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let coord = Arc::new(InProcessCoordinator::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let (coord, f) = (coord.clone(), f.clone());
            let mut s = spec(name, rank, size, timeout);
            s.transport = choice;
            std::thread::spawn(move || {
                let g = ProcessGroup::connect(&*coord, s).expect("join the group");
                assert_eq!(g.transport(), want, "rank {rank} of {size}");
                f(g)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("member thread"))
        .collect()
}

/// Integer-valued inputs, so sums are exact in any order and results compare bitwise.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

fn value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 101) as f32 - 50.0
}

#[test]
fn collectives_match_a_local_reference_for_sizes_that_do_not_divide() {
    for transport in TRANSPORTS {
        for size in [2, 3, 4, 8] {
            // The largest spans several socket calls per chunk, and several pieces of a shared
            // memory segment.
            for len in [1, 5, 7, 1000, 4099, 3_300_001] {
                check_collectives(transport, size, len);
            }
        }
    }
}

fn check_collectives(transport: (CommChoice, CommTransport), size: usize, len: usize) {
    let total: Vec<f32> = (0..len)
        .map(|i| (0..size).map(|r| value(r, i)).sum())
        .collect();
    let results = on_group(
        transport,
        "c",
        size,
        Duration::from_secs(30),
        move |mut g| {
            let r = g.rank();
            let mut all = input(r, len);
            g.all_reduce(&mut all).unwrap();
            let mut rs = input(r, len);
            let mine = g.reduce_scatter(&mut rs).unwrap();
            let mut gathered = vec![0.0; len];
            let own = chunk_range(len, size, r);
            gathered[own.clone()].copy_from_slice(&input(r, len)[own]);
            g.all_gather(&mut gathered).unwrap();
            let mut b = if r == 1 {
                input(9, len)
            } else {
                vec![0.0; len]
            };
            g.broadcast(&mut b, 1).unwrap();
            (all, rs[mine.clone()].to_vec(), mine, gathered, b)
        },
    );
    let on = transport.1;
    for (r, (all, rs, mine, gathered, b)) in results.into_iter().enumerate() {
        assert_eq!(
            all, total,
            "all-reduce on {on}, size {size}, len {len}, rank {r}"
        );
        assert_eq!(mine, chunk_range(len, size, r));
        assert_eq!(
            rs,
            total[mine].to_vec(),
            "reduce-scatter on {on}, size {size}, len {len}, rank {r}"
        );
        let want: Vec<f32> = (0..size)
            .flat_map(|q| chunk_range(len, size, q).map(move |i| value(q, i)))
            .collect();
        assert_eq!(
            gathered, want,
            "all-gather on {on}, size {size}, len {len}, rank {r}"
        );
        assert_eq!(
            b,
            input(9, len),
            "broadcast on {on}, size {size}, len {len}, rank {r}"
        );
    }
}

#[test]
fn send_and_recv_carry_a_buffer_between_two_ranks() {
    for transport in TRANSPORTS {
        let got = on_group(transport, "p2p", 3, Duration::from_secs(30), |mut g| {
            let mut buf = vec![0.0f32; 100_003];
            match g.rank() {
                0 => g.send(&input(0, buf.len()), 2).unwrap(),
                2 => g.recv(&mut buf, 0).unwrap(),
                _ => {}
            }
            buf
        });
        assert_eq!(got[2], input(0, 100_003), "{}", transport.1);
    }
}

#[test]
fn abort_fails_a_blocked_operation_at_once_and_every_later_one() {
    for transport in TRANSPORTS {
        let timeout = Duration::from_secs(60);
        let results = on_group(transport, "abort", 2, timeout, move |mut g| {
            if g.rank() == 1 {
                // Stays silent, holding its sockets open, until rank 0 is done.
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            let handle = g.abort_handle();
            let aborter = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                handle.abort();
            });
            let started = Instant::now();
            let first = g.recv(&mut [0.0f32; 16], 1).unwrap_err();
            let waited = started.elapsed();
            aborter.join().unwrap();
            let later = g.all_reduce(&mut [1.0f32; 4]).unwrap_err();
            Some((first, waited, later))
        });
        let (first, waited, later) = results.into_iter().next().flatten().unwrap();
        assert!(
            matches!(first, RuntimeError::Aborted { op: "recv", .. }),
            "{first}"
        );
        assert_eq!(first.to_string(), "recv on group abort (rank 0): aborted");
        // It was blocked when the abort came (200 ms in), and returned well before the
        // deadline.
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(
            waited < timeout / 2,
            "an abort must not wait for the deadline on {}: {waited:?}",
            transport.1
        );
        assert!(matches!(later, RuntimeError::Aborted { .. }), "{later}");
    }
}

/// An abort reaches a member waiting for the others inside a collective, as well as one waiting
/// for a message.
#[test]
fn abort_fails_a_collective_waiting_for_its_peers() {
    for transport in TRANSPORTS {
        let timeout = Duration::from_secs(60);
        let results = on_group(transport, "abort-all", 3, timeout, move |mut g| {
            if g.rank() != 0 {
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            let handle = g.abort_handle();
            let aborter = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                handle.abort();
            });
            let started = Instant::now();
            let e = g.all_reduce(&mut vec![1.0f32; 100_000]).unwrap_err();
            aborter.join().unwrap();
            Some((e, started.elapsed()))
        });
        let (e, waited) = results.into_iter().next().flatten().unwrap();
        assert!(matches!(e, RuntimeError::Aborted { .. }), "{e}");
        assert!(waited < timeout / 2, "{}: {waited:?}", transport.1);
    }
}

#[test]
fn a_silent_peer_fails_the_operation_at_its_deadline() {
    for transport in TRANSPORTS {
        let results = on_group(transport, "slow", 2, Duration::from_millis(300), |mut g| {
            if g.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            Some(g.all_reduce(&mut [1.0f32; 8]).unwrap_err())
        });
        let e = results.into_iter().next().flatten().unwrap();
        assert!(
            matches!(e, RuntimeError::CommTimeout { peer: 1, .. }),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("no progress from rank 1 within 300 ms"),
            "{e}"
        );
    }
}

#[test]
fn a_peer_that_dies_mid_operation_is_reported_not_waited_for() {
    for transport in TRANSPORTS {
        let timeout = Duration::from_secs(60);
        let results = on_group(transport, "dies", 3, timeout, move |mut g| {
            if g.rank() == 2 {
                // Dies after the group formed: its sockets close, as the kernel closes a dead
                // process's sockets, and on shared memory it leaves the segment.
                std::thread::sleep(Duration::from_millis(100));
                drop(g);
                return None;
            }
            let started = Instant::now();
            let e = g.all_reduce(&mut vec![1.0f32; 1 << 20]).unwrap_err();
            Some((e, started.elapsed()))
        });
        let mut survivors = results.into_iter();
        let (e, waited) = survivors.next().flatten().unwrap();
        assert!(waited < timeout / 2, "{waited:?}");
        assert!(matches!(e, RuntimeError::PeerLost { peer: 2, .. }), "{e}");
        // The other survivor is told at once too: rank 0 aborts its failed group, which closes
        // its connections, rather than leaving rank 1 to wait for the deadline.
        let (e1, waited1) = survivors.next().flatten().unwrap();
        assert!(waited1 < timeout / 2, "{waited1:?}");
        assert!(matches!(e1, RuntimeError::PeerLost { .. }), "{e1}");
        assert!(
            e.to_string()
                .starts_with("reduce-scatter on group dies (rank 0): lost rank"),
            "{e}"
        );
    }
}

/// A member that drops its group while its peer waits for a message from it: the peer is told,
/// on either transport, rather than waiting for the deadline; what it had sent before arrives.
#[test]
fn a_peer_that_leaves_between_messages_is_reported_after_what_it_sent() {
    for transport in TRANSPORTS {
        let timeout = Duration::from_secs(60);
        let results = on_group(transport, "leaves", 2, timeout, move |mut g| {
            if g.rank() == 1 {
                g.send(&input(1, 1000), 0).unwrap();
                drop(g);
                return None;
            }
            let mut first = vec![0.0f32; 1000];
            g.recv(&mut first, 1).unwrap();
            let started = Instant::now();
            let e = g.recv(&mut first, 1).unwrap_err();
            Some((first, e, started.elapsed()))
        });
        let (first, e, waited) = results.into_iter().next().flatten().unwrap();
        assert_eq!(first, input(1, 1000), "{}", transport.1);
        assert!(matches!(e, RuntimeError::PeerLost { peer: 1, .. }), "{e}");
        assert!(waited < timeout / 2, "{waited:?}");
    }
}

#[test]
fn rendezvous_names_the_members_that_never_came() {
    let coord = InProcessCoordinator::new();
    let mut s = spec("lonely", 0, 3, Duration::from_secs(60));
    s.rendezvous_timeout = Duration::from_millis(200);
    let e = ProcessGroup::connect(&coord, s).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rendezvous of group lonely (rank 0): ranks [1, 2] did not connect within 200 ms"
    );
}

#[test]
fn neighbours_can_send_to_each_other_at_once() {
    for transport in TRANSPORTS {
        // Far larger than any socket buffer or ring: plain send then recv on both sides would
        // deadlock.
        let len = 4 << 20;
        let got = on_group(
            transport,
            "swap",
            2,
            Duration::from_secs(60),
            move |mut g| {
                let (me, other) = (g.rank(), 1 - g.rank());
                let mut into = vec![0.0f32; len];
                g.send_recv(&input(me, len), other, &mut into, other)
                    .unwrap();
                into
            },
        );
        assert_eq!(got[0], input(1, len), "{}", transport.1);
        assert_eq!(got[1], input(0, len), "{}", transport.1);
    }
}

/// Values of every sign and of magnitudes 2^-12 to 2^12, drawn from `seed`: their sums round
/// differently in different orders, so equal bits mean the same order.
fn noisy(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            // SplitMix64.
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * 2f32
                .powi((z & 31) as i32 - 16)
                .max(2f32.powi(-12))
                .min(4096.0)
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// What each member ends with after every operation on `transport`, as bits.
type Outcome = Vec<(&'static str, Vec<u32>)>;

fn every_operation(
    transport: (CommChoice, CommTransport),
    size: usize,
    len: usize,
) -> Vec<Outcome> {
    on_group(
        transport,
        "bits",
        size,
        Duration::from_secs(60),
        move |mut g| {
            let r = g.rank();
            let mine = noisy(r as u64 + 1, len);
            let mut all = mine.clone();
            g.all_reduce(&mut all).unwrap();
            let mut rs = mine.clone();
            let own = g.reduce_scatter(&mut rs).unwrap();
            let mut gathered = mine.clone();
            g.all_gather(&mut gathered).unwrap();
            let mut b = mine.clone();
            g.broadcast(&mut b, size - 1).unwrap();
            let mut passed = vec![0.0f32; len];
            g.send_recv(&mine, (r + 1) % size, &mut passed, (r + size - 1) % size)
                .unwrap();
            vec![
                ("all-reduce", bits(&all)),
                ("reduce-scatter", bits(&rs[own])),
                ("all-gather", bits(&gathered)),
                ("broadcast", bits(&b)),
                ("send-recv", bits(&passed)),
            ]
        },
    )
}

/// Shared memory gives what TCP gives, bit for bit, for every operation: the trainer's
/// determinism and its equivalence with one process do not depend on where the ranks run.
#[test]
fn both_transports_give_the_same_bits_for_every_operation() {
    for size in [2, 3, 5, 8] {
        // The largest takes several pieces of the segment on every group size.
        for len in [1, 7, 1001, 1_300_007] {
            let tcp = every_operation(TRANSPORTS[0], size, len);
            let shm = every_operation(TRANSPORTS[1], size, len);
            for (r, (t, s)) in tcp.iter().zip(&shm).enumerate() {
                for ((op, t), (_, s)) in t.iter().zip(s) {
                    let first = t.iter().zip(s).position(|(a, b)| a != b);
                    assert!(
                        first.is_none() && t.len() == s.len(),
                        "{op}, size {size}, len {len}, rank {r}: first difference at {first:?}"
                    );
                }
            }
            // The order matters for these values: summed rank by rank, some element differs
            // from the ring's sum, so equal bits above say the order is the ring's.
            if size > 2 && len > 1000 {
                let inputs: Vec<Vec<f32>> = (0..size).map(|r| noisy(r as u64 + 1, len)).collect();
                let differs = (0..len).any(|i| {
                    let x = inputs.iter().fold(0.0f32, |acc, v| acc + v[i]);
                    x.to_bits() != tcp[0][0].1[i]
                });
                assert!(
                    differs,
                    "size {size}, len {len}: no element depends on the order"
                );
            }
        }
    }
}

/// A coordinator whose generation is aborted `after` it was made: its `check` fails from then.
struct AbortedAfter {
    inner: InProcessCoordinator,
    at: Instant,
}

impl marathon_elastic::Coordinator for AbortedAfter {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), marathon_elastic::ElasticError> {
        self.inner.put(key, value)
    }
    fn wait_get(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<Vec<u8>, marathon_elastic::ElasticError> {
        self.inner.wait_get(key, deadline)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, marathon_elastic::ElasticError> {
        self.inner.get(key)
    }
    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, marathon_elastic::ElasticError> {
        self.inner.transact(when, puts)
    }

    fn delete(&self, key: &str) -> Result<(), marathon_elastic::ElasticError> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, marathon_elastic::ElasticError> {
        self.inner.list(prefix)
    }
    fn check(&self) -> Result<(), marathon_elastic::ElasticError> {
        if Instant::now() < self.at {
            return Ok(());
        }
        Err(marathon_elastic::ElasticError::Unavailable {
            action: "rendezvous",
            key: String::new(),
            reason: "the generation was aborted".into(),
        })
    }
}

/// A lower rank whose published address cannot be reached (its node cut off): connecting to it
/// gives up as soon as the generation is aborted, not at the rendezvous deadline.
#[test]
fn connecting_to_an_unreachable_peer_ends_when_the_generation_is_aborted() {
    let mut s = spec("cutoff", 1, 2, Duration::from_secs(60));
    s.rendezvous_timeout = Duration::from_secs(30);
    // A listener that never accepts, its queue filled: a connection to it now hangs, as one to
    // a node whose packets are dropped does.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        queued.push(c);
        assert!(queued.len() < 100_000, "the listener's queue never filled");
    }
    let coord = AbortedAfter {
        inner: InProcessCoordinator::new(),
        at: Instant::now() + Duration::from_millis(300),
    };
    marathon_elastic::Coordinator::put(&coord, &s.key(0), addr.to_string().as_bytes()).unwrap();
    let started = Instant::now();
    let e = ProcessGroup::connect(&coord, s).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    assert!(e.to_string().contains("the generation was aborted"), "{e}");
}

/// Rank 0 of a two-member group with `secret`, rendezvousing on a thread until `timeout`; its
/// address, once published, and its group when it has formed.
fn lone_rank_zero(
    coord: &Arc<InProcessCoordinator>,
    secret: &[u8],
    timeout: Duration,
    transport: CommChoice,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<marathon_runtime::Result<ProcessGroup>>,
) {
    let mut s = spec("guarded", 0, 2, Duration::from_secs(10));
    s.generation = 2;
    s.secret = secret.to_vec();
    s.rendezvous_timeout = timeout;
    s.transport = transport;
    let key = s.key(0);
    let c = coord.clone();
    let zero = std::thread::spawn(move || ProcessGroup::connect(&*c, s));
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = marathon_elastic::Coordinator::wait_get(&**coord, &key, deadline)
        .expect("rank 0's address");
    (
        String::from_utf8(addr)
            .expect("text")
            .parse()
            .expect("an address"),
        zero,
    )
}

/// Rank 1 of the group `lone_rank_zero` leads, in `generation` with `secret`.
fn rank_one(
    coord: &InProcessCoordinator,
    generation: u64,
    secret: &[u8],
    transport: CommChoice,
) -> marathon_runtime::Result<ProcessGroup> {
    let mut s = spec("guarded", 1, 2, Duration::from_secs(10));
    s.generation = generation;
    s.secret = secret.to_vec();
    s.rendezvous_timeout = Duration::from_secs(5);
    s.transport = transport;
    ProcessGroup::connect(coord, s)
}

/// The connections `g` refused at rendezvous, once at least one is recorded: a refused
/// connection's handshake, on a thread of its own, may end after the group has formed.
fn refusals(g: &ProcessGroup) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.refused().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    g.refused()
}

/// A process that knows the job and group names but not the generation's secret cannot take a
/// member's place: both sides refuse it, the refusal is logged, and the real member joins.
#[test]
fn a_connection_without_the_secret_is_refused_and_the_member_joins() {
    for (choice, want) in TRANSPORTS {
        let coord = Arc::new(InProcessCoordinator::new());
        let secret = b"generation secret";
        let (_, zero) = lone_rank_zero(&coord, secret, Duration::from_secs(30), choice);
        let e = rank_one(&coord, 2, b"a guess", choice).expect_err("an impostor");
        assert!(e.to_string().contains("did not prove"), "{e}");
        let mut one = rank_one(&coord, 2, secret, choice).expect("the member joins");
        let mut zero = zero.join().expect("rank 0").expect("rank 0's group");
        let refused = refusals(&zero);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("claims rank 1"), "{refused:?}");
        assert_eq!((zero.transport(), one.transport()), (want, want));
        let h = std::thread::spawn(move || {
            let mut b = vec![1.0f32; 4];
            one.all_reduce(&mut b).map(|_| b)
        });
        let mut a = vec![2.0f32; 4];
        zero.all_reduce(&mut a).expect("all-reduce");
        assert_eq!(a, vec![3.0; 4]);
        assert_eq!(h.join().expect("rank 1").expect("all-reduce"), vec![3.0; 4]);
    }
}

/// A member of the previous generation, reaching the new generation's listener through an
/// address it kept, is refused by both sides.
#[test]
fn a_member_of_the_previous_generation_is_refused() {
    let coord = Arc::new(InProcessCoordinator::new());
    let (addr, zero) = lone_rank_zero(
        &coord,
        b"secret of 2",
        Duration::from_secs(30),
        CommChoice::Auto,
    );
    let mut old = spec("guarded", 0, 2, Duration::from_secs(10));
    old.generation = 1;
    marathon_elastic::Coordinator::put(&*coord, &old.key(0), addr.to_string().as_bytes())
        .expect("put");
    let e = rank_one(&coord, 1, b"secret of 1", CommChoice::Auto).expect_err("a stale member");
    assert!(e.to_string().contains("did not prove"), "{e}");
    rank_one(&coord, 2, b"secret of 2", CommChoice::Auto).expect("the member joins");
    let zero = zero.join().expect("rank 0").expect("rank 0's group");
    let refused = refusals(&zero);
    assert_eq!(refused.len(), 1, "{refused:?}");
}

/// A connection that never says anything does not hold the rendezvous: greetings are read
/// concurrently, so the member that connects after it joins well inside a deadline shorter
/// than a greeting's own.
#[test]
fn a_silent_connection_does_not_delay_the_rendezvous() {
    let coord = Arc::new(InProcessCoordinator::new());
    let (addr, zero) = lone_rank_zero(&coord, b"s", Duration::from_secs(3), CommChoice::Auto);
    let silent = std::net::TcpStream::connect(addr).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    rank_one(&coord, 2, b"s", CommChoice::Auto).expect("the member joins");
    zero.join().expect("rank 0").expect("rank 0's group forms");
    drop(silent);
}

/// Collects the messages of the events logged on this thread while `f` runs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    struct Capture(Arc<Mutex<Vec<String>>>);
    struct Message(String);
    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }
    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = tracing::subscriber::with_default(Capture(lines.clone()), f);
    let lines = lines.lock().unwrap().clone();
    (out, lines)
}

/// Forms a group of `asks.len()` members, member `r` asking for `asks[r]`, rank 0 on this
/// thread: every member's transport, and what rank 0 logged.
fn form(name: &str, asks: &[CommChoice]) -> (Vec<CommTransport>, Vec<String>) {
    let coord = Arc::new(InProcessCoordinator::new());
    let size = asks.len();
    let member = |rank: usize| {
        let mut s = spec(name, rank, size, Duration::from_secs(30));
        s.transport = asks[rank];
        s
    };
    let others: Vec<_> = (1..size)
        .map(|rank| {
            let (coord, s) = (coord.clone(), member(rank));
            std::thread::spawn(move || {
                let mut g = ProcessGroup::connect(&*coord, s).expect("join");
                // The group works whichever transport it chose.
                let mut x = vec![rank as f32; 3];
                g.all_reduce(&mut x).expect("all-reduce");
                assert_eq!(x, vec![(size * (size - 1) / 2) as f32; 3]);
                g.transport()
            })
        })
        .collect();
    let (zero, lines) = logged(|| {
        let mut g = ProcessGroup::connect(&*coord, member(0)).expect("join");
        let mut x = vec![0.0f32; 3];
        g.all_reduce(&mut x).expect("all-reduce");
        g.transport()
    });
    let mut got = vec![zero];
    got.extend(others.into_iter().map(|h| h.join().expect("member")));
    (got, lines)
}

/// Rank 0 logs the group's transport and why; one member asking for TCP makes the whole group
/// TCP, and the log names it.
#[test]
fn the_transport_is_chosen_per_group_and_logged_with_why() {
    use CommChoice::{Auto, Tcp};
    let (got, lines) = form("g-shm", &[Auto, Auto, Auto]);
    assert_eq!(got, vec![CommTransport::SharedMemory; 3]);
    let want = "group g-shm: collectives over shared memory across 3 ranks (every member on this \
                host)";
    assert!(lines.iter().any(|l| l == want), "{lines:?}");
    let (got, lines) = form("g-tcp", &[Auto, Tcp, Auto]);
    assert_eq!(got, vec![CommTransport::Tcp; 3]);
    let want = "group g-tcp: collectives over tcp across 3 ranks (rank 1 asks for it: its group \
                spec says tcp)";
    assert!(lines.iter().any(|l| l == want), "{lines:?}");
}

/// Where a group's segment is mapped in this process, by address: the lines of
/// /proc/self/maps that name marathon segments.
fn segment_mappings() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("/proc/self/maps")
        .lines()
        .filter(|l| l.contains("/dev/shm/marathon-"))
        .map(str::to_string)
        .collect()
}

/// The environment variable of a member in a child process: the coordinator's directory, its
/// rank, the group's size and what it does.
const CHILD_ENV: &str = "MARATHON_COMM_TEST_MEMBER";

/// Starts this test binary again as member `rank` of a group of `size`, running `test` in
/// child mode: `role` says what it does, `env` adds to its environment.
fn spawn_member(
    test: &str,
    dir: &std::path::Path,
    rank: usize,
    size: usize,
    role: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = std::process::Command::new(std::env::current_exe().expect("this test binary"));
    c.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{rank}|{size}|{role}", dir.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("start a member process")
}

/// Waits for a member process and checks it passed, showing its output if not.
fn passed(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().expect("wait for a member process");
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In a member process: joins the group its environment names and plays its role. Returns
/// false in the test's own process.
fn as_member() -> bool {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let parts: Vec<&str> = role.split('|').collect();
    let [dir, rank, size, role] = parts[..] else {
        panic!("{CHILD_ENV}={role:?}");
    };
    let (rank, size): (usize, usize) = (rank.parse().unwrap(), size.parse().unwrap());
    let coord = DirCoordinator::new(dir);
    let s = spec("procs", rank, size, Duration::from_secs(60));
    let joined = ProcessGroup::connect(&coord, s);
    match role {
        "collectives" => {
            let mut g = joined.expect("join");
            assert_eq!(g.transport(), CommTransport::SharedMemory);
            // Mapped, and already unlinked: nothing is left behind, whoever dies. (This
            // process has no other group, so every segment it maps is this one.)
            let maps = segment_mappings();
            assert!(!maps.is_empty(), "no segment mapped");
            assert!(maps.iter().all(|l| l.ends_with("(deleted)")), "{maps:?}");
            member_collectives(&mut g);
        }
        "tcp" => {
            let mut g = joined.expect("join");
            assert_eq!(g.transport(), CommTransport::Tcp);
            member_collectives(&mut g);
        }
        "refused" => {
            let e = joined.expect_err("a bad transport variable is refused");
            assert!(
                e.to_string()
                    .contains(&format!("{TRANSPORT_ENV}=\"carrier pigeon\"")),
                "{e}"
            );
        }
        "killed" => {
            let _g = joined.expect("join");
            // Waits to be killed, as a process that dies mid-step does.
            std::thread::sleep(Duration::from_secs(120));
            panic!("not killed");
        }
        "survivor" => {
            let mut g = joined.expect("join");
            let e = g.all_reduce(&mut vec![1.0f32; 1 << 20]).unwrap_err();
            assert!(matches!(e, RuntimeError::PeerLost { .. }), "{e}");
        }
        _ => panic!("unknown role {role}"),
    }
    true
}

/// Every collective and a ring of messages against the local reference, on a member `g` of a
/// group whose members all run it.
fn member_collectives(g: &mut ProcessGroup) {
    let (r, size, len) = (g.rank(), g.size(), 1_000_003);
    let total: Vec<f32> = (0..len)
        .map(|i| (0..size).map(|q| value(q, i)).sum())
        .collect();
    let mut all = input(r, len);
    g.all_reduce(&mut all).unwrap();
    assert_eq!(all, total, "all-reduce, rank {r}");
    let mut rs = input(r, len);
    let mine = g.reduce_scatter(&mut rs).unwrap();
    assert_eq!(rs[mine.clone()], total[mine], "reduce-scatter, rank {r}");
    let mut gathered = vec![0.0; len];
    let own = chunk_range(len, size, r);
    gathered[own.clone()].copy_from_slice(&input(r, len)[own]);
    g.all_gather(&mut gathered).unwrap();
    let want: Vec<f32> = (0..size)
        .flat_map(|q| chunk_range(len, size, q).map(move |i| value(q, i)))
        .collect();
    assert_eq!(gathered, want, "all-gather, rank {r}");
    let mut b = if r == 0 {
        input(9, len)
    } else {
        vec![0.0; len]
    };
    g.broadcast(&mut b, 0).unwrap();
    assert_eq!(b, input(9, len), "broadcast, rank {r}");
    let mut passed = vec![0.0f32; len];
    g.send_recv(
        &input(r, len),
        (r + 1) % size,
        &mut passed,
        (r + size - 1) % size,
    )
    .unwrap();
    assert_eq!(
        passed,
        input((r + size - 1) % size, len),
        "send-recv, rank {r}"
    );
}

/// Members in separate processes share one segment, which no name in /dev/shm outlives the
/// rendezvous: every collective matches the reference in each of them.
#[test]
fn members_in_separate_processes_share_memory() {
    if as_member() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test = "members_in_separate_processes_share_memory";
    let children: Vec<_> = (1..3)
        .map(|r| spawn_member(test, dir.path(), r, 3, "collectives", &[]))
        .collect();
    let s = spec("procs", 0, 3, Duration::from_secs(60));
    let mut g = ProcessGroup::connect(&DirCoordinator::new(dir.path()), s).expect("join");
    assert_eq!(g.transport(), CommTransport::SharedMemory);
    member_collectives(&mut g);
    for (r, c) in children.into_iter().enumerate() {
        passed(c, &format!("rank {}", r + 1));
    }
}

/// A member process killed mid-group (SIGKILL: it leaves nothing behind but closed sockets)
/// fails its peers' pending collective at once, not at the deadline.
#[test]
fn a_killed_member_process_fails_the_collective_at_once() {
    if as_member() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test = "a_killed_member_process_fails_the_collective_at_once";
    let survivor = spawn_member(test, dir.path(), 1, 3, "survivor", &[]);
    let mut doomed = spawn_member(test, dir.path(), 2, 3, "killed", &[]);
    let timeout = Duration::from_secs(60);
    let s = spec("procs", 0, 3, timeout);
    let mut g = ProcessGroup::connect(&DirCoordinator::new(dir.path()), s).expect("join");
    assert_eq!(g.transport(), CommTransport::SharedMemory);
    doomed.kill().expect("kill rank 2");
    doomed.wait().expect("reap rank 2");
    let started = Instant::now();
    let e = g.all_reduce(&mut vec![1.0f32; 1 << 20]).unwrap_err();
    assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
    assert!(matches!(e, RuntimeError::PeerLost { peer: 2, .. }), "{e}");
    passed(survivor, "rank 1");
}

/// `MARATHON_COMM_TRANSPORT=tcp` in one member's environment makes the group TCP; a value it
/// does not know is refused, naming the variable.
#[test]
fn the_environment_can_force_tcp() {
    if as_member() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test = "the_environment_can_force_tcp";
    let child = spawn_member(test, dir.path(), 1, 2, "tcp", &[(TRANSPORT_ENV, "tcp")]);
    let s = spec("procs", 0, 2, Duration::from_secs(60));
    let mut g = ProcessGroup::connect(&DirCoordinator::new(dir.path()), s).expect("join");
    assert_eq!(g.transport(), CommTransport::Tcp);
    member_collectives(&mut g);
    passed(child, "rank 1 with tcp");
    drop(g);
    let dir = tempfile::tempdir().unwrap();
    let bad = [(TRANSPORT_ENV, "carrier pigeon")];
    let child = spawn_member(test, dir.path(), 1, 2, "refused", &bad);
    let s = spec("procs", 0, 2, Duration::from_secs(60));
    let e = ProcessGroup::connect(&DirCoordinator::new(dir.path()), s).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("rendezvous of group procs (rank 0): transport negotiation with rank 1"),
        "{e}"
    );
    passed(child, "rank 1 with a bad variable");
}
