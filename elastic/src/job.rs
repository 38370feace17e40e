//! The keys of one job in the coordinator, and the writes that are fenced by generation.
//!
//! Everything of a job lives under `/marathon/<job>/`:
//!
//! | key | value |
//! |---|---|
//! | `nodes/<node>` | the node's slot count, under its lease |
//! | `leader` | the leading node's name, under its lease |
//! | `generation` | the running generation, in decimal |
//! | `gen-<g>/plan` | generation g's [`Plan`], as JSON, written with the counter |
//! | `gen-<g>/planned` | when and why generation g was planned, written with the counter |
//! | `gen-<g>/secret` | generation g's process-group secret, 32 random bytes in hex, written with the counter |
//! | `gen-<g>/committed` | the step generation g reached, its consumed-samples counter and its accounting |
//! | `gen-<g>/lost/<node>/<slot>` | a worker of generation g that died or hung, and when that was seen |
//! | `gen-<g>/retry/<node>/<slot>` | a live worker that left generation g on an error of its own |
//! | `gen-<g>/pg/...`, `gen-<g>/nccl/...` | the process groups' rendezvous |
//! | `checkpoints/<step>` | the commit of that step's checkpoint: its manifest's digest, writer and generation, created once, fenced, before the manifest is written |
//! | `stop` | an operator's request to end the job at the next step boundary (`marathon job stop`): who and when |
//! | `done` | the job's summary, once its last step is committed (or the step it stopped at) |
//!
//! A generation and its plan are written in one compare-and-swap on the counter; every later
//! write that matters (a step commit, the end of the job) is a transaction conditioned on the
//! counter still holding its generation, so a member of an older generation cannot write.

use crate::plan::{Plan, Slot};
use crate::{Coordinator, ElasticError};

/// The keys of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKeys {
    root: String,
}

/// What a key of the job is; see [`JobKeys::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKey {
    Node(String),
    Leader,
    Generation,
    Plan(u64),
    Planned(u64),
    Committed(u64),
    Lost {
        generation: u64,
        slot: Slot,
    },
    Retry {
        generation: u64,
        slot: Slot,
    },
    Checkpoint(u64),
    Stop,
    Done,
    /// A key this table does not name (rendezvous, for example).
    Other,
}

impl JobKeys {
    /// The keys of job `job`, whose name must be a path segment: no `/`.
    pub fn new(job: &str) -> Self {
        assert!(
            !job.is_empty() && !job.contains('/'),
            "a job name is one path segment"
        );
        JobKeys {
            root: format!("/marathon/{job}/"),
        }
    }

    /// `/marathon/<job>/`: every key of the job starts with it.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    pub fn generation(&self) -> String {
        format!("{}generation", self.root)
    }

    pub fn plan(&self, generation: u64) -> String {
        format!("{}gen-{generation}/plan", self.root)
    }

    pub fn planned(&self, generation: u64) -> String {
        format!("{}gen-{generation}/planned", self.root)
    }

    /// The secret with which generation g's process-group members prove their membership.
    pub fn secret(&self, generation: u64) -> String {
        format!("{}gen-{generation}/secret", self.root)
    }

    pub fn committed(&self, generation: u64) -> String {
        format!("{}gen-{generation}/committed", self.root)
    }

    pub fn lost(&self, generation: u64, slot: &Slot) -> String {
        format!(
            "{}gen-{generation}/lost/{}/{}",
            self.root, slot.node, slot.index
        )
    }

    pub fn retry(&self, generation: u64, slot: &Slot) -> String {
        format!(
            "{}gen-{generation}/retry/{}/{}",
            self.root, slot.node, slot.index
        )
    }

    pub fn checkpoint(&self, step: u64) -> String {
        format!("{}checkpoints/{step}", self.root)
    }

    pub fn done(&self) -> String {
        format!("{}done", self.root)
    }

    pub fn stop(&self) -> String {
        format!("{}stop", self.root)
    }

    /// What `key` is.
    pub fn parse(&self, key: &str) -> JobKey {
        let Some(rest) = key.strip_prefix(&self.root) else {
            return JobKey::Other;
        };
        if let Some(node) = rest.strip_prefix("nodes/") {
            return JobKey::Node(node.to_owned());
        }
        if let Some(step) = rest.strip_prefix("checkpoints/") {
            return step.parse().map_or(JobKey::Other, JobKey::Checkpoint);
        }
        match rest {
            "leader" => return JobKey::Leader,
            "generation" => return JobKey::Generation,
            "done" => return JobKey::Done,
            "stop" => return JobKey::Stop,
            _ => {}
        }
        let Some((g, what)) = rest
            .strip_prefix("gen-")
            .and_then(|r| r.split_once('/'))
            .and_then(|(g, w)| Some((g.parse::<u64>().ok()?, w)))
        else {
            return JobKey::Other;
        };
        match what {
            "plan" => JobKey::Plan(g),
            "planned" => JobKey::Planned(g),
            "committed" => JobKey::Committed(g),
            _ => {
                let slot = |rest: &str| {
                    let (node, index) = rest.rsplit_once('/')?;
                    Some(Slot {
                        node: node.to_owned(),
                        index: index.parse().ok()?,
                    })
                };
                if let Some(slot) = what.strip_prefix("lost/").and_then(slot) {
                    JobKey::Lost {
                        generation: g,
                        slot,
                    }
                } else if let Some(slot) = what.strip_prefix("retry/").and_then(slot) {
                    JobKey::Retry {
                        generation: g,
                        slot,
                    }
                } else {
                    JobKey::Other
                }
            }
        }
    }
}

