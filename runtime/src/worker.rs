//! An elastic worker: one slot of a node, carried through the job's generations by its agent
//! (`crate::agent`) without restarting.
//!
//! The agent speaks to the worker in JSON lines on the worker's stdin ([`ToWorker`]) and hears
//! back on its stdout ([`FromWorker`]). A generation starts with its plan: the worker finds its
//! place (replica, stage, tensor rank), joins the generation's process groups, and then
//! - on its first generation, builds its trainer: from the newest checkpoint when some stage
//!   has no live copy (the start of a job, or the last resort), else with no state at all,
//!   to be filled by a peer;
//! - on a later one, keeps its trainer and its memory (`Trainer::regroup`), reloading from
//!   storage only when some stage has no live copy left.
//!
//! Every rank then calls `Trainer::reconcile`, which copies the state of the most advanced
//! replica of each shard to the others: a joining replica receives its state from a healthy one
//! over the process groups, never from storage. Rank 0 commits each step, with the consumed
//! samples counter, in a transaction fenced by the generation ([`StepCommit`]); a refused
//! commit means a newer generation exists, and the worker stops and waits for it.
//!
//! A generation ends three ways. An abort from the agent (a member died or hung) fails the
//! step in flight at once; its partial work is dropped. A newer plan that only grows the job
//! raises the trainer's stop signal, and every rank stops after the same step, with the step
//! applied. The last step ends the job: rank 0 writes the job's summary fenced, and the agent
//! stops its workers.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use marathon_elastic::pace::{Pace, StragglerRule};
use marathon_elastic::plan::{Plan, Slot, StateSource};
use marathon_elastic::{job, retrying, Coordinator, ElasticError, JobKey, JobKeys};
use marathon_model::Place;
use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointRecord;
use crate::comm::{AbortHandle, GroupSpec};
use crate::config::TrainConfig;
use crate::error::{Result, RuntimeError};
use crate::groups::Groups;
use crate::records::{goodput, unix_ms, FlaggedStraggler, Goodput, Records, StepCommit, Summary};
use crate::trainer::{Observer, Trainer};

/// What an agent tells its worker, one JSON object per line on the worker's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    /// Run generation `generation` of `plan` as `slot`.
    Start {
        generation: u64,
        plan: Plan,
        slot: Slot,
    },
    /// Abort generation `generation`'s collectives now: one of its members is gone.
    Abort { generation: u64 },
    /// End the job at the next step boundary that every rank agrees on, after a final
    /// checkpoint (`marathon job stop`).
    Finish,
    /// Exit.
    Stop,
}

/// What a worker tells its agent, one JSON object per line on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FromWorker {
    /// The worker joined generation `generation`'s groups and reconciled: it continues from
    /// `step`. `reloaded` is the checkpoint step it loaded from storage, if it did (0: none
    /// existed, so from initialisation).
    Started {
        generation: u64,
        /// Where the worker's rank sits in the generation's layout.
        place: Place,
        step: u64,
        reloaded: Option<u64>,
        groups_ms: f64,
        reconcile_ms: f64,
        /// `Trainer::state_digest` after reconciling: every replica of a shard shows the same.
        digest: u64,
        /// Bytes of checkpoint data this process has read from storage since it started.
        #[serde(default)]
        storage_read_bytes: u64,
    },
    /// A step completed.
    Step {
        generation: u64,
        step: u64,
        loss: f32,
        step_ms: f64,
    },
    /// The generation ended before the job did. `retry`: on an error of the worker's own (a
    /// broken coordinator connection, a peer gone), not on an abort or a newer generation, so
    /// the same members should start over.
    Interrupted {
        generation: u64,
        step: u64,
        reason: String,
        retry: bool,
        /// The error says a peer is gone or silent (a lost connection, a collective's
        /// deadline); its agent or lease normally reports that, but a partition between live
        /// nodes is reported by nobody.
        peer: bool,
    },
    /// The job reached its last step.
    Finished { generation: u64 },
    /// The process is alive; sent every `WorkerOptions::heartbeat` by a thread of its own, so
    /// a worker blocked in a collective still sends it and a stopped or wedged process does
    /// not.
    Alive,
}

