//! `marathon bench comm`: all-reduce bus bandwidth of the process groups, on shared memory and
//! on TCP, beside this machine's memcpy bandwidth.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, ValueEnum};
use marathon_runtime::comm::{CommChoice, CommTransport, GroupSpec, ProcessGroup};

use super::memcpy_seconds;

#[derive(Debug, Args)]
pub struct CommArgs {
    /// Group sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8])]
    ranks: Vec<usize>,
    /// Smallest message, in KiB.
    #[arg(long, default_value_t = 1)]
    min_kib: usize,
    /// Largest message, in MiB.
    #[arg(long, default_value_t = 256)]
    max_mib: usize,
    /// Transports to measure, each in its own group of the same ranks.
    #[arg(long, value_delimiter = ',', default_values_t = [Wire::Shm, Wire::Tcp])]
    transports: Vec<Wire>,
}

/// A transport as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Wire {
    /// Shared memory between the ranks of this host.
    Shm,
    /// TCP on loopback.
    Tcp,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Shm => "shm",
            Wire::Tcp => "tcp",
        }
    }

    fn choice(self) -> (CommChoice, CommTransport) {
        match self {
            Wire::Shm => (CommChoice::Auto, CommTransport::SharedMemory),
            Wire::Tcp => (CommChoice::Tcp, CommTransport::Tcp),
        }
    }
}

impl std::fmt::Display for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes each timed size moves at least, so small messages are timed over many operations.
const COMM_BYTES_PER_SIZE: usize = 256 << 20;
/// The most operations timed at one size.
const ITERS_MAX: usize = 1000;
/// Each size is timed this many times and the best kept, as for memcpy: on a shared machine a
/// round that another process interrupted says little about the transport.
const ROUNDS: usize = 3;

pub fn run(args: CommArgs) -> Result<()> {
    anyhow::ensure!(
        args.ranks.iter().all(|&p| p >= 2),
        "--ranks: every group needs at least 2 ranks"
    );
    anyhow::ensure!(
        args.min_kib >= 1 && args.min_kib * 1024 <= args.max_mib << 20,
        "--min-kib must be at least 1 and at most --max-mib"
    );
    anyhow::ensure!(
        !args.transports.is_empty(),
        "--transports: name at least one"
    );
    let mut sizes = Vec::new();
    let mut size = args.min_kib << 10;
    while size <= args.max_mib << 20 {
        sizes.push(size);
        size *= 4;
    }
    let largest = *sizes.last().expect("at least one size");
    let memcpy = largest as f64 / memcpy_seconds(largest, 5) / 1e9;
    println!("memcpy: {memcpy:.2} GB/s on {} MiB buffers", largest >> 20);
    println!(
        "all-reduce, one thread per rank, each transport in a group of its own, best of {ROUNDS} \
         rounds; bus bandwidth = bytes / time x 2 (p - 1) / p"
    );
    let mut header = format!("{:>6} {:>12}", "ranks", "bytes");
    for t in &args.transports {
        header += &format!(" {:>12} {:>10}", format!("{t} GB/s"), "of memcpy");
    }
    println!("{header}");
    for &p in &args.ranks {
        let mut measured = Vec::new();
        for &t in &args.transports {
            measured.push(allreduce_times(p, &sizes, t)?);
        }
        for (i, &bytes) in sizes.iter().enumerate() {
            let mut line = format!("{p:>6} {bytes:>12}");
            for (t, rows) in args.transports.iter().zip(&measured) {
                let (_, iters, secs) = rows[i];
                let busbw = bytes as f64 / secs * 2.0 * (p - 1) as f64 / p as f64 / 1e9;
                line += &format!(" {busbw:>12.3} {:>9.1}%", 100.0 * busbw / memcpy);
                let json = serde_json::json!({
                    "transport": t.name(),
                    "ranks": p,
                    "bytes": bytes,
                    "iters": iters,
                    "time_us": secs * 1e6,
                    "busbw_gbs": busbw,
                    "memcpy_gbs": memcpy,
                    "fraction_of_memcpy": busbw / memcpy,
                });
                eprintln!("{json}");
            }
            println!("{line}");
        }
    }
    Ok(())
}

/// Mean seconds per all-reduce of each size on a group of `p` threads on `wire`, in the best
/// of [`ROUNDS`] rounds: (bytes, operations per round, seconds).
fn allreduce_times(p: usize, sizes: &[usize], wire: Wire) -> Result<Vec<(usize, usize, f64)>> {
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let sizes = sizes.to_vec();
    let (choice, want) = wire.choice();
    let members: Vec<_> = (0..p)
        .map(|rank| {
            let (coord, sizes) = (coord.clone(), sizes.clone());
            std::thread::spawn(move || -> Result<Vec<[f64; ROUNDS]>> {
                let mut spec = GroupSpec::loopback(
                    "bench",
                    &format!("allreduce-{p}-{wire}"),
                    rank,
                    p,
                    Duration::from_secs(600),
                );
                spec.transport = choice;
                let mut g = ProcessGroup::connect(&*coord, spec)?;
                anyhow::ensure!(
                    g.transport() == want,
                    "a group of {p} asked for {wire} got {}",
                    g.transport()
                );
                let mut buf = vec![1.0f32; sizes.iter().max().copied().unwrap_or(0) / 4];
                let mut rows = Vec::new();
                for &bytes in &sizes {
                    let b = &mut buf[..bytes / 4];
                    let mut rounds = [0.0; ROUNDS];
                    for round in &mut rounds {
                        g.all_reduce(b)?; // warm-up, and lines the members up
                        let t0 = Instant::now();
                        for _ in 0..iters(bytes) {
                            g.all_reduce(b)?;
                        }
                        *round = t0.elapsed().as_secs_f64() / iters(bytes) as f64;
                    }
                    rows.push(rounds);
                }
                Ok(rows)
            })
        })
        .collect();
    let mut results = Vec::new();
    for m in members {
        results.push(
            m.join()
                .map_err(|_| anyhow::anyhow!("a benchmark rank panicked"))??,
        );
    }
    Ok(sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            // A round ends when its slowest member does; the best round counts.
            let best = (0..ROUNDS)
                .map(|k| results.iter().map(|r| r[i][k]).fold(0.0, f64::max))
                .fold(f64::INFINITY, f64::min);
            (bytes, iters(bytes), best)
        })
        .collect())
}

/// Operations timed per round for messages of `bytes`.
fn iters(bytes: usize) -> usize {
    (COMM_BYTES_PER_SIZE / bytes).clamp(2, ITERS_MAX)
}
