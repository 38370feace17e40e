//! Retention and garbage collection.
//!
//! Keep the last `keep_last` committed checkpoints, keep every `keep_every`-th step for good,
//! never delete the newest checkpoint that verifies, and collect the prefixes of checkpoints
//! that never committed once their newest object is older than a grace period (a prefix still
//! being written is younger than that).

use futures::TryStreamExt;
use object_store::ObjectMeta;

use crate::reader::Reader;
use crate::store::retry;
use crate::{runtime, Result, StorageError};

/// Which checkpoints to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest committed checkpoints kept (at least 1).
    pub keep_last: usize,
    /// Steps that are multiples of this are kept for good (0: none).
    pub keep_every: u64,
    /// Uncommitted prefixes younger than this are left alone.
    pub grace_ms: u64,
}

/// What a collection deleted, or would delete in a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Committed checkpoints removed by retention.
    pub expired: Vec<u64>,
    /// Uncommitted prefixes removed.
    pub abandoned: Vec<u64>,
    /// The newest checkpoint that verified, which is always kept.
    pub newest_verified: Option<u64>,
}

/// Applies `policy` under the reader's root at time `now_unix_ms`. `verify` decides whether a
/// committed checkpoint is sound (a full read, or a lighter check); the newest one it accepts is
/// never deleted. With `dry_run` nothing is deleted.
pub fn collect(
    reader: &Reader,
    policy: Retention,
    now_unix_ms: u64,
    dry_run: bool,
    mut verify: impl FnMut(u64) -> bool,
) -> Result<Collected> {
    let steps = reader.list()?;
    let committed: Vec<u64> = steps
        .iter()
        .filter(|s| s.committed)
        .map(|s| s.step)
        .collect();
    let newest_verified = committed.iter().rev().copied().find(|&s| verify(s));
    let keep_last = policy.keep_last.max(1);
    let recent = &committed[committed.len().saturating_sub(keep_last)..];
    let mut out = Collected {
        newest_verified,
        ..Collected::default()
    };
    for s in &steps {
        let keep = if s.committed {
            recent.contains(&s.step)
                || Some(s.step) == newest_verified
                || (policy.keep_every > 0 && s.step % policy.keep_every == 0)
        } else {
            // Newer than the newest commit may still be in flight; the grace period decides.
            now_unix_ms.saturating_sub(s.newest_unix_ms) < policy.grace_ms
        };
        if keep {
            continue;
        }
        if s.committed {
            out.expired.push(s.step);
        } else {
            out.abandoned.push(s.step);
        }
        if !dry_run {
            delete_step(reader, s.step, s.committed)?;
        }
    }
    Ok(out)
}

/// Deletes a checkpoint's objects, the manifest first, so that a deletion cut short leaves an
/// uncommitted prefix rather than a committed checkpoint with missing shards.
fn delete_step(reader: &Reader, step: u64, committed: bool) -> Result<()> {
    let store = &reader.store;
    runtime().block_on(async {
        // Transient failures are retried like every other request; an object already gone
        // (a retried delete whose first answer was lost) is no error.
        if committed {
            let manifest = store.path(&crate::format::manifest_name(step));
            match retry(|| store.inner.delete(&manifest)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StorageError::store("delete manifest", &manifest, e)),
            }
        }
        let prefix = store.path(&crate::format::step_dir(step));
        let objects: Vec<ObjectMeta> = retry(|| store.inner.list(Some(&prefix)).try_collect())
            .await
            .map_err(|e| StorageError::store("list", &prefix, e))?;
        for o in objects {
            match retry(|| store.inner.delete(&o.location)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StorageError::store("delete", &o.location, e)),
            }
        }
        Ok(())
    })
}
