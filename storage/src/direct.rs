//! A local file written around the page cache (`O_DIRECT`), for shards.
//!
//! A buffered write copies every byte into the page cache, and the kernel must find a free page
//! for each: with earlier checkpoints' files still cached, a 1.5 GB shard was written at 0.38
//! GB/s where the disk took 2.5 (docs/figures/bench-ckpt-c35ae58.txt). Written direct, the
//! bytes go from aligned bounce buffers to the device in large blocks, and the page cache keeps
//! what training reads. One buffer fills while a thread of the file's own writes the other, so
//! the copies overlap the device: written on one thread, a shard took the copy's time plus the
//! disk's (0.81 s, 0.88x the disk's direct write, where it now takes 0.49 s, 1.21x:
//! docs/figures/bench-ckpt-vs-dcp-1f677f6.txt). Every block but the last is whole; the last is
//! padded to the block size and the file cut back to its length.
//! Where the filesystem refuses direct I/O (tmpfs, some network filesystems) the file is written
//! through the page cache as before.
//!
//! A chunk is read back ([`read_chunk`]) from the page cache when all of it is there, else
//! straight from the device in aligned blocks: on this machine kind a buffered cold read ran
//! anywhere from 0.5 to 2.5 s for the same 1.5 GB as the kernel found pages for it, a direct one
//! 0.85-0.9 s. A load reads its chunks ahead of it on a thread of its own
//! ([`crate::reader::Reader::prefetch`]).

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Alignment of buffer addresses, lengths and file offsets for direct I/O: the largest logical
/// block size in common use.
const ALIGN: usize = 4096;
/// Bytes per direct write.
const BLOCK: usize = 8 << 20;

/// A heap buffer aligned for direct I/O.
#[derive(Debug)]
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is owned memory with no shared state.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len, ALIGN).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Aligned { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes that this buffer owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A file being written, direct where the filesystem allows. Full blocks are written on a
/// thread of their own ([`Blocks`]) while the next one fills: the copy into the aligned buffer
/// (and the caller's checksums) overlap the device's writes instead of adding to them.
#[derive(Debug)]
pub struct DirectFile {
    file: Arc<File>,
    /// Whether the file is written around the page cache, through `buf`.
    direct: bool,
    /// The block being filled; `None` when the file is written through the page cache, or
    /// after a write of it failed.
    buf: Option<Aligned>,
    filled: usize,
    /// Bytes handed to writes so far: the file's length once they land.
    len: u64,
    /// The thread writing full blocks; started with the first one.
    blocks: Option<Blocks>,
    /// Aligned buffers made so far, at most [`BUFFERS`].
    buffers: usize,
}

/// Aligned buffers per direct file: one filling while one is written.
const BUFFERS: usize = 2;

/// A thread that writes each block it is sent at its offset and sends the buffer back.
#[derive(Debug)]
struct Blocks {
    /// A buffer, how many of its bytes to write, and where.
    send: SyncSender<(Aligned, usize, u64)>,
    back: Receiver<std::io::Result<Aligned>>,
    /// Buffers sent and not yet back.
    out: usize,
    thread: JoinHandle<()>,
}

impl Blocks {
    fn start(file: Arc<File>) -> Blocks {
        let (send, blocks) = sync_channel::<(Aligned, usize, u64)>(BUFFERS);
        let (done, back) = sync_channel(BUFFERS);
        let thread = std::thread::spawn(move || {
            for (mut buf, n, at) in blocks {
                let wrote = write_block(&file, &buf.bytes()[..n], at).map(|()| buf);
                if done.send(wrote).is_err() {
                    return;
                }
            }
        });
        Blocks {
            send,
            back,
            out: 0,
            thread,
        }
    }

    /// The next buffer written back, or the error its write met.
    fn back(&mut self) -> std::io::Result<Aligned> {
        let back = self.back.recv().map_err(|_| thread_gone())?;
        self.out -= 1;
        back
    }

    /// Waits for every write sent; the first error met, if any.
    fn finish(mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        while self.out > 0 {
            if let Err(e) = self.back() {
                first = first.and(Err(e));
            }
        }
        drop(self.send);
        self.thread.join().map_err(|_| thread_gone())?;
        first
    }
}

fn thread_gone() -> std::io::Error {
    std::io::Error::other("the thread writing a shard's blocks stopped")
}

/// Writes `bytes` at `at`. Some filesystems open direct files but refuse their writes: a first
/// write refused so goes on through the page cache, at the same offset, as do those after it.
fn write_block(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match file.write_all_at(bytes, at) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && at == 0 => {
            clear_direct(file)?;
            file.write_all_at(bytes, at)
        }
        wrote => wrote,
    }
}