/// What the worker needs besides its configuration.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub job: String,
    /// Deadline of every collective, and of a generation's rendezvous.
    pub group_timeout: Duration,
    /// How often the worker tells its agent it is alive.
    pub heartbeat: Duration,
    /// The address of this node that the other nodes' workers reach it on.
    pub host: std::net::IpAddr,
    /// Live metrics for Prometheus, when the worker serves them.
    pub metrics: Option<Arc<crate::metrics::RankMetrics>>,
}

/// How long a worker keeps retrying an etcd read before it gives up.
const OUTAGE_MAX: Duration = Duration::from_secs(30);

/// The exit status of a worker whose agent went away (its stdin closed).
pub const EXIT_AGENT_GONE: i32 = 4;

/// What the control thread and the training thread share.
#[derive(Debug, Default)]
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// The trainer's stop signal: a newer generation is waiting.
    newer: Arc<AtomicBool>,
    /// The trainer's finish signal: the job was asked to end (`marathon job stop`).
    finish: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct ControlState {
    next: Option<(u64, Plan, Slot, u64)>,
    stop: bool,
    /// The newest generation the agent aborted.
    aborted: u64,
    /// The generation whose groups `aborts` abort.
    running: u64,
    aborts: Vec<AbortHandle>,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, cmd: ToWorker) {
        let mut s = self.lock();
        match cmd {
            ToWorker::Start {
                generation,
                plan,
                slot,
            } => {
                if s.next.as_ref().is_none_or(|n| n.0 < generation) && generation > s.running {
                    s.next = Some((generation, plan, slot, unix_ms()));
                    self.newer.store(true, Ordering::SeqCst);
                }
            }
            ToWorker::Abort { generation } => {
                s.aborted = s.aborted.max(generation);
                if s.running <= generation {
                    s.aborts.iter().for_each(AbortHandle::abort);
                }
            }
            ToWorker::Finish => self.finish.store(true, Ordering::SeqCst),
            ToWorker::Stop => {
                s.stop = true;
                self.newer.store(true, Ordering::SeqCst);
                s.aborts.iter().for_each(AbortHandle::abort);
            }
        }
        self.changed.notify_all();
    }

    /// The next generation to run, or `None` when told to stop.
    fn next(&self) -> Option<(u64, Plan, Slot, u64)> {
        let mut s = self.lock();
        loop {
            if s.stop {
                return None;
            }
            if let Some(n) = s.next.take() {
                self.newer.store(false, Ordering::SeqCst);
                s.running = n.0;
                s.aborts.clear();
                return Some(n);
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Aborts the running generation's groups: this worker leaves it, and its peers must not
    /// wait for it.
    fn abort_running(&self) {
        self.lock().aborts.iter().for_each(AbortHandle::abort);
    }

    /// Whether generation `generation` was aborted or superseded, or the worker told to stop.
    fn cancelled(&self, generation: u64) -> bool {
        let s = self.lock();
        s.aborted >= generation || s.stop || s.next.is_some()
    }

    /// Arms the abort of generation `generation`'s groups; fails at once if it was already
    /// aborted or superseded.
    fn arm(&self, generation: u64, groups: &Groups) -> Result<()> {
        let mut s = self.lock();
        s.aborts = [&groups.tp, &groups.pp, &groups.dp, &groups.emb]
            .into_iter()
            .flatten()
            .map(|g| g.abort_handle())
            .collect();
        if s.aborted >= generation || s.stop || s.next.is_some() {
            s.aborts.iter().for_each(AbortHandle::abort);
            return Err(RuntimeError::Aborted {
                op: "start",
                group: format!("generation {generation}"),
                rank: 0,
            });
        }
        Ok(())
    }
}

/// How a generation ended.
enum Ended {
    /// A newer generation was committed; every rank stopped after the same step.
    Superseded,
    /// A commit was refused: a newer generation exists.
    Fenced,
    /// The job's last step is done.
    Finished,
}

/// Sends events to the agent; shared with the heartbeat thread.
struct Events<W: Write>(Arc<Mutex<W>>);

impl<W: Write> Events<W> {
    fn send(&self, e: &FromWorker) {
        let line = serde_json::to_string(e).expect("events serialise");
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // An agent that stopped listening is gone; stdin's end tells the worker so.
        let _ = writeln!(w, "{line}").and_then(|_| w.flush());
    }
}

/// What a worker says of its steps: only a checkpoint that did not commit, which its agent's
/// log then shows; the agent follows the steps through etcd.
struct Quiet;
impl Observer for Quiet {
    fn on_checkpoint(&mut self, rec: &CheckpointRecord) {
        if let Some(e) = &rec.previous_failed {
            tracing::warn!(
                "the checkpoint before step {} did not commit: {e}",
                rec.step
            );
        }
    }
}

/// Runs an elastic worker until its agent says stop (`Ok`) or goes away (the process exits
/// with [`EXIT_AGENT_GONE`]). `control` is the agent's side of the channel (the worker's
/// stdin), `events` the worker's (its stdout).
pub fn run(
    cfg: TrainConfig,
    coord: Arc<dyn Coordinator>,
    opts: WorkerOptions,
    control: impl BufRead + Send + 'static,
    events: impl Write + Send + 'static,
) -> Result<()> {
    let shared = Arc::new(Control::default());
    let span = tracing::info_span!("worker", job = %opts.job);
    let _worker = span.clone().entered();
    {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _worker = span.entered();
            for line in control.lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(cmd) => shared.handle(cmd),
                    Err(e) => {
                        tracing::info!("ignoring a command that does not parse ({e}): {line}")
                    }
                }
            }
            tracing::info!("the agent is gone; stopping");
            std::process::exit(EXIT_AGENT_GONE);
        });
    }
    let keys = JobKeys::new(&opts.job);
    let mut events = Events(Arc::new(Mutex::new(events)));
    {
        let (beat, every) = (Events(events.0.clone()), opts.heartbeat);
        std::thread::spawn(move || loop {
            beat.send(&FromWorker::Alive);
            std::thread::sleep(every);
        });
    }
    let mut trainer: Option<Trainer> = None;
    while let Some((generation, plan, slot, told_at_ms)) = shared.next() {
        let _generation = tracing::info_span!(
            "generation",
            generation,
            slot = %format_args!("{}/{}", slot.node, slot.index),
            rank = tracing::field::Empty,
        )
        .entered();
        let mut gen = Generation {
            cfg: &cfg,
            coord: &*coord,
            shared_coord: &coord,
            keys: &keys,
            opts: &opts,
            control: &shared,
            generation,
            plan: &plan,
            slot: &slot,
            told_at_ms,
        };
        let ended = gen.run(&mut trainer, &mut events);
        if ended.is_err() {
            // This worker leaves the generation on an error of one group (a peer lost, a
            // timeout): its peers in the generation's other groups must not wait for it until
            // their deadlines.
            shared.abort_running();
        }
        // An error of a generation that was aborted or superseded meanwhile is that; any other
        // is the worker's own, and the same members should start over, unless it says a peer is
        // gone or silent, which that peer's agent or lease reports.
        let retry = |e: &RuntimeError| {
            !shared.cancelled(generation)
                && !matches!(
                    e,
                    RuntimeError::Aborted { .. }
                        | RuntimeError::PeerLost { .. }
                        | RuntimeError::CommTimeout { .. }
                )
        };
        match ended {
            Ok(Ended::Finished) => events.send(&FromWorker::Finished { generation }),
            Ok(Ended::Superseded) => {}
            Ok(Ended::Fenced) => events.send(&FromWorker::Interrupted {
                generation,
                step: trainer.as_ref().map_or(0, |t| t.step),
                reason: "fenced: a newer generation exists".into(),
                retry: false,
                peer: false,
            }),
            Err(e) => events.send(&FromWorker::Interrupted {
                generation,
                step: trainer.as_ref().map_or(0, |t| t.step),
                retry: retry(&e),
                peer: !shared.cancelled(generation)
                    && matches!(
                        e,
                        RuntimeError::PeerLost { .. } | RuntimeError::CommTimeout { .. }
                    ),
                reason: e.to_string(),
            }),
        }
    }
    Ok(())
}

