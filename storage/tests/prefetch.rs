//! A load's read-ahead: a local directory's shard is read into the page cache ahead of the
//! reader, no further than its window, and what is read through it is what was written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marathon_storage::codec::Codec;
use marathon_storage::{CheckpointWriter, Piece, Reader, Store, TensorBox, WriterOptions};

const MIB: u64 = 1 << 20;
/// One tensor of 16 MiB in 1 MiB chunks, stored raw.
const ROWS: u64 = 64;
const COLS: u64 = 64 * 1024;

fn value(i: usize) -> f32 {
    (i as f32 * 0.001).sin()
}

/// Writes the checkpoint of step 1 under `root`; returns its shard file.
fn write(root: &Path) -> PathBuf {
    let store = Store::open(&root.display().to_string()).expect("open the store");
    let opts = WriterOptions {
        codec: Codec::Raw,
        chunk_bytes: MIB as usize,
        single_writer: true,
        ..WriterOptions::default()
    };
    let mut w = CheckpointWriter::new(store, 0, 1, opts).expect("a writer");
    let whole = TensorBox::whole(&[ROWS, COLS]);
    let piece = Piece {
        tensor: "t".into(),
        shape: vec![ROWS, COLS],
        region: whole,
    };
    w.snapshot(1, serde_json::json!({}), vec![piece], |buf| {
        buf.iter_mut().enumerate().for_each(|(i, v)| *v = value(i))
    });
    w.wait()
        .expect("a persist ran")
        .expect("the checkpoint persisted");
    let step = root.join(marathon_storage::format::step_dir(1));
    std::fs::read_dir(step)
        .expect("the step's directory")
        .map(|e| e.expect("an entry").path())
        .find(|p| p.to_string_lossy().contains("/shard-"))
        .expect("a shard file")
}

/// Bytes of `path` in the page cache.
fn resident(path: &Path) -> u64 {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).expect("open the shard");
    let len = file.metadata().expect("the shard's length").len() as usize;
    let page = 4096;
    // SAFETY: a private read-only mapping of a file this function holds open, unmapped below;
    // mincore only reports on it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
        let mut pages = vec![0u8; len.div_ceil(page)];
        assert_eq!(libc::mincore(addr, len, pages.as_mut_ptr()), 0);
        libc::munmap(addr, len);
        pages.iter().filter(|&&p| p & 1 == 1).count() as u64 * page as u64
    }
}

/// Waits up to 5 s for `ahead` to hold `at_least` bytes; returns what it holds.
fn wait_held(ahead: &marathon_storage::reader::Prefetch, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held = ahead.held();
        if held >= at_least || Instant::now() > deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cold_load_reads_ahead_within_its_window_around_the_page_cache() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory");
    let shard = write(dir.path());
    let reader =
        Reader::new(Store::open(&dir.path().display().to_string()).expect("open the store"));
    let m = reader.manifest(1).expect("step 1 committed");
    marathon_storage::direct::forget(&shard).expect("drop the shard from the cache");
    assert!(
        resident(&shard) < MIB,
        "{} stays in the page cache once dropped: this filesystem cannot show a cold read",
        shard.display()
    );
    let whole = TensorBox::whole(&[ROWS, COLS]);
    let ahead = reader.prefetch_within(&m, [("t", &whole)], 4 * MIB);
    // Read ahead before anything is taken, but no further than the window (and the request
    // under way when it filled).
    let early = wait_held(&ahead, 4 * MIB);
    std::thread::sleep(Duration::from_millis(100));
    let held = ahead.held();
    assert!(early >= 4 * MIB, "{early} bytes read ahead");
    assert!(held <= 5 * MIB, "{held} bytes read ahead of a 4 MiB window");
    // The first half taken, the read-ahead moves on to the rest.
    let half = TensorBox {
        offset: vec![0, 0],
        size: vec![ROWS / 2, COLS],
    };
    let mut first = vec![0f32; (ROWS / 2 * COLS) as usize];
    reader
        .read_box(&m, "t", &half, &mut first)
        .expect("read the first half");
    assert!(wait_held(&ahead, 4 * MIB) >= 4 * MIB);
    let rest = TensorBox {
        offset: vec![ROWS / 2, 0],
        size: vec![ROWS / 2, COLS],
    };
    let mut second = vec![0f32; (ROWS / 2 * COLS) as usize];
    reader
        .read_box(&m, "t", &rest, &mut second)
        .expect("read the second half");
    assert_eq!(ahead.held(), 0, "every chunk read ahead was taken");
    let all: Vec<f32> = first.into_iter().chain(second).collect();
    assert!(all.iter().enumerate().all(|(i, &v)| v == value(i)));
    // Read from the device, not through the page cache: a load does not fill it.
    assert!(
        resident(&shard) < MIB,
        "{} bytes cached by a cold load",
        resident(&shard)
    );
    // Off the read-ahead's order, and once it is dropped, chunks are read as asked.
    drop(ahead);
    let mut out = vec![0f32; (ROWS * COLS) as usize];
    reader
        .read_box(&m, "t", &whole, &mut out)
        .expect("read it all");
    assert!(out.iter().enumerate().all(|(i, &v)| v == value(i)));
}