impl DirectFile {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<DirectFile> {
        Self::open(path, true)
    }

    /// Creates (or truncates) `path`, direct if `direct` and the filesystem allows.
    fn open(path: &Path, direct: bool) -> std::io::Result<DirectFile> {
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, buf) = match open(if direct { libc::O_DIRECT } else { 0 }) {
            Ok(f) if !direct => (f, None),
            Ok(f) => (f, Some(Aligned::new(BLOCK))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, None),
            Err(e) => return Err(e),
        };
        Ok(DirectFile {
            file: Arc::new(file),
            direct: buf.is_some(),
            buffers: usize::from(buf.is_some()),
            buf,
            filled: 0,
            len: 0,
            blocks: None,
        })
    }

    /// Whether the file is being written around the page cache.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let Some(buf) = self.buf.as_mut() else {
                if self.direct {
                    return Err(std::io::Error::other(
                        "an earlier write of this file failed; it is written no more",
                    ));
                }
                use std::os::unix::fs::FileExt;
                self.file.write_all_at(bytes, self.len)?;
                self.len += bytes.len() as u64;
                return Ok(());
            };
            let n = (BLOCK - self.filled).min(bytes.len());
            buf.bytes()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.send(BLOCK)?;
                let blocks = self.blocks.as_mut().expect("started by the send");
                self.buf = Some(if self.buffers < BUFFERS {
                    self.buffers += 1;
                    Aligned::new(BLOCK)
                } else {
                    blocks.back()?
                });
            }
        }
        Ok(())
    }

    /// Sends the first `n` bytes of the block being filled (a multiple of [`ALIGN`]) to be
    /// written at the file's length (by offset, so a write retried after a partial one lands in
    /// the same place).
    fn send(&mut self, n: usize) -> std::io::Result<()> {
        let buf = self.buf.take().expect("a direct file");
        let file = &self.file;
        let blocks = self
            .blocks
            .get_or_insert_with(|| Blocks::start(file.clone()));
        blocks
            .send
            .send((buf, n, self.len))
            .map_err(|_| thread_gone())?;
        blocks.out += 1;
        self.len += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is buffered, waits for every write, and cuts the file to its length; the
    /// caller syncs it.
    pub fn finish(mut self) -> std::io::Result<u64> {
        let filled = self.filled;
        let padded = filled.div_ceil(ALIGN) * ALIGN;
        if filled > 0 {
            let buf = self.buf.as_mut().expect("only a direct file buffers");
            buf.bytes()[filled..padded].fill(0);
            match self.blocks {
                Some(_) => self.send(padded)?,
                // A file of one block is written here, with no thread.
                None => {
                    write_block(&self.file, &buf.bytes()[..padded], self.len)?;
                    self.len += filled as u64;
                }
            }
        }
        if let Some(blocks) = self.blocks.take() {
            blocks.finish()?;
        }
        if padded != filled {
            self.file.set_len(self.len)?;
        }
        Ok(self.len)
    }
}

impl Drop for DirectFile {
    /// A file dropped unfinished (its persist failed) is written no more once this returns.
    fn drop(&mut self) {
        if let Some(blocks) = self.blocks.take() {
            let _ = blocks.finish();
        }
    }
}