/// Generation `g`'s process-group secret, which its leader wrote with its plan.
fn group_secret(coord: &dyn Coordinator, keys: &JobKeys, g: u64) -> Result<Vec<u8>> {
    let key = keys.secret(g);
    match retrying(OUTAGE_MAX, || coord.get(&key))? {
        Some(secret) if !secret.is_empty() => Ok(secret),
        _ => Err(RuntimeError::Argument {
            name: "plan",
            reason: format!(
                "generation {g} has no process-group secret at {key}: its plan was made by a \
                 leader of an older marathon; run one version on every node"
            ),
        }),
    }
}

/// Whether `plan` is the plan committed for generation `g`: `Err` describes how it is not.
fn committed_plan_is(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    g: u64,
    plan: &Plan,
) -> Result<std::result::Result<(), String>> {
    let key = keys.plan(g);
    Ok(match retrying(OUTAGE_MAX, || job::plan(coord, keys, g))? {
        Some(c) if &c == plan => Ok(()),
        Some(c) => Err(format!(
            "told to run generation {g} with {plan:?}, but {key} holds {c:?}"
        )),
        None => Err(format!(
            "told to run generation {g}, but {key} holds no plan"
        )),
    })
}

/// One generation of one worker.
struct Generation<'a> {
    cfg: &'a TrainConfig,
    coord: &'a dyn Coordinator,
    shared_coord: &'a Arc<dyn Coordinator>,
    keys: &'a JobKeys,
    opts: &'a WorkerOptions,
    control: &'a Control,
    generation: u64,
    plan: &'a Plan,
    slot: &'a Slot,
    told_at_ms: u64,
}

