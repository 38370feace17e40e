//! Process groups over real TCP sockets on loopback: each collective against a reference
//! computed locally, and abort, timeout and a lost peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use marathon_elastic::InProcessCoordinator;
use marathon_runtime::comm::{chunk_range, GroupSpec, ProcessGroup};
use marathon_runtime::RuntimeError;

fn spec(name: &str, rank: usize, size: usize, timeout: Duration) -> GroupSpec {
    // Rendezvous keeps its own generous deadline: only operations are timed here.
    GroupSpec::loopback("test", name, rank, size, timeout)
}

/// Runs `f(group)` on `size` threads, one member each, and returns their results by rank.
fn on_group<T: Send + 'static>(
    name: &str,
    size: usize,
    timeout: Duration,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let coord = Arc::new(InProcessCoordinator::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let (coord, f, s) = (coord.clone(), f.clone(), spec(name, rank, size, timeout));
            std::thread::spawn(
                move || f(ProcessGroup::connect(&*coord, s).expect("join the group")),
            )
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
    for size in [2, 3, 4] {
        // The largest spans several socket calls per chunk.
        for len in [1, 5, 7, 1000, 4099, 3_300_001] {
            let total: Vec<f32> = (0..len)
                .map(|i| (0..size).map(|r| value(r, i)).sum())
                .collect();
            let results = on_group("c", size, Duration::from_secs(30), move |mut g| {
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
            });
            for (r, (all, rs, mine, gathered, b)) in results.into_iter().enumerate() {
                assert_eq!(all, total, "all-reduce, size {size}, len {len}, rank {r}");
                assert_eq!(mine, chunk_range(len, size, r));
                assert_eq!(
                    rs,
                    total[mine].to_vec(),
                    "reduce-scatter, size {size}, len {len}, rank {r}"
                );
                let want: Vec<f32> = (0..size)
                    .flat_map(|q| chunk_range(len, size, q).map(move |i| value(q, i)))
                    .collect();
                assert_eq!(
                    gathered, want,
                    "all-gather, size {size}, len {len}, rank {r}"
                );
                assert_eq!(
                    b,
                    input(9, len),
                    "broadcast, size {size}, len {len}, rank {r}"
                );
            }
        }
    }
}

#[test]
fn send_and_recv_carry_a_buffer_between_two_ranks() {
    let got = on_group("p2p", 3, Duration::from_secs(30), |mut g| {
        let mut buf = vec![0.0f32; 100_003];
        match g.rank() {
            0 => g.send(&input(0, buf.len()), 2).unwrap(),
            2 => g.recv(&mut buf, 0).unwrap(),
            _ => {}
        }
        buf
    });
    assert_eq!(got[2], input(0, 100_003));
}

