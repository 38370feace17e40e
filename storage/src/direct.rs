//! A local file written around the page cache (`O_DIRECT`), for shards.
//!
//! A buffered write copies every byte into the page cache, and the kernel must find a free page
//! for each: with earlier checkpoints' files still cached, a 1.5 GB shard was written at 0.38
//! GB/s where the disk took 2.5 (docs/figures/bench-ckpt-c35ae58.txt). Written direct, the
//! bytes go from an aligned bounce buffer
//! to the device in large blocks, and the page cache keeps what training reads. Every block but
//! the last is whole; the last is padded to the block size and the file cut back to its length.
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

/// A file being written, direct where the filesystem allows.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// `None` once the file is written through the page cache.
    buf: Option<Aligned>,
    filled: usize,
    len: u64,
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
            file,
            buf,
            filled: 0,
            len: 0,
        })
    }

    /// Whether the file is being written around the page cache.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.buf.is_some()
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let Some(buf) = self.buf.as_mut() else {
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
                self.flush(BLOCK)?;
            }
        }
        Ok(())
    }

    /// Writes the first `n` bytes of the buffer (a multiple of [`ALIGN`]) at the file's length
    /// (by offset, so a write retried after a partial one lands in the same place) and empties
    /// the buffer.
    fn flush(&mut self, n: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let buf = self.buf.as_mut().expect("a direct file");
        match self.file.write_all_at(&buf.bytes()[..n], self.len) {
            Ok(()) => {}
            // Some filesystems open direct files but refuse their writes: on through the page
            // cache, at the same offset.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && self.len == 0 => {
                clear_direct(&self.file)?;
                self.file.write_all_at(&buf.bytes()[..n], self.len)?;
            }
            Err(e) => return Err(e),
        }
        self.len += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is buffered and cuts the file to its length; the caller syncs it.
    pub fn finish(mut self) -> std::io::Result<u64> {
        if self.filled > 0 {
            let filled = self.filled;
            let padded = filled.div_ceil(ALIGN) * ALIGN;
            let buf = self.buf.as_mut().expect("only a direct file buffers");
            buf.bytes()[filled..padded].fill(0);
            self.flush(padded)?;
            if padded != filled {
                self.file.set_len(self.len)?;
            }
        }
        Ok(self.len)
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
    buf.reserve(span + ALIGN);
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