impl Generation<'_> {
    fn run<W: Write>(
        &mut self,
        trainer: &mut Option<Trainer>,
        events: &mut Events<W>,
    ) -> Result<Ended> {
        let (plan, g) = (self.plan, self.generation);
        let role = plan.roles().get(self.slot).copied();
        let Some(place) = role else {
            return Err(RuntimeError::Argument {
                name: "slot",
                reason: format!("{:?} has no place in the plan of generation {g}", self.slot),
            });
        };
        let rank = place.rank();
        tracing::Span::current().record("rank", rank);
        let t0 = Instant::now();
        let mut spec = GroupSpec::loopback(&self.opts.job, "", 0, 1, self.opts.group_timeout);
        spec.generation = g;
        spec.secret = group_secret(self.coord, self.keys, g)?;
        // Paired with the membership core's checks of the plans it starts: a worker runs only
        // the plan committed for its generation.
        if let Err(e) = committed_plan_is(self.coord, self.keys, g, plan)? {
            panic!("{}: {e}", self.slot.node);
        }
        spec.bind = std::net::SocketAddr::new(self.opts.host, 0);
        spec.rendezvous_timeout = self.opts.group_timeout;
        let abortable = Abortable {
            inner: self.coord,
            control: self.control,
            generation: g,
        };
        crate::moments::reach(crate::moments::Moment::Rendezvous);
        let groups = Groups::connect(&abortable, place, &spec)?;
        self.control.arm(g, &groups)?;
        let groups_at_ms = unix_ms();
        let groups_ms = t0.elapsed().as_secs_f64() * 1e3;
        // A stage that no block keeps in memory comes from the newest checkpoint, for every
        // rank: the job resumes from there as a whole.
        let from_storage = (0..plan.pp).any(|stage| {
            !plan
                .blocks
                .iter()
                .any(|b| b.stage == stage && b.state == StateSource::Kept)
        });
        let mut cfg = self.cfg.clone();
        cfg.parallel.dp = plan.dp;
        // A checkpoint commits only while its generation runs: its commit is a record in the
        // coordinator, created in the transaction that checks the generation, before the
        // manifest is written. The trainer's persists carry the generation (set_generation).
        if let Some(c) = cfg.checkpoint.as_mut() {
            c.record = Some(crate::checkpoint::coordinator_record(
                self.shared_coord.clone(),
                self.keys.clone(),
                OUTAGE_MAX,
                true,
            ));
        }
        let mut reloaded = None;
        let t1 = Instant::now();
        // A worker whose block the plan does not keep holds nobody's state, whatever its memory
        // says: it was idle (its block broken) or on standby from an older history, and may now
        // hold another shard. Its block receives its state from a peer, or from storage.
        if let (Some(t), false) = (
            trainer.as_ref(),
            plan.block(place.replica, place.stage).state == StateSource::Kept,
        ) {
            let s = t.model.layout.shard;
            tracing::info!(
                "placed at tensor rank {} of stage {} in a block that keeps no state; the \
                 state it held (tensor rank {} of stage {}, step {}) is dropped",
                place.tp_rank,
                place.stage,
                s.tp_rank,
                s.stage,
                t.step
            );
            *trainer = None;
        }
        let t = match trainer {
            Some(t) => {
                t.regroup(groups)?;
                t.set_generation(g);
                if from_storage {
                    reloaded = Some(t.reload()?.unwrap_or(0));
                }
                t
            }
            None if from_storage => {
                let t = trainer.insert(Trainer::with_groups(cfg, groups)?);
                t.set_generation(g);
                reloaded = Some(t.resumed_from().unwrap_or(0));
                t
            }
            None => {
                let t = trainer.insert(Trainer::joining(cfg, groups)?);
                t.set_generation(g);
                t
            }
        };
        // With the distributed optimizer, a lost replica's moments live on in a neighbour.
        t.mirror_moments()?;
        t.gather_pace();
        t.set_stop_signal(self.control.newer.clone());
        t.set_finish_signal(self.control.finish.clone());
        if let Some(live) = &self.opts.metrics {
            t.set_live_metrics(live.clone());
            live.placed(g, rank);
        }
        let recovery = tracing::info_span!("recovery").entered();
        let step = match t.reconcile() {
            Ok(step) => step,
            // Shards left at different steps: every rank failed together, and together they
            // take the newest checkpoint.
            Err(RuntimeError::Config { reason, .. }) => {
                tracing::info!("{reason}; reloading the newest checkpoint");
                reloaded = Some(t.reload()?.unwrap_or(0));
                t.reconcile()?
            }
            Err(e) => return Err(e),
        };
        drop(recovery);
        let reconcile_ms = t1.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            "continues from step {step} at dp {}, its state {}, in {reconcile_ms:.0} ms",
            plan.dp,
            match reloaded {
                Some(0) => "the initial one".to_string(),
                Some(s) => format!("reloaded from the checkpoint of step {s}"),
                None => "kept in memory or taken from a peer".to_string(),
            }
        );
        let is_rank0 = rank == 0;
        let high_water = if is_rank0 {
            committed_high_water(self.coord, self.keys, g)?
        } else {
            0
        };
        let mut record = StepCommit {
            generation: g,
            step,
            consumed_samples: t.consumed_samples,
            loss: None,
            dp: plan.dp,
            first_step: step,
            told_at_ms: self.told_at_ms,
            groups_at_ms,
            ready_at_ms: unix_ms(),
            at_ms: unix_ms(),
            reloaded,
            training_s: 0.0,
            eval_s: 0.0,
            checkpoint_stall_s: 0.0,
            recomputed_steps: 0,
            recomputed_s: 0.0,
            stragglers: Vec::new(),
        };
        // Rank 0 watches every rank's pace; the flags ride in its step commits.
        let e = t.cfg.elastic;
        let rule = StragglerRule {
            factor: e.straggler_factor,
            steps: e.straggler_steps,
        };
        let layout = plan.layout();
        let stages = (0..layout.world_size())
            .map(|r| layout.place(r).stage)
            .collect();
        let mut pace = Pace::new(rule, stages);
        if is_rank0 && !self.commit(&record)? {
            self.control.abort_running();
            return Ok(Ended::Fenced);
        }
        events.send(&FromWorker::Started {
            generation: g,
            place,
            step,
            reloaded,
            groups_ms,
            reconcile_ms,
            digest: t.state_digest()?,
            storage_read_bytes: marathon_storage::reader::bytes_read(),
        });
        let started = Instant::now();
        let mut goodput = Goodput::default();
        let mut last = f32::NAN;
        while t.step < t.cfg.train.steps {
            let before = goodput.training_s;
            let rec = t.advance(&mut Quiet, &mut goodput)?;
            last = rec.loss;
            if rec.step <= high_water {
                record.recomputed_steps += 1;
                record.recomputed_s += goodput.training_s - before;
                goodput.training_s = before;
            }
            events.send(&FromWorker::Step {
                generation: g,
                step: rec.step,
                loss: rec.loss,
                step_ms: rec.step_ms,
            });
            if t.stop_agreed() {
                // A newer generation is committed: this one can commit nothing more, and the
                // step every rank just applied is carried into the next by reconcile.
                return Ok(Ended::Superseded);
            }
            let finishing = t.finish_agreed();
            // A flag at the last step would only disturb the job's end.
            let last = rec.step == t.cfg.train.steps;
            if let (true, false, Some(times)) = (is_rank0, last, t.pace()) {
                for f in pace.observe(rec.step, times) {
                    let p = layout.place(f.rank);
                    let slot = plan.block(p.replica, p.stage).slots[p.tp_rank].clone();
                    tracing::info!(
                        "rank {} ({}/{}) is a straggler: its compute per microbatch was \
                         {:.1}x its peers' median for {} steps, to step {}",
                        f.rank,
                        slot.node,
                        slot.index,
                        f.ratio,
                        rule.steps,
                        f.step
                    );
                    record.stragglers.push(FlaggedStraggler {
                        slot,
                        rank: f.rank,
                        step: f.step,
                        ratio: f.ratio,
                    });
                }
            }
            if is_rank0 {
                record.step = rec.step;
                record.consumed_samples = t.consumed_samples;
                record.loss = Some(rec.loss);
                record.at_ms = unix_ms();
                record.training_s = goodput.training_s;
                record.eval_s = goodput.eval_s;
                record.checkpoint_stall_s = goodput.checkpoint_stall_s;
                if !self.commit(&record)? {
                    // The peers must not wait in the next step for a rank that left.
                    self.control.abort_running();
                    return Ok(Ended::Fenced);
                }
            }
            if finishing {
                // Every rank learned of the request in the same step: the job ends here.
                tracing::info!(
                    "the job was asked to stop; it ends at step {} on a checkpoint",
                    rec.step
                );
                break;
            }
        }
        let ck = if step == t.cfg.train.steps {
            // The generation before ended right after the last step, and the checkpoint of that
            // step may have been refused with it: the job ends on a checkpoint of its own.
            t.checkpoint()?
        } else if t.step < t.cfg.train.steps {
            // An operator ended the job: it ends on a checkpoint of its last step, which this
            // generation may have taken already.
            t.checkpoint_once()?
        } else {
            None
        };
        if let Some(ck) = ck {
            goodput.checkpoint_stall_s += ck.stall_ms / 1e3;
        }
        let summary = t.conclude(started, goodput, last)?;
        if is_rank0 {
            let (job, records) = job_summary(self.coord, self.keys, &summary)?;
            t.write_record("goodput", &job.goodput)?;
            t.write_record("timeline", &crate::report::Timeline::from_records(&records))?;
            t.write_report();
            let json = serde_json::to_vec(&job).expect("summaries serialise");
            let done = self.keys.done();
            let put = || job::fenced_put(self.coord, self.keys, g, &[(&done, &json)]);
            if !retrying(self.opts.group_timeout, put)? {
                return Ok(Ended::Fenced);
            }
        }
        Ok(Ended::Finished)
    }

    /// Commits `record`, fenced by the generation; `false` when a newer one exists.
    fn commit(&self, record: &StepCommit) -> Result<bool> {
        let json = serde_json::to_vec(record).expect("commits serialise");
        let key = self.keys.committed(self.generation);
        // Every rank applied the step; a coordinator out of reach only delays its record.
        Ok(retrying(self.opts.group_timeout, || {
            job::fenced_put(self.coord, self.keys, self.generation, &[(&key, &json)])
        })?)
    }
}