/// The running generation, 0 before the first.
pub fn generation(coord: &dyn Coordinator, keys: &JobKeys) -> Result<u64, ElasticError> {
    let key = keys.generation();
    match coord.get(&key)? {
        None => Ok(0),
        Some(v) => parse_generation(&key, &v),
    }
}

/// Reads a generation counter's value (`key` names it in the error).
pub fn parse_generation(key: &str, v: &[u8]) -> Result<u64, ElasticError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ElasticError::Corrupt {
            key: key.to_owned(),
            reason: format!(
                "holds {:?}, not a generation number",
                String::from_utf8_lossy(v)
            ),
        })
}

/// The plan committed for `generation`, if any: every reader of a plan goes through this.
/// A plan that does not parse is an error naming its key, never taken for no plan.
pub fn plan(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    generation: u64,
) -> Result<Option<Plan>, ElasticError> {
    let key = keys.plan(generation);
    coord
        .get(&key)?
        .map(|json| {
            serde_json::from_slice(&json).map_err(|e| ElasticError::Corrupt {
                key,
                reason: format!("does not parse as a plan: {e}"),
            })
        })
        .transpose()
}

/// Commits `plan` as generation `to` if the counter still reads `from` (0: no generation yet),
/// with a fresh random group secret ([`JobKeys::secret`]) and `also` in the same transaction.
/// Returns whether it did; a proposal from an old generation loses.
pub fn propose(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    from: u64,
    to: u64,
    plan: &Plan,
    also: &[(&str, &[u8])],
) -> Result<bool, ElasticError> {
    let plan_json = serde_json::to_vec(plan).expect("plans serialise");
    let (plan_key, secret_key) = (keys.plan(to), keys.secret(to));
    let secret = fresh_secret()?;
    let mut writes: Vec<(&str, &[u8])> =
        vec![(&plan_key, &plan_json), (&secret_key, secret.as_bytes())];
    writes.extend_from_slice(also);
    let expected = from.to_string();
    coord.compare_and_swap(
        &keys.generation(),
        (from > 0).then_some(expected.as_bytes()),
        to.to_string().as_bytes(),
        &writes,
    )
}

/// 32 bytes from the operating system's random source, in hex.
fn fresh_secret() -> Result<String, ElasticError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ElasticError::Unavailable {
        action: "draw a group secret",
        key: String::new(),
        reason: e.to_string(),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes each of `writes` if generation `generation` is still the running one, all in one
/// transaction. Returns whether it did: `false` means a newer generation exists and the writer
/// is fenced.
pub fn fenced_put(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    generation: u64,
    writes: &[(&str, &[u8])],
) -> Result<bool, ElasticError> {
    let g = generation.to_string();
    coord.compare_and_swap(&keys.generation(), Some(g.as_bytes()), g.as_bytes(), writes)
}

/// What a checkpoint's commit record said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointRecord {
    /// The record is ours: the step's commit.
    Won,
    /// Another writer's record was there first (its value).
    Taken(Vec<u8>),
    /// A newer generation than the writer's runs: it may not commit.
    Fenced,
}

