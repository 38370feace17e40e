//! Retention and garbage collection.
//!
//! Keep the last `keep_last` committed checkpoints, keep every `keep_every`-th step for good,
//! never delete the newest checkpoint that verifies, and collect the prefixes of checkpoints
//! that never committed once their newest object is older than a grace period (a prefix still
//! being written is younger than that). In the newest committed checkpoints, shard objects
//! their manifest does not name (a second writer's of the same step) go once past the grace
//! period too.

use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};

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
    /// Shard objects in committed checkpoints that their manifest does not name, removed.
    pub orphans: Vec<String>,
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
    // The newest `keep_last` whose manifests read: a torn or unreadable manifest commits
    // nothing, so it neither counts among them nor is kept for good.
    let mut recent = Vec::new();
    let mut unsound = std::collections::BTreeSet::new();
    for &s in committed.iter().rev() {
        if recent.len() == keep_last {
            break;
        }
        match reader.manifest(s) {
            Ok(_) => recent.push(s),
            Err(_) => {
                unsound.insert(s);
            }
        }
    }
    let mut out = Collected {
        newest_verified,
        ..Collected::default()
    };
    for s in &steps {
        let committed = s.committed && !unsound.contains(&s.step);
        let keep = if committed {
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
        if committed {
            out.expired.push(s.step);
        } else {
            out.abandoned.push(s.step);
        }
        if !dry_run {
            delete_step(reader, s.step, s.committed)?;
        }
    }
    for &step in &recent {
        out.orphans
            .extend(collect_orphans(reader, step, policy, now_unix_ms, dry_run)?);
    }
    Ok(out)
}

/// Deletes the shard objects under committed `step` that its manifest does not name and that
/// are older than the grace period; returns their names.
fn collect_orphans(
    reader: &Reader,
    step: u64,
    policy: Retention,
    now_unix_ms: u64,
    dry_run: bool,
) -> Result<Vec<String>> {
    let manifest = match reader.manifest(step) {
        Ok(m) => m,
        // Damaged or gone meanwhile: verification and the next collection deal with it.
        Err(_) => return Ok(Vec::new()),
    };
    let named: std::collections::BTreeSet<&str> = manifest
        .tensors
        .iter()
        .flat_map(|t| &t.chunks)
        .map(|c| c.object.as_str())
        .collect();
    let store = &reader.store;
    runtime().block_on(async {
        let prefix = store.path(&crate::format::step_dir(step));
        let objects: Vec<ObjectMeta> = retry(|| store.inner.list(Some(&prefix)).try_collect())
            .await
            .map_err(|e| StorageError::store("list", &prefix, e))?;
        let mut gone = Vec::new();
        for o in objects {
            let Some(name) = o.location.as_ref().strip_prefix(store.prefix.as_ref()) else {
                continue;
            };
            let name = name.trim_start_matches('/');
            let age_ms = now_unix_ms.saturating_sub(o.last_modified.timestamp_millis() as u64);
            let shard = name
                .rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with("shard-r"));
            if !shard || named.contains(name) || age_ms < policy.grace_ms {
                continue;
            }
            if !dry_run {
                match retry(|| store.inner.delete(&o.location)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(StorageError::store("delete", &o.location, e)),
                }
            }
            gone.push(name.to_owned());
        }
        Ok(gone)
    })
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