/// The highest step any generation before `generation` committed.
fn committed_high_water(coord: &dyn Coordinator, keys: &JobKeys, generation: u64) -> Result<u64> {
    let mut high = 0;
    for (k, v) in retrying(OUTAGE_MAX, || coord.list(keys.root()))? {
        if let JobKey::Committed(g) = keys.parse(&k) {
            if g < generation {
                if let Ok(c) = serde_json::from_slice::<StepCommit>(&v) {
                    high = high.max(c.step);
                }
            }
        }
    }
    Ok(high)
}

/// The job's summary: `last` (the final generation's rank 0) with the accounting of every
/// generation, read back from the coordinator, and the records it was read from.
fn job_summary(
    coord: &dyn Coordinator,
    keys: &JobKeys,
    last: &Summary,
) -> Result<(Summary, Records)> {
    let mut records = Records::default();
    for (k, v) in retrying(OUTAGE_MAX, || coord.list(keys.root()))? {
        records.add(&keys.parse(&k), &v);
    }
    let (commits, lost, planned) = (&records.commits, &records.lost, &records.planned);
    let mut summary = last.clone();
    (summary.goodput, summary.elapsed_s) = goodput(commits, lost, planned, unix_ms());
    if summary.final_loss.is_nan() {
        // A generation that began at the last step ran none: the job's last loss is the one
        // the generation before it committed.
        let newest = commits
            .iter()
            .filter(|c| c.step == summary.steps && c.loss.is_some())
            .max_by_key(|c| c.generation);
        if let Some(l) = newest.and_then(|c| c.loss) {
            summary.final_loss = l;
        }
    }
    Ok((summary, records))
}

