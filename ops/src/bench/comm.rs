//! `marathon bench comm`: all-reduce bus bandwidth of the TCP process groups beside this
//! machine's memcpy bandwidth.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use marathon_runtime::comm::{GroupSpec, ProcessGroup};

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
}

/// Bytes each timed size moves at least, so small messages are timed over many operations.
const COMM_BYTES_PER_SIZE: usize = 256 << 20;

pub fn run(args: CommArgs) -> Result<()> {
    anyhow::ensure!(
        args.ranks.iter().all(|&p| p >= 2),
        "--ranks: every group needs at least 2 ranks"
    );
    anyhow::ensure!(
        args.min_kib >= 1 && args.min_kib * 1024 <= args.max_mib << 20,
        "--min-kib must be at least 1 and at most --max-mib"
    );
    let mut sizes = Vec::new();
    let mut size = args.min_kib << 10;
    while size <= args.max_mib << 20 {
        sizes.push(size);
        size *= 4;
    }
    let largest = *sizes.last().expect("at least one size");
    let memcpy = largest as f64 / memcpy_seconds(largest, 5) / 1e9;
    println!(
        "memcpy: {memcpy:.2} GB/s on {} MiB buffers",
        sizes.last().copied().unwrap_or(0) >> 20
    );
    println!("all-reduce over TCP on loopback, one thread per rank; bus bandwidth = bytes / time x 2 (p - 1) / p");
    println!(
        "{:>6} {:>12} {:>8} {:>12} {:>12} {:>10}",
        "ranks", "bytes", "iters", "time (us)", "busbw GB/s", "of memcpy"
    );
    for &p in &args.ranks {
        for row in allreduce_times(p, &sizes)? {
            let (bytes, iters, secs) = row;
            let busbw = bytes as f64 / secs * 2.0 * (p - 1) as f64 / p as f64 / 1e9;
            println!(
                "{p:>6} {bytes:>12} {iters:>8} {:>12.1} {busbw:>12.3} {:>9.1}%",
                secs * 1e6,
                100.0 * busbw / memcpy
            );
            let line = serde_json::json!({"ranks": p, "bytes": bytes, "iters": iters, "time_us": secs * 1e6, "busbw_gbs": busbw, "memcpy_gbs": memcpy, "fraction_of_memcpy": busbw / memcpy});
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// Mean seconds per all-reduce of each size on a group of `p` threads over loopback TCP.
fn allreduce_times(p: usize, sizes: &[usize]) -> Result<Vec<(usize, usize, f64)>> {
    let coord = std::sync::Arc::new(marathon_elastic::InProcessCoordinator::new());
    let sizes = sizes.to_vec();
    let members: Vec<_> = (0..p)
        .map(|rank| {
            let (coord, sizes) = (coord.clone(), sizes.clone());
            std::thread::spawn(move || -> Result<Vec<(usize, usize, f64)>> {
                let spec = GroupSpec::loopback(
                    "bench",
                    &format!("allreduce-{p}"),
                    rank,
                    p,
                    Duration::from_secs(600),
                );
                let mut g = ProcessGroup::connect(&*coord, spec)?;
                let mut buf = vec![1.0f32; sizes.iter().max().copied().unwrap_or(0) / 4];
                let mut rows = Vec::new();
                for &bytes in &sizes {
                    let iters = (COMM_BYTES_PER_SIZE / bytes).clamp(2, 200);
                    let b = &mut buf[..bytes / 4];
                    g.all_reduce(b)?; // warm-up, and lines the members up
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        g.all_reduce(b)?;
                    }
                    rows.push((bytes, iters, t0.elapsed().as_secs_f64() / iters as f64));
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
    // A collective ends when its slowest member does.
    let mut rows = results[0].clone();
    for r in &results[1..] {
        for (row, other) in rows.iter_mut().zip(r) {
            row.2 = row.2.max(other.2);
        }
    }
    Ok(rows)
}