/// Creates the commit record of `step` with `value`, in one transaction that also checks that
/// `generation` still runs (0: an unfenced writer), unless a record of the step exists.
pub fn record_checkpoint(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    generation: u64,
    step: u64,
    value: &[u8],
) -> Result<CheckpointRecord, ElasticError> {
    let (key, counter, g) = (
        keys.checkpoint(step),
        keys.generation(),
        generation.to_string(),
    );
    let mut when: Vec<(&str, Option<&[u8]>)> = vec![(&key, None)];
    if generation > 0 {
        when.push((&counter, Some(g.as_bytes())));
    }
    if coord.transact(&when, &[(&key, value)])? {
        return Ok(CheckpointRecord::Won);
    }
    match coord.get(&key)? {
        Some(v) => Ok(CheckpointRecord::Taken(v)),
        None => Ok(CheckpointRecord::Fenced),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessCoordinator;

    #[test]
    fn keys_parse_back_to_what_they_name() {
        let k = JobKeys::new("j");
        let slot = Slot {
            node: "n-1".into(),
            index: 3,
        };
        for (key, want) in [
            (k.node("a"), JobKey::Node("a".into())),
            (k.leader(), JobKey::Leader),
            (k.generation(), JobKey::Generation),
            (k.plan(7), JobKey::Plan(7)),
            (k.planned(7), JobKey::Planned(7)),
            (k.committed(7), JobKey::Committed(7)),
            (
                k.lost(2, &slot),
                JobKey::Lost {
                    generation: 2,
                    slot: slot.clone(),
                },
            ),
            (
                k.retry(2, &slot),
                JobKey::Retry {
                    generation: 2,
                    slot: slot.clone(),
                },
            ),
            (k.checkpoint(40), JobKey::Checkpoint(40)),
            (k.done(), JobKey::Done),
            (k.stop(), JobKey::Stop),
            ("/marathon/j/gen-1/pg/dp-0/rank-0".into(), JobKey::Other),
            ("/marathon/other/leader".into(), JobKey::Other),
        ] {
            assert_eq!(k.parse(&key), want, "{key}");
        }
    }

    /// A plan of one replica and no slots: enough for what generations fence.
    fn one_replica() -> Plan {
        Plan {
            tp: 1,
            pp: 1,
            dp: 1,
            blocks: vec![],
            microbatches: vec![1],
            standby: vec![],
        }
    }

    #[test]
    fn writes_of_an_old_generation_are_fenced() {
        let (c, k) = (InProcessCoordinator::new(), JobKeys::new("j"));
        let plan = one_replica();
        assert_eq!(generation(&c, &k).unwrap(), 0);
        assert!(propose(&c, &k, 0, 1, &plan, &[]).unwrap());
        assert!(!propose(&c, &k, 0, 1, &plan, &[]).unwrap(), "second first");
        assert!(fenced_put(&c, &k, 1, &[(&k.committed(1), b"s1")]).unwrap());
        assert!(propose(&c, &k, 1, 2, &plan, &[]).unwrap());
        assert!(!fenced_put(&c, &k, 1, &[(&k.committed(1), b"late")]).unwrap());
        assert_eq!(c.get(&k.committed(1)).unwrap(), Some(b"s1".to_vec()));
        assert_eq!(generation(&c, &k).unwrap(), 2);
    }

    #[test]
    fn a_plan_or_generation_that_does_not_parse_is_an_error_naming_its_key() {
        let (c, k) = (InProcessCoordinator::new(), JobKeys::new("j"));
        assert_eq!(plan(&c, &k, 1).expect("read"), None);
        assert!(propose(&c, &k, 0, 1, &one_replica(), &[]).expect("plan"));
        assert_eq!(plan(&c, &k, 1).expect("read"), Some(one_replica()));
        c.put(&k.plan(2), b"{\"tp\": 1").expect("put");
        c.put(&k.generation(), b"two").expect("put");
        for e in [
            plan(&c, &k, 2).expect_err("a torn plan"),
            generation(&c, &k).expect_err("a word"),
        ] {
            assert!(matches!(e, ElasticError::Corrupt { .. }), "{e:?}");
            assert!(!e.is_retryable(), "{e}");
            assert!(e.to_string().contains("/marathon/j/"), "{e}");
        }
    }

    #[test]
    fn a_checkpoint_record_is_created_once_and_only_by_the_running_generation() {
        let (c, k) = (InProcessCoordinator::new(), JobKeys::new("j"));
        let plan = one_replica();
        assert!(propose(&c, &k, 0, 1, &plan, &[]).expect("plan"));
        let record = |g, v: &[u8]| record_checkpoint(&c, &k, g, 10, v).expect("record");
        assert_eq!(record(2, b"future"), CheckpointRecord::Fenced);
        assert_eq!(record(1, b"first"), CheckpointRecord::Won);
        assert_eq!(
            record(1, b"second"),
            CheckpointRecord::Taken(b"first".to_vec())
        );
        assert!(propose(&c, &k, 1, 2, &plan, &[]).expect("plan"));
        assert_eq!(
            record_checkpoint(&c, &k, 1, 11, b"late").expect("record"),
            CheckpointRecord::Fenced
        );
        assert_eq!(c.get(&k.checkpoint(11)).expect("get"), None);
        // An unfenced writer (generation 0) only needs the step to be free.
        assert_eq!(
            record_checkpoint(&c, &k, 0, 11, b"unfenced").expect("record"),
            CheckpointRecord::Won
        );
    }
}