/// The coordinator as a generation's rendezvous sees it: waiting for a peer's key gives up
/// within [`RENDEZVOUS_SLICE`] of the generation being aborted or superseded, rather than at its
/// deadline. (Accepting connections from higher ranks still waits for the deadline.)
struct Abortable<'a> {
    inner: &'a dyn Coordinator,
    control: &'a Control,
    generation: u64,
}

/// How often a rendezvous looks whether its generation was aborted.
const RENDEZVOUS_SLICE: Duration = Duration::from_millis(100);

impl Coordinator for Abortable<'_> {
    fn put(&self, key: &str, value: &[u8]) -> Result<(), ElasticError> {
        self.inner.put(key, value)
    }

    fn check(&self) -> Result<(), ElasticError> {
        if self.control.cancelled(self.generation) {
            return Err(ElasticError::Unavailable {
                action: "rendezvous",
                key: String::new(),
                reason: format!("generation {} was aborted", self.generation),
            });
        }
        Ok(())
    }

    fn wait_get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, ElasticError> {
        let started = Instant::now();
        loop {
            if let Err(ElasticError::Unavailable { reason, .. }) = self.check() {
                return Err(ElasticError::Unavailable {
                    action: "rendezvous at",
                    key: key.to_owned(),
                    reason,
                });
            }
            let slice = deadline.min(Instant::now() + RENDEZVOUS_SLICE);
            match self.inner.wait_get(key, slice) {
                Err(ElasticError::Timeout { .. }) if Instant::now() < deadline => {}
                Err(ElasticError::Timeout { .. }) => {
                    return Err(ElasticError::Timeout {
                        key: key.to_owned(),
                        waited_ms: started.elapsed().as_millis(),
                    })
                }
                done => return done,
            }
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ElasticError> {
        self.inner.get(key)
    }

    fn transact(
        &self,
        when: &[(&str, Option<&[u8]>)],
        puts: &[(&str, &[u8])],
    ) -> Result<bool, ElasticError> {
        self.inner.transact(when, puts)
    }

    fn delete(&self, key: &str) -> Result<(), ElasticError> {
        self.inner.delete(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ElasticError> {
        self.inner.list(prefix)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use marathon_elastic::plan::{plan, Offer, PlanRequest};
    use marathon_elastic::InProcessCoordinator;

    use super::*;

    /// The check behind the worker's assertion fires on a plan other than the committed one,
    /// and on a generation with none.
    #[test]
    fn a_plan_other_than_the_committed_one_is_named() {
        let coord = InProcessCoordinator::new();
        let keys = JobKeys::new("j");
        let live: BTreeMap<String, Offer> = [("a".to_string(), Offer::all(2))].into();
        let req = |microbatches| PlanRequest {
            tp: 1,
            pp: 1,
            microbatches,
            live: &live,
            previous: None,
        };
        let committed = plan(&req(4)).expect("a plan");
        let other = plan(&req(6)).expect("a plan");
        coord
            .put(
                &keys.plan(1),
                &serde_json::to_vec(&committed).expect("json"),
            )
            .expect("put");
        let is = |g, p: &Plan| committed_plan_is(&coord, &keys, g, p).expect("a read");
        assert_eq!(is(1, &committed), Ok(()));
        let e = is(1, &other).expect_err("another plan");
        assert!(
            e.contains("told to run generation 1 with") && e.contains("but /"),
            "{e}"
        );
        let e = is(2, &committed).expect_err("no plan");
        assert!(e.ends_with("holds no plan"), "{e}");
        // A plan that does not parse is an error naming its key, not taken for no plan.
        coord.put(&keys.plan(3), b"{\"tp\": ").expect("put");
        let e = committed_plan_is(&coord, &keys, 3, &committed).expect_err("unreadable");
        let e = e.to_string();
        assert!(
            e.contains(&keys.plan(3)) && e.contains("does not parse as a plan"),
            "{e}"
        );
    }
}