#[test]
fn abort_fails_a_blocked_operation_at_once_and_every_later_one() {
    let timeout = Duration::from_secs(60);
    let results = on_group("abort", 2, timeout, move |mut g| {
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
    // It was blocked when the abort came (200 ms in), and returned well before the deadline.
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(
        waited < timeout / 2,
        "an abort must not wait for the deadline: {waited:?}"
    );
    assert!(matches!(later, RuntimeError::Aborted { .. }), "{later}");
}

#[test]
fn a_silent_peer_fails_the_operation_at_its_deadline() {
    let results = on_group("slow", 2, Duration::from_millis(300), |mut g| {
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

#[test]
fn a_peer_that_dies_mid_operation_is_reported_not_waited_for() {
    let timeout = Duration::from_secs(60);
    let results = on_group("dies", 3, timeout, move |mut g| {
        if g.rank() == 2 {
            // Dies after the group formed: its sockets close, as the kernel closes a dead
            // process's sockets.
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
    // The other survivor is told at once too: rank 0 aborts its failed group, which closes its
    // connections, rather than leaving rank 1 to wait for the deadline.
    let (e1, waited1) = survivors.next().flatten().unwrap();
    assert!(waited1 < timeout / 2, "{waited1:?}");
    assert!(matches!(e1, RuntimeError::PeerLost { .. }), "{e1}");
    assert!(
        e.to_string()
            .starts_with("reduce-scatter on group dies (rank 0): lost rank"),
        "{e}"
    );
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
    // Far larger than any socket buffer: plain send then recv on both sides would deadlock.
    let len = 4 << 20;
    let got = on_group("swap", 2, Duration::from_secs(60), move |mut g| {
        let (me, other) = (g.rank(), 1 - g.rank());
        let mut into = vec![0.0f32; len];
        g.send_recv(&input(me, len), other, &mut into, other)
            .unwrap();
        into
    });
    assert_eq!(got[0], input(1, len));
    assert_eq!(got[1], input(0, len));
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
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<marathon_runtime::Result<ProcessGroup>>,
) {
    let mut s = spec("guarded", 0, 2, Duration::from_secs(10));
    s.generation = 2;
    s.secret = secret.to_vec();
    s.rendezvous_timeout = timeout;
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
) -> marathon_runtime::Result<ProcessGroup> {
    let mut s = spec("guarded", 1, 2, Duration::from_secs(10));
    s.generation = generation;
    s.secret = secret.to_vec();
    s.rendezvous_timeout = Duration::from_secs(5);
    ProcessGroup::connect(coord, s)
}

/// A process that knows the job and group names but not the generation's secret cannot take a
/// member's place: both sides refuse it, the refusal is logged, and the real member joins.
#[test]
fn a_connection_without_the_secret_is_refused_and_the_member_joins() {
    let coord = Arc::new(InProcessCoordinator::new());
    let (_, zero) = lone_rank_zero(&coord, b"generation secret", Duration::from_secs(30));
    let e = rank_one(&coord, 2, b"a guess").expect_err("an impostor");
    assert!(e.to_string().contains("did not prove"), "{e}");
    let mut one = rank_one(&coord, 2, b"generation secret").expect("the member joins");
    let mut zero = zero.join().expect("rank 0").expect("rank 0's group");
    assert_eq!(zero.refused().len(), 1, "{:?}", zero.refused());
    assert!(
        zero.refused()[0].contains("claims rank 1"),
        "{:?}",
        zero.refused()
    );
    let h = std::thread::spawn(move || {
        let mut b = vec![1.0f32; 4];
        one.all_reduce(&mut b).map(|_| b)
    });
    let mut a = vec![2.0f32; 4];
    zero.all_reduce(&mut a).expect("all-reduce");
    assert_eq!(a, vec![3.0; 4]);
    assert_eq!(h.join().expect("rank 1").expect("all-reduce"), vec![3.0; 4]);
}

/// A member of the previous generation, reaching the new generation's listener through an
/// address it kept, is refused by both sides.
#[test]
fn a_member_of_the_previous_generation_is_refused() {
    let coord = Arc::new(InProcessCoordinator::new());
    let (addr, zero) = lone_rank_zero(&coord, b"secret of 2", Duration::from_secs(30));
    let mut old = spec("guarded", 0, 2, Duration::from_secs(10));
    old.generation = 1;
    marathon_elastic::Coordinator::put(&*coord, &old.key(0), addr.to_string().as_bytes())
        .expect("put");
    let e = rank_one(&coord, 1, b"secret of 1").expect_err("a stale member");
    assert!(e.to_string().contains("did not prove"), "{e}");
    rank_one(&coord, 2, b"secret of 2").expect("the member joins");
    let zero = zero.join().expect("rank 0").expect("rank 0's group");
    assert_eq!(zero.refused().len(), 1, "{:?}", zero.refused());
}

/// A connection that never says anything does not hold the rendezvous: greetings are read
/// concurrently, so the member that connects after it joins well inside a deadline shorter
/// than a greeting's own.
#[test]
fn a_silent_connection_does_not_delay_the_rendezvous() {
    let coord = Arc::new(InProcessCoordinator::new());
    let (addr, zero) = lone_rank_zero(&coord, b"s", Duration::from_secs(3));
    let silent = std::net::TcpStream::connect(addr).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    rank_one(&coord, 2, b"s").expect("the member joins");
    zero.join().expect("rank 0").expect("rank 0's group forms");
    drop(silent);
}