/// Reads the `len` bytes of `path` from `offset` into `buf` (its capacity reused from chunk to
/// chunk) and returns where in `buf` they start. From the page cache when every byte is there
/// (a warm load); else straight from the device in aligned blocks around the page cache, so a
/// cold load neither waits for the cache to find pages nor fills it. Where the filesystem
/// refuses direct I/O, through the page cache.
pub fn read_chunk(
    path: &Path,
    offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    buf.clear();
    let cached = File::open(path)?;
    if resident(&cached, offset, len) {
        read_cached(&cached, offset, len, buf)?;
        return Ok(0);
    }
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let file = match direct {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            read_cached(&cached, offset, len, buf)?;
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let start = offset / ALIGN as u64 * ALIGN as u64;
    let skip = (offset - start) as usize;
    let span = (skip + len).div_ceil(ALIGN) * ALIGN;
    // Exactly: a load's read-ahead holds buffers by their capacity.
    buf.reserve_exact(span + ALIGN);
    let base = buf.as_mut_ptr();
    let lead = base.align_offset(ALIGN);
    let mut got = 0;
    while got < skip + len {
        // SAFETY: `lead + span` bytes fit in the capacity reserved above, and the target is
        // aligned for direct I/O.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                base.add(lead + got).cast(),
                span - got,
                (start + got as u64) as i64,
            )
        };
        match n {
            0 => break, // the end of the file
            n if n > 0 => {
                got += n as usize;
                // A read that ends off a block boundary ended at the end of the file.
                if got % ALIGN != 0 {
                    break;
                }
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    if got < skip + len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "{} ends at {} bytes, inside the range {offset}..{}",
                path.display(),
                start + got as u64,
                offset + len as u64
            ),
        ));
    }
    // SAFETY: the `lead` bytes before the aligned start are written here, the rest up to
    // `lead + skip + len` by the reads above.
    unsafe {
        std::ptr::write_bytes(base, 0, lead);
        buf.set_len(lead + skip + len);
    }
    Ok(lead + skip)
}

/// Whether every page of `len` bytes of `file` from `offset` is in the page cache. Asking does
/// not read anything (a non-blocking read would start readahead of what is missing).
fn resident(file: &File, offset: u64, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let start = offset / ALIGN as u64 * ALIGN as u64;
    let span = (offset - start) as usize + len;
    // SAFETY: a read-only mapping of a file this function holds open, unmapped below; mincore
    // only reports on it, and nothing touches the mapped pages.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as i64,
        );
        if addr == libc::MAP_FAILED {
            return false;
        }
        let mut pages = vec![0u8; span.div_ceil(ALIGN)];
        let ok = libc::mincore(addr, span, pages.as_mut_ptr()) == 0;
        libc::munmap(addr, span);
        ok && pages.iter().all(|p| p & 1 == 1)
    }
}

/// `len` bytes of `file` from `offset` through the page cache, into `buf`.
fn read_cached(file: &File, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    buf.clear();
    buf.reserve_exact(len);
    // Into the vector's spare capacity: nothing is zeroed first.
    file.take(len as u64).read_to_end(buf)?;
    if buf.len() < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "the file ends at {} bytes, inside the range {offset}..{}",
                offset + buf.len() as u64,
                offset + len as u64
            ),
        ));
    }
    Ok(())
}

/// Drops `path`'s pages from the page cache, so that the next read of it comes from the device
/// (what a cold read is timed after).
pub fn forget(path: &Path) -> std::io::Result<()> {
    advise(path, &[(0, 0)], libc::POSIX_FADV_DONTNEED)
}

