//! The node agent's own code run against the in-process coordinator: agents as threads of one
//! process, with hollow workers, elect a leader, agree on a plan, and re-plan without a node
//! that crashes once its lease runs out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marathon_elastic::membership::Timing;
use marathon_elastic::plan::Plan;
use marathon_elastic::{Cluster, Coordinator, InProcessCoordinator, JobKeys};
use marathon_runtime::agent::{self, AgentOptions, Hollow, Starts};

fn options(node: &str, nodes: usize) -> AgentOptions {
    AgentOptions {
        endpoints: Vec::new(),
        access: Default::default(),
        job: "in-process".into(),
        node: node.into(),
        slots: 2,
        tp: 2,
        pp: 1,
        microbatches: 8,
        lease_ttl: Duration::from_secs(2),
        timing: Timing {
            settle: Duration::from_millis(50),
            hang: Duration::from_secs(3600),
        },
        cooldown: Duration::from_secs(30),
        withdraw_after: 0,
        wait_slots: 2 * nodes,
        evict_stragglers: false,
        quiet: true,
        metrics_addr: None,
    }
}

/// Waits until every node of `nodes` started `generation`.
fn all_started(starts: &Starts, nodes: &[&str], generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = {
            let s = starts.lock().expect("the starts lock");
            nodes
                .iter()
                .all(|n| s.iter().any(|(m, g, _)| m == n && *g == generation))
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every one of {nodes:?} started generation {generation}: {:?}",
            starts.lock().expect("the starts lock")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn agents_on_the_in_process_coordinator_plan_and_replan_without_a_crashed_node() {
    let coord = Arc::new(InProcessCoordinator::new());
    let keys = JobKeys::new("in-process");
    let nodes = ["a", "b", "c", "d"];
    let starts: Starts = Arc::new(Mutex::new(Vec::new()));
    let crash: Vec<Arc<AtomicBool>> = nodes.iter().map(|_| Arc::default()).collect();
    let agents: Vec<_> = nodes
        .iter()
        .zip(&crash)
        .map(|(node, crash)| {
            let (coord, crash): (Arc<dyn Cluster>, _) = (coord.clone(), crash.clone());
            let host = Box::new(Hollow::new(node, starts.clone()));
            let opts = options(node, nodes.len());
            std::thread::spawn(move || agent::run_with(coord, opts, host, Some(crash)))
        })
        .collect();
    all_started(&starts, &nodes, 1);
    let plan = |g: u64| -> Plan {
        serde_json::from_slice(&coord.get(&keys.plan(g)).unwrap().expect("a plan")).unwrap()
    };
    assert_eq!(plan(1).dp, 4);
    let leader = coord.get(&keys.leader()).unwrap().expect("a leader");
    // A node other than the leader's crashes: its lease runs out, and the others go on
    // without it.
    let victim = nodes
        .iter()
        .rposition(|n| n.as_bytes() != leader.as_slice())
        .unwrap();
    crash[victim].store(true, Ordering::SeqCst);
    let crashed = Instant::now();
    let survivors: Vec<&str> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| *n)
        .collect();
    all_started(&starts, &survivors, 2);
    assert!(
        crashed.elapsed() >= Duration::from_millis(1500),
        "re-planned {:?} after the crash, before its lease ran out",
        crashed.elapsed()
    );
    let second = plan(2);
    assert_eq!(second.dp, 3);
    assert!(second
        .blocks
        .iter()
        .flat_map(|b| &b.slots)
        .all(|s| s.node != nodes[victim]));
    // The job ends: every agent, the crashed one included, returns.
    coord.put(&keys.done(), b"done").unwrap();
    for a in agents {
        a.join().unwrap().unwrap();
    }
}

/// An agent started with another configuration than its job's (here twice the global batch)
/// refuses the job's running plan with an error naming both, before it registers, rather than
/// joining a plan it does not fit; the job's own agents go on undisturbed.
#[test]
fn an_agent_whose_configuration_differs_from_its_jobs_refuses_the_plan() {
    let coord = Arc::new(InProcessCoordinator::new());
    let keys = JobKeys::new("in-process");
    let nodes = ["a", "b"];
    let starts: Starts = Arc::new(Mutex::new(Vec::new()));
    let spawn = |node: &'static str, opts: AgentOptions| {
        let coord: Arc<dyn Cluster> = coord.clone();
        let host = Box::new(Hollow::new(node, starts.clone()));
        std::thread::spawn(move || agent::run_with(coord, opts, host, None))
    };
    let agents: Vec<_> = nodes
        .iter()
        .map(|n| spawn(n, options(n, nodes.len())))
        .collect();
    all_started(&starts, &nodes, 1);
    let odd = spawn(
        "z",
        AgentOptions {
            microbatches: 16,
            ..options("z", nodes.len())
        },
    );
    let err = odd
        .join()
        .unwrap()
        .expect_err("a plan it does not fit")
        .to_string();
    assert!(
        err.contains("plans tp 2 x pp 1 over 8 microbatches, but node z's configuration says tp 2 x pp 1 over 16")
            && err.contains("same configuration"),
        "{err}"
    );
    // It refused before registering: the job was not disturbed.
    assert!(starts.lock().unwrap().iter().all(|(n, _, _)| n != "z"));
    assert_eq!(
        coord.get(&keys.generation()).unwrap().as_deref(),
        Some(&b"1"[..])
    );
    coord.put(&keys.done(), b"done").unwrap();
    for a in agents {
        a.join().unwrap().unwrap();
    }
}