fn advise(path: &Path, ranges: &[(u64, u64)], advice: i32) -> std::io::Result<()> {
    let file = File::open(path)?;
    for &(offset, len) in ranges {
        // SAFETY: fadvise on a descriptor this function owns, with no pointers passed.
        let rc =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Turns direct I/O off for `file`.
fn clear_direct(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns, with no pointers passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_file_holds_exactly_what_was_written_at_any_length() {
        let dir = tempfile::tempdir().unwrap();
        // Lengths around the block and the alignment, written in uneven pieces.
        for len in [
            0,
            1,
            4095,
            4096,
            4097,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            2 * BLOCK + 12_345,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            let mut f = DirectFile::create(&path).unwrap();
            // This machine's filesystems take direct I/O: the page cache is not in the way.
            assert!(f.is_direct(), "{} refused O_DIRECT", dir.path().display());
            for piece in data.chunks(1_000_003) {
                f.write_all(piece).unwrap();
            }
            assert_eq!(f.finish().unwrap(), len as u64);
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
            // Any range reads back, aligned or not, cold (from the device) and warm (from the
            // page cache); one past the end is refused.
            for warm in [false, true] {
                if warm {
                    std::fs::read(&path).unwrap();
                } else {
                    forget(&path).unwrap();
                }
                for (offset, n) in [
                    (0, len),
                    (len / 3, len / 2),
                    (len.saturating_sub(1), len.min(1)),
                ] {
                    let mut buf = vec![1, 2, 3];
                    let at = read_chunk(&path, offset as u64, n, &mut buf).unwrap();
                    assert_eq!(
                        &buf[at..at + n],
                        &data[offset..offset + n],
                        "{offset}+{n} of {len}, warm {warm}"
                    );
                }
                let past = read_chunk(&path, len as u64, 1, &mut Vec::new()).unwrap_err();
                assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof, "{past}");
            }
        }
    }

    /// A block whose write fails on the writing thread fails the file: a later `write_all` or
    /// `finish` returns the device's error, and nothing is written after it.
    #[test]
    fn a_block_write_that_fails_fails_the_file() {
        const CHILD: &str = "MARATHON_DIRECT_FSIZE_CHILD";
        const NAME: &str = "direct::tests::a_block_write_that_fails_fails_the_file";
        let Some(dir) = std::env::var_os(CHILD) else {
            // The file size limit is the process's: it is set in a process of its own.
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
                .env(CHILD, dir.path())
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.contains("1 passed"), "{said}");
            return;
        };
        // Files may grow to two blocks and a half; a write past that fails with EFBIG.
        let limit = libc::rlimit {
            rlim_cur: (2 * BLOCK + BLOCK / 2) as libc::rlim_t,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: ignoring a signal and lowering a limit of this process pass no pointers that
        // outlive the calls.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        let block = vec![7u8; BLOCK];
        // Failed while blocks are still being written, and failed by the last block.
        for (name, whole, tail) in [("in-write", 5, 0), ("in-finish", 2, 5 << 20)] {
            let path = Path::new(&dir).join(name);
            let mut f = DirectFile::create(&path).unwrap();
            assert!(f.is_direct());
            let failed = (0..whole).find_map(|_| f.write_all(&block).err());
            let err = match failed {
                Some(e) => {
                    let again = f.write_all(&block).unwrap_err();
                    assert!(again.to_string().contains("written no more"), "{again}");
                    e
                }
                None => {
                    assert_eq!(name, "in-finish", "5 blocks were written past the limit");
                    f.write_all(&block[..tail]).unwrap();
                    f.finish().unwrap_err()
                }
            };
            assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{name}: {err}");
            assert!(std::fs::metadata(&path).unwrap().len() <= limit.rlim_cur);
        }
    }

    #[test]
    fn a_file_written_through_the_cache_or_turned_so_midway_holds_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * BLOCK + 777).map(|i| (i % 251) as u8).collect();
        // Through the page cache from the start, as where direct I/O is refused.
        let path = dir.path().join("cached");
        let mut f = DirectFile::open(&path, false).unwrap();
        assert!(!f.is_direct());
        f.write_all(&data).unwrap();
        assert_eq!(f.finish().unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // Direct for a block, then through the cache from an aligned offset.
        let path = dir.path().join("turned");
        let mut f = DirectFile::create(&path).unwrap();
        f.write_all(&data[..BLOCK + 5]).unwrap();
        clear_direct(&f.file).unwrap();
        f.write_all(&data[BLOCK + 5..]).unwrap();
        f.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
