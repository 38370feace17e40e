//! The `marathon` binary end to end: prepare, train, plan, and errors on bad input.

// The helpers unwrap as the tests do: an unexpected error is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::{json_lines, line_with, repo, running};
use marathon_runtime::small_job::SmallJob;
use marathon_storage::format::Manifest;
use marathon_testkit::docs_corpus;
use marathon_testkit::etcd::Etcd;
use marathon_testkit::garage::Garage;
use std::path::Path;
use std::process::{Command, Output};

fn marathon(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_marathon"))
        .args(args)
        .current_dir(cwd)
        // The tests read human info lines, whatever the environment they run in says.
        .env_remove("MARATHON_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .output()
        .expect("run the marathon binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn prepare_then_train_writes_metrics_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepare_corpus(dir.path());
    assert!(
        text(&out).contains("prepared 2 files, 2 documents"),
        "{}",
        text(&out)
    );
    let config = SmallJob {
        n_layer: 1,
        val: Some("corpus/val.bin".into()),
        global_batch: 4,
        decay_tokens: 1024,
        train_lines: "eval_every_steps = 2\neval_batches = 1\nmetrics = \"runs/m.jsonl\"\n".into(),
        ..Default::default()
    }
    .toml();
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    let out = marathon(&["train", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(summary["steps"], 4);
    assert_eq!(summary["tokens_consumed"], 4 * 4 * 32);
    assert!(
        text(&out).contains("step 4: validation loss"),
        "{}",
        text(&out)
    );
    let metrics = std::fs::read_to_string(dir.path().join("runs/m.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["kind"] == "step").count(), 4);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "eval").count(), 2);
    assert!(
        lines[0]["data"]["loss"].as_f64().unwrap() > 5.0,
        "an untrained GPT-2 vocabulary model starts near ln(50257)"
    );
}

#[test]
fn bad_input_exits_non_zero_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let small = repo().join("configs/small.toml");
    // A shipped configuration whose corpus is not prepared in this directory.
    let out = marathon(&["train", "--config", small.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("data file data/repo/train.bin: cannot open"),
        "{}",
        text(&out)
    );
    // A typo in a field.
    let bad = std::fs::read_to_string(&small)
        .unwrap()
        .replace("n_head = 4", "n_heads = 4");
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let out = marathon(&["train", "--config", "bad.toml"], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("error: config bad.toml: ")
            && text(&out).contains("unknown field `n_heads`"),
        "{}",
        text(&out)
    );
    // A missing configuration file.
    let out = marathon(&["train", "--config", "nope.toml"], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("config nope.toml: cannot read"),
        "{}",
        text(&out)
    );
    // A layout far too large for one machine is refused before any worker starts.
    let mtnlg = repo().join("configs/mtnlg-530b.toml");
    let out = marathon(&["train", "--config", mtnlg.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("batch.micro_batch: the 4480 ranks of this layout need")
            && text(&out).contains("more than this machine's"),
        "{}",
        text(&out)
    );
    // A data-parallel degree the agents' slots do not hold, refused before connecting.
    let out = marathon(
        &[
            "bench",
            "elastic",
            "--etcd",
            "http://127.0.0.1:1",
            "--agents",
            "24",
            "--slots",
            "8",
            "--tp",
            "8",
            "--pp",
            "3",
            "--dp",
            "7",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--dp 7: the job's replicas are what its agents' slots hold")
            && text(&out).contains("= 8;"),
        "{}",
        text(&out)
    );
}

#[test]
fn plan_sizes_the_mtnlg_530b_layout() {
    let out = marathon(&["plan", "--config", "configs/mtnlg-530b.toml"], repo());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("tp 8 x pp 35 x dp 16 = 4480 ranks (3 layers per stage)"),
        "{t}"
    );
    assert!(t.contains("(529.6B)"), "{t}");
    assert!(t.contains("memory/rank"), "{t}");
    assert!(t.contains("recompute full"), "{t}");
    assert!(t.contains("FLOPs/step"), "{t}");
    // The same job keeping every activation needs more memory per rank, and says so.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.toml");
    let shipped = std::fs::read_to_string(repo().join("configs/mtnlg-530b.toml")).unwrap();
    let none = shipped.replace("recompute = \"full\"", "recompute = \"none\"");
    assert_ne!(
        none, shipped,
        "the shipped configuration names its recomputation"
    );
    std::fs::write(&path, none).unwrap();
    let out = marathon(&["plan", "--config", path.to_str().unwrap()], repo());
    let u = text(&out);
    assert!(u.contains("recompute none"), "{u}");
    let activations = |s: &str| -> f64 {
        let line = s.lines().find(|l| l.starts_with("memory/rank")).unwrap();
        let at = line.find(" GiB activations").unwrap();
        line[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(activations(&u) > activations(&t), "{t}\n{u}");
}

#[test]
fn plan_weighs_the_mtnlg_checkpoint_and_its_goodput_at_each_failure_rate() {
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["plan", "--config", "configs/mtnlg-530b.toml"];
        args.extend_from_slice(extra);
        let out = marathon(&args, repo());
        assert!(out.status.success(), "{}", text(&out));
        let t = text(&out);
        for line in [
            "checkpoint ",
            "stall ",
            "persist, load",
            "interval ",
            "ETTR",
        ] {
            assert!(t.contains(line), "{line}: {t}");
        }
        summary(&out)
    };
    let g = plan(&[]);
    // 530B parameters' fp32 masters and both moments: about 6.35 TB.
    let total = g["goodput"]["checkpoint"]["total_bytes"].as_f64().unwrap();
    assert!((6.35e12..6.36e12).contains(&total), "{total}");
    // The default failure rate is Llama 3's per GPU, over 4480 GPUs.
    let mtbf = g["assumptions"]["job_mtbf_s"].as_f64().unwrap();
    assert!((mtbf - 54.0 * 24.0 * 16384.0 / 419.0 * 3600.0 / 4480.0).abs() < 1e-6);
    // More frequent failures cost both ways more, checkpoint-restart most.
    let ettr = |g: &serde_json::Value, way: &str| g["goodput"][way]["ettr"].as_f64().unwrap();
    let mut last = (0.0, 0.0);
    for hours in ["3", "5", "12"] {
        let g = plan(&["--mtbf-hours", hours]);
        assert_eq!(
            g["assumptions"]["job_mtbf_s"].as_f64().unwrap(),
            hours.parse::<f64>().unwrap() * 3600.0
        );
        let (r, p) = (ettr(&g, "restart"), ettr(&g, "in_place"));
        assert!(
            p > r && r > last.0 && p > last.1,
            "{hours} h: {r} {p} after {last:?}"
        );
        last = (r, p);
    }
    // Measured recovery times replace the defaults; a flag still wins over them.
    let figures = "docs/figures/bench-recovery-fcd8d14.txt";
    let g = plan(&["--measured", figures, "--reform-s", "2"]);
    // Detection in the three runs: 11, 5 and 4 ms.
    assert_eq!(g["assumptions"]["detect_s"].as_f64().unwrap(), 0.005);
    assert_eq!(g["assumptions"]["reform_s"].as_f64().unwrap(), 2.0);
    let sources = g["sources"].to_string();
    assert!(
        sources.contains(&format!("detection: measured in {figures}"))
            && sources.contains("re-forming: flag"),
        "{sources}"
    );
    // Bad input is named.
    for (args, says) in [
        (
            &["--mtbf-hours", "0"][..],
            "--mtbf-hours / --gpu-mtbf-hours: must be a positive number",
        ),
        (
            &["--measured", "README.md"][..],
            "--measured README.md: holds no output of `marathon bench recovery`",
        ),
        (
            &["--hardware-fraction", "1.5"][..],
            "--hardware-fraction: must be between 0 and 1",
        ),
    ] {
        let mut all = vec!["plan", "--config", "configs/mtnlg-530b.toml"];
        all.extend_from_slice(args);
        let out = marathon(&all, repo());
        assert!(
            !out.status.success() && text(&out).contains(says),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn sim_runs_the_mtnlg_job_for_days_and_charges_both_ways_of_recovering() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("configs/mtnlg-530b.toml");
    let config = config.to_str().unwrap();
    // One failure every two hours for the job: a dozen land in a day.
    let out = marathon(
        &[
            "sim",
            "--config",
            config,
            "--days",
            "1",
            "--seed",
            "3",
            "--mtbf-hours",
            "2",
            "--json",
            "sim.json",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for line in [
        "time lost",
        "ETTR",
        "invariants held throughout",
        "data parallelism",
    ] {
        assert!(t.contains(line), "{line}: {t}");
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sim.json")).unwrap()).unwrap();
    assert_eq!(written, summary(&out));
    let r = &written["report"];
    assert_eq!(r["nodes"], 560);
    let failures =
        r["hardware_failures"].as_u64().unwrap() + r["worker_failures"].as_u64().unwrap();
    assert!(failures >= 4, "{r}");
    let ettr = |way: &str| r[way]["ettr"].as_f64().unwrap();
    assert!(ettr("marathon") > ettr("restart"), "{r}");
    assert!(r["violations"].as_array().unwrap().is_empty(), "{r}");
    let out = marathon(&["sim", "--config", config, "--preset", "opt"], dir.path());
    assert!(
        !out.status.success() && text(&out).contains("--preset opt: no such failure model"),
        "{}",
        text(&out)
    );
}

#[test]
fn shipped_configurations_all_validate() {
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let out = marathon(&["plan", "--config", path.to_str().unwrap()], repo());
        assert!(out.status.success(), "{}: {}", path.display(), text(&out));
    }
}

#[test]
fn prepare_failures_exit_non_zero_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.jsonl"),
        "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n",
    )
    .unwrap();
    let out = marathon(
        &["data", "prepare", "--input", "c.jsonl", "--out", "corpus"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("error: data file c.jsonl:2: has no \"text\" field"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("corpus").exists());
}

/// Runs a benchmark that must succeed; returns the JSON report on its last stdout line, and
/// all of stdout.
fn bench_report(args: &[&str], dir: &Path) -> (serde_json::Value, String) {
    let out = marathon(args, dir);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap(),
        stdout,
    )
}

#[test]
fn bench_train_prints_step_figures_beside_the_gemm_limit() {
    let dir = tempfile::tempdir().unwrap();
    let readme = repo().join("README.md");
    let out = marathon(
        &[
            "data",
            "prepare",
            "--input",
            readme.to_str().unwrap(),
            "--out",
            "data/repo",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let small = repo().join("configs/small.toml");
    let small = small.to_str().unwrap();
    let tiny = [
        "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "0",
    ];
    let (report, _) = bench_report(
        &[&["bench", "train", "--config", small], &tiny[..]].concat(),
        dir.path(),
    );
    for key in [
        "ms_per_step",
        "tokens_per_s",
        "achieved_gflops",
        "gemm_gflops",
        "fraction_of_gemm_limit",
    ] {
        assert!(
            report[key]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v > 0.0),
            "{key} in {report}"
        );
    }
    assert_eq!(report["gemm_shape"], serde_json::json!([64, 256, 50304]));
    // Two data-parallel replicas report where the step's time went.
    let dp2 = ["--global-batch", "4", "--dp", "2"];
    let (report, stdout) = bench_report(
        &[&["bench", "train", "--config", small], &tiny[..], &dp2[..]].concat(),
        dir.path(),
    );
    assert_eq!(report["dp"], 2);
    assert!(
        report["comm_wait_fraction"]
            .as_f64()
            .is_some_and(|f| f > 0.0 && f < 1.0),
        "{report}"
    );
    assert!(stdout.contains("communication: "), "{stdout}");
    // All three dimensions: the pipeline's waiting and tensor parallelism's collectives.
    let all3 = ["--global-batch", "8", "--tp", "2", "--pp", "2", "--dp", "2"];
    let (report, stdout) = bench_report(
        &[&["bench", "train", "--config", small], &tiny[..], &all3[..]].concat(),
        dir.path(),
    );
    assert_eq!(
        (report["tp"].as_u64(), report["pp"].as_u64()),
        (Some(2), Some(2))
    );
    for key in ["tp_comm_fraction", "pipeline_bubble_fraction"] {
        assert!(
            report[key].as_f64().is_some_and(|f| f > 0.0 && f < 1.0),
            "{key} in {report}"
        );
    }
    // Two microbatches per replica over two stages: 1F1B idles 1 / 3 of the time.
    assert!((report["pipeline_bubble_ideal"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    assert!(stdout.contains("pipeline: "), "{stdout}");
    let out = marathon(
        &["bench", "train", "--config", small, "--steps", "0"],
        dir.path(),
    );
    assert!(
        !out.status.success() && text(&out).contains("--steps: must be at least 1"),
        "{}",
        text(&out)
    );
}

#[test]
fn bench_comm_prints_bus_bandwidth_beside_memcpy() {
    let out = marathon(
        &[
            "bench",
            "comm",
            "--ranks",
            "2,3",
            "--min-kib",
            "64",
            "--max-mib",
            "1",
        ],
        repo(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("memcpy: "), "{stdout}");
    // Each group's rank 0 logs its transport among the JSON lines.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("group allreduce-3-shm: collectives over shared memory across 3 ranks")
            && stderr.contains("group allreduce-3-tcp: collectives over tcp across 3 ranks"),
        "{stderr}"
    );
    let json_lines = |stderr: &str| -> Vec<serde_json::Value> {
        stderr
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = json_lines(&stderr);
    // 64 KiB, 256 KiB and 1 MiB for each of 2 and 3 ranks, on each transport.
    assert_eq!(rows.len(), 12, "{rows:?}");
    for r in &rows {
        assert!(r["busbw_gbs"].as_f64().is_some_and(|b| b > 0.0), "{r}");
        assert!(r["memcpy_gbs"].as_f64().is_some_and(|b| b > 0.0), "{r}");
    }
    for t in ["shm", "tcp"] {
        let of = rows.iter().filter(|r| r["transport"] == t).count();
        assert_eq!(of, 6, "{t}: {rows:?}");
    }
    assert!(
        stdout.contains("shm GB/s") && stdout.contains("tcp GB/s"),
        "{stdout}"
    );
    let out = marathon(
        &[
            "bench",
            "comm",
            "--ranks",
            "2",
            "--min-kib",
            "64",
            "--max-mib",
            "1",
            "--transports",
            "tcp",
        ],
        repo(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let rows = json_lines(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["transport"] == "tcp"), "{rows:?}");
    let out = marathon(&["bench", "comm", "--ranks", "1"], repo());
    assert!(
        !out.status.success() && text(&out).contains("--ranks: every group needs at least 2 ranks"),
        "{}",
        text(&out)
    );
}

/// Prepares `corpus/` in `dir` from the repository's own text, which every checkout has.
fn prepare_corpus(dir: &Path) -> Output {
    let [readme, arch] = docs_corpus();
    let (readme, arch) = (readme.to_str().unwrap(), arch.to_str().unwrap());
    let out = marathon(
        &[
            "data",
            "prepare",
            "--input",
            readme,
            arch,
            "--out",
            "corpus",
            "--val-fraction",
            "0.2",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    out
}

/// A corpus and a tiny configuration in `dir`, training `steps` steps.
fn tiny_job(dir: &Path, steps: u64) {
    prepare_corpus(dir);
    let config = SmallJob {
        steps,
        ..Default::default()
    }
    .toml();
    std::fs::write(dir.join("c.toml"), config).unwrap();
}

fn summary(o: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn launched_workers_train_as_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 4);
    let one = marathon(&["train", "--config", "c.toml"], dir.path());
    assert!(one.status.success(), "{}", text(&one));
    // Three microbatches over two worker processes: two and one.
    let two = marathon(&["train", "--config", "c.toml", "--dp", "2"], dir.path());
    assert!(two.status.success(), "{}", text(&two));
    assert!(
        text(&two).contains("launching 2 workers (tp 1 x pp 1 x dp 2)"),
        "{}",
        text(&two)
    );
    // Two tensor-parallel ranks in each of two pipeline stages.
    let args = ["train", "--config", "c.toml", "--tp", "2", "--pp", "2"];
    let four = marathon(&args, dir.path());
    assert!(four.status.success(), "{}", text(&four));
    assert!(
        text(&four).contains("launching 4 workers (tp 2 x pp 2 x dp 1)"),
        "{}",
        text(&four)
    );
    let a = summary(&one);
    let la = a["final_loss"].as_f64().unwrap();
    for (what, run) in [("dp2", &two), ("tp2 x pp2", &four)] {
        let b = summary(run);
        let lb = b["final_loss"].as_f64().unwrap();
        assert!(
            (la - lb).abs() <= 1e-5 * la,
            "one process {la}, {what} {lb}"
        );
        assert_eq!(a["tokens_consumed"], b["tokens_consumed"]);
    }
}

/// A long dp2 job in `dir`, started and running: the launcher, its remaining stderr lines,
/// and the workers' pids by rank.
fn running_dp2_job(dir: &Path) -> (std::process::Child, impl Iterator<Item = String>, [u32; 2]) {
    use std::io::{BufRead, BufReader};
    tiny_job(dir, 1_000_000);
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_marathon"))
        .args(["train", "--config", "c.toml", "--dp", "2"])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the launcher");
    let mut lines = BufReader::new(launcher.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut pids = [0u32; 2];
    let mut seen = Vec::new();
    // Wait for both workers to start and for training to make progress.
    for line in lines.by_ref() {
        seen.push(line.clone());
        // The launcher's line about a worker, not the worker's own (which start the same).
        if let Some((rank, pid)) = line
            .strip_prefix("worker rank ")
            .and_then(|rest| rest.split_once(": pid "))
        {
            pids[rank.parse::<usize>().unwrap()] = pid.parse().unwrap();
        }
        if line.starts_with("step ") {
            break;
        }
    }
    assert!(pids.iter().all(|&p| p > 0), "{seen:?}");
    (launcher, lines, pids)
}

#[test]
fn a_killed_worker_stops_the_job_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (mut launcher, lines, pids) = running_dp2_job(dir.path());
    let killed = Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.collect();
    let status = launcher.wait().unwrap();
    let all = rest.join("\n");
    assert!(!status.success(), "{all}");
    let named = format!(
        "worker rank 1 (pid {}) was killed by signal 9; stopped the other workers",
        pids[1]
    );
    assert!(all.contains(&named), "{all}");
    // No worker is left behind: both are gone and reaped.
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "worker pid {pid} is still there"
        );
    }
}

#[test]
fn workers_stop_when_their_launcher_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut launcher, _lines, pids) = running_dp2_job(dir.path());
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pids.iter().any(|&p| running(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        pids.iter().all(|&p| !running(p)),
        "workers {pids:?} outlived their launcher"
    );
}

#[test]
fn checkpoints_resume_and_the_ckpt_tools_list_inspect_verify_and_collect_them() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 4);
    let mut config = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    config.push_str("[checkpoint]\nroot = \"ckpt\"\nevery_steps = 2\nkeep_last = 5\n");
    std::fs::write(dir.path().join("c.toml"), &config).unwrap();
    // Two workers write each checkpoint; the last one is taken after step 4.
    let first = marathon(&["train", "--config", "c.toml", "--pp", "2"], dir.path());
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("step 2: checkpoint staged"),
        "{}",
        text(&first)
    );
    assert!(
        text(&first).contains("effective training time"),
        "{}",
        text(&first)
    );
    let fraction = summary(&first)["goodput"]["effective_fraction"].as_f64();
    assert!(
        fraction.is_some_and(|f| f > 0.0 && f <= 1.0),
        "{fraction:?}"
    );
    let ls = marathon(&["ckpt", "ls", "ckpt"], dir.path());
    assert!(ls.status.success(), "{}", text(&ls));
    for step in ["           2  committed", "           4  committed"] {
        assert!(text(&ls).contains(step), "{}", text(&ls));
    }
    assert!(text(&ls).contains("tp 1 x pp 2 x dp 1"), "{}", text(&ls));
    let inspect = marathon(&["ckpt", "inspect", "ckpt"], dir.path());
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(
        text(&inspect).contains("step 4 written by 2 ranks"),
        "{}",
        text(&inspect)
    );
    assert!(
        text(&inspect).contains("adam_v/h.1.mlp.c_fc.weight"),
        "{}",
        text(&inspect)
    );
    let verify = marathon(&["ckpt", "verify", "ckpt"], dir.path());
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("step 4: ok"), "{}", text(&verify));

    // Going on to step 6 resumes from step 4 in one process.
    std::fs::write(
        dir.path().join("c.toml"),
        config.replace("steps = 4", "steps = 6"),
    )
    .unwrap();
    let more = marathon(&["train", "--config", "c.toml"], dir.path());
    assert!(more.status.success(), "{}", text(&more));
    assert_eq!(summary(&more)["steps"], 6);
    assert!(
        text(&more).contains("resumed from the checkpoint of step 4 under ckpt"),
        "{}",
        text(&more)
    );
    let never = marathon(
        &["train", "--config", "c.toml", "--resume", "never"],
        dir.path(),
    );
    assert!(!never.status.success());
    assert!(
        text(&never).contains("checkpoint.resume: is never, but"),
        "{}",
        text(&never)
    );

    // A flipped bit fails verification, naming the object, and gc keeps what verifies.
    let root = dir.path().join("ckpt");
    let manifest = std::fs::read(root.join("step-000000000006/manifest.json")).unwrap();
    let manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
    let shard = root.join(manifest.shard_of(0).unwrap());
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let verify = marathon(&["ckpt", "verify", "ckpt", "--step", "6"], dir.path());
    assert!(!verify.status.success());
    assert!(
        text(&verify).contains("step 6: FAILED") && text(&verify).contains("shard-r00000-"),
        "{}",
        text(&verify)
    );
    let gc = marathon(
        &["ckpt", "gc", "ckpt", "--keep-last", "1", "--dry-run"],
        dir.path(),
    );
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(
        text(&gc).contains("would remove 1 expired checkpoints [2]"),
        "{}",
        text(&gc)
    );
    assert!(
        text(&gc).contains("newest verified: step 4"),
        "{}",
        text(&gc)
    );
    let gc = marathon(&["ckpt", "gc", "ckpt", "--keep-last", "1"], dir.path());
    assert!(gc.status.success(), "{}", text(&gc));
    let ls = marathon(&["ckpt", "ls", "ckpt"], dir.path());
    assert!(
        !text(&ls).contains("           2  committed"),
        "{}",
        text(&ls)
    );
    assert!(
        text(&ls).contains("           4  committed")
            && text(&ls).contains("           6  committed"),
        "{}",
        text(&ls)
    );

    let missing = marathon(&["ckpt", "ls", "nowhere"], dir.path());
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("checkpoint root nowhere: no such directory"),
        "{}",
        text(&missing)
    );
}

#[test]
fn bench_ckpt_prints_stall_persist_compression_and_load() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 1);
    let (report, stdout) = bench_report(
        &["bench", "ckpt", "--config", "c.toml", "--checkpoints", "1"],
        dir.path(),
    );
    for key in [
        "memcpy_ms",
        "disk_fsync_gbs",
        "stall_over_memcpy",
        "persist_over_disk_uncompressed",
    ] {
        assert!(
            report[key]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v > 0.0),
            "{key} in {report}"
        );
    }
    // Loading the same state resharded from tp2 x dp2 into one process is timed beside the
    // plain load (the bench checks that both load the same values).
    let resharded = &report["resharded_load"];
    for key in ["same_layout_s", "resharded_s", "ratio"] {
        assert!(
            resharded[key]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v > 0.0),
            "{key} in {report}"
        );
    }
    let shuffled = report["codecs"]["adam_m_zstd_shuffle"]["ratio"]
        .as_f64()
        .unwrap();
    assert!(
        shuffled > report["codecs"]["adam_m_zstd"]["ratio"].as_f64().unwrap(),
        "{report}"
    );
    assert!(
        stdout.contains("stall") && stdout.contains("memcpy"),
        "{stdout}"
    );
    // `plan --measured` takes this machine's staging copy and store rates from it.
    std::fs::write(dir.path().join("ckpt.txt"), &stdout).unwrap();
    let out = marathon(
        &[
            "plan",
            "--config",
            repo().join("configs/mtnlg-530b.toml").to_str().unwrap(),
            "--measured",
            "ckpt.txt",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let plan = summary(&out);
    let none = &report["codecs"]["none"];
    let staging =
        report["state_bytes"].as_f64().unwrap() / (none["stall_ms"].as_f64().unwrap() / 1e3) / 1e9;
    let store = none["persist_gbs"]
        .as_f64()
        .unwrap()
        .min(none["load_gbs"].as_f64().unwrap());
    let a = &plan["assumptions"];
    assert!(
        (a["d2h_gbps"].as_f64().unwrap() - staging).abs() < 1e-9 * staging,
        "{a}"
    );
    assert!(
        (a["rank_store_gbps"].as_f64().unwrap() - store).abs() < 1e-9 * store,
        "{a}"
    );
    assert!(
        plan["sources"]
            .to_string()
            .contains("d2h: measured in ckpt.txt"),
        "{plan}"
    );
}

#[test]
fn bench_elastic_runs_real_agents_against_etcd_through_a_plan_and_a_nodes_loss() {
    let server = Etcd::start();
    server.connect();
    let args = [
        "bench",
        "elastic",
        "--etcd",
        &server.url,
        "--agents",
        "24",
        "--slots",
        "8",
        "--tp",
        "8",
        "--pp",
        "3",
        "--microbatches",
        "64",
        "--connections",
        "4",
        "--runs",
        "1",
    ];
    let (report, stdout) = bench_report(&args, Path::new("."));
    // 24 nodes of one block each: 8 replicas of 3 stages; one node lost, 7.
    assert_eq!(report["dp"], 8, "{report}");
    let run = &report["runs"][0];
    assert_eq!(run["dp_after_loss"], 7, "{report}");
    let m = &report["median"];
    for key in [
        "all_hold_plan_ms",
        "hold_after_registration_ms",
        "hold_after_expiry_ms",
    ] {
        assert!(m[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    // The crashed node was declared dead when its lease (2 s) ran out, not at once.
    let expired = m["expired_after_crash_ms"].as_f64().unwrap();
    assert!(expired > 1000.0, "{report}");
    assert!(
        stdout.contains("every agent held the first plan"),
        "{stdout}"
    );
}

#[test]
fn bench_recovery_kills_a_worker_of_each_job_and_prints_the_three_recoveries() {
    let server = Etcd::start();
    server.connect();
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 4);
    let args = [
        "bench",
        "recovery",
        "--etcd",
        &server.url,
        "--config",
        "c.toml",
        "--tp",
        "1",
        "--dp",
        "2",
        "--kill-after",
        "4",
        // No checkpoint before the kill: however far the job runs between the bench seeing
        // step 4 and its SIGKILL landing, the fail-stop baseline starts over and redoes every
        // step. (With a checkpoint every 3 steps, a busy machine let the job commit step 6
        // before the kill, and nothing was redone.)
        "--ckpt-every",
        "1000",
    ];
    let (report, stdout) = bench_report(&args, dir.path());
    assert_eq!(
        (&report["tp"], &report["pp"], &report["dp"]),
        (&1.into(), &1.into(), &2.into()),
        "{report}"
    );
    // The elastic job goes on in place from the step it reached, with and without the
    // distributed optimizer; the fail-stop baseline does again the steps it had done.
    for run in ["elastic", "elastic_distributed_optimizer"] {
        let r = &report[run];
        assert_eq!(r["steps_recomputed"], 0, "{run}: {report}");
        assert!(r["detected_ms"].as_i64().is_some(), "{run}: {report}");
        assert!(
            r["first_step_ms"].as_i64().is_some_and(|ms| ms > 0),
            "{run}: {report}"
        );
    }
    let base = &report["stop_and_resume"];
    assert!(
        base["steps_recomputed"].as_u64().is_some_and(|n| n >= 4),
        "{report}"
    );
    assert!(stdout.contains("first step completed"), "{stdout}");
}

#[test]
fn training_on_a_gpu_without_one_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 2);
    let out = marathon(
        &["train", "--config", "c.toml", "--device", "cuda"],
        dir.path(),
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    // A build without the cuda feature says how to build one; a build with it, on a machine
    // without a GPU, names the missing driver. Either way the user learns what to do.
    let e = errors[0];
    assert!(
        e.contains("GPU: ")
            && (e.contains("--features cuda") || e.contains("libcuda.so"))
            && e.contains("--device cpu"),
        "{e}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing was trained or written.
    assert!(!dir.path().join("checkpoints").exists());
}

/// `tiny_job` with checkpoints every `every` steps under `ck/`.
fn tiny_job_with_checkpoints(dir: &Path, steps: u64, every: u64) {
    tiny_job(dir, steps);
    let path = dir.join("c.toml");
    let mut config = std::fs::read_to_string(&path).unwrap();
    config.push_str(&format!(
        "[checkpoint]\nroot = \"ck\"\nevery_steps = {every}\nkeep_last = 4\n"
    ));
    std::fs::write(path, config).unwrap();
}

/// A tiny job trained for `steps` steps with checkpoints every `every` under `ck/`.
fn trained_job(steps: u64, every: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_job_with_checkpoints(dir.path(), steps, every);
    let out = marathon(&["train", "--config", "c.toml"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    dir
}

fn python_with_numpy() -> Command {
    let tools = std::env::var("MARATHON_TOOLS")
        .unwrap_or_else(|_| format!("{}/.cache/marathon/tools", std::env::var("HOME").unwrap()));
    let mut py = Command::new("python3");
    let path = std::env::var("PYTHONPATH").unwrap_or_default();
    py.env("PYTHONPATH", format!("{tools}/python:{path}"));
    let probe = py
        .args(["-c", "import numpy, safetensors"])
        .output()
        .expect("run python3");
    assert!(
        probe.status.success(),
        "numpy and safetensors are needed: `scripts/setup.sh --test-servers` installs them into \
         {tools}/python ({})",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut py = Command::new("python3");
    py.env("PYTHONPATH", format!("{tools}/python:{path}"));
    py
}

#[test]
fn export_to_hugging_face_is_read_alike_by_an_independent_implementation_and_imports_back() {
    let dir = trained_job(4, 2);
    let d = dir.path();
    let out = marathon(&["ckpt", "export", "ck", "hf"], d);
    assert!(out.status.success(), "{}", text(&out));
    // numpy's GPT-2 over the exported files gives marathon's next-token probabilities.
    let out = marathon(
        &[
            "sample",
            "ck",
            "--prompt",
            "The runtime",
            "--tokens",
            "0",
            "--probs-out",
            "p.json",
        ],
        d,
    );
    assert!(out.status.success(), "{}", text(&out));
    let script = repo().join("ops/tests/fixtures/hf_gpt2_numpy.py");
    let check = python_with_numpy()
        .arg(script)
        .args(["hf", "p.json"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    // Export then import gives back the parameters bitwise.
    let out = marathon(&["ckpt", "import", "hf", "imported"], d);
    assert!(out.status.success(), "{}", text(&out));
    let out = marathon(&["ckpt", "diff", "ck", "imported", "--params-only"], d);
    assert!(out.status.success(), "{}", text(&out));
    // Fresh moments: the whole checkpoints differ, and diff says so with its exit status.
    let out = marathon(&["ckpt", "diff", "ck", "imported"], d);
    assert!(
        !out.status.success() && text(&out).contains("DIFFERS"),
        "{}",
        text(&out)
    );
    // A bf16 export imports within bf16 rounding.
    let out = marathon(&["ckpt", "export", "ck", "hf16", "--dtype", "bf16"], d);
    assert!(out.status.success(), "{}", text(&out));
    let out = marathon(&["ckpt", "import", "hf16", "imported16"], d);
    assert!(out.status.success(), "{}", text(&out));
    let out = marathon(&["ckpt", "diff", "ck", "imported16", "--params-only"], d);
    assert!(!out.status.success(), "bf16 is not bitwise: {}", text(&out));
    let out = marathon(
        &[
            "ckpt",
            "diff",
            "ck",
            "imported16",
            "--params-only",
            "--rtol",
            "4e-3",
        ],
        d,
    );
    assert!(out.status.success(), "{}", text(&out));
    // A run continues from the imported weights, on any data.
    let config = std::fs::read_to_string(d.join("c.toml"))
        .unwrap()
        .replace("root = \"ck\"", "root = \"imported\"")
        .replace("[data]\n", "[data]\nseed = 99\n");
    std::fs::write(d.join("fine.toml"), config).unwrap();
    let out = marathon(&["train", "--config", "fine.toml"], d);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resumed from the checkpoint of step 0"),
        "{}",
        text(&out)
    );
}

/// Rewrites the header of `file` (a safetensors model) through `edit`.
fn edit_safetensors(
    file: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut head = serde_json::to_vec(&header).unwrap();
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn import_refuses_bad_models_and_taken_destinations_and_writes_nothing() {
    let dir = trained_job(2, 2);
    let d = dir.path();
    assert!(marathon(&["ckpt", "export", "ck", "hf"], d)
        .status
        .success());
    let copy = |name: &str| {
        std::fs::create_dir_all(d.join(name)).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(d.join("hf").join(f), d.join(name).join(f)).unwrap();
        }
        d.join(name).join("model.safetensors")
    };
    edit_safetensors(&copy("missing"), |h| {
        h.remove("h.1.mlp.c_fc.bias");
    });
    copy("llama");
    let cfg = d.join("llama").join("config.json");
    let llama = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"gpt2\"", "\"llama\"");
    std::fs::write(&cfg, llama).unwrap();
    edit_safetensors(&copy("misshapen"), |h| {
        h["h.0.attn.c_attn.weight"]["shape"] = serde_json::json!([96, 32]);
    });
    for (model, says) in [
        ("missing", "no tensor h.1.mlp.c_fc.bias"),
        (
            "misshapen",
            "tensor h.0.attn.c_attn.weight has shape [96, 32]",
        ),
        (
            "llama",
            "model_type is llama; only GPT-2 models can be imported",
        ),
    ] {
        let out = marathon(&["ckpt", "import", model, "dst"], d);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(says), "{}", text(&out));
        assert!(!d.join("dst").exists(), "nothing is written for {model}");
    }
    let out = marathon(&["ckpt", "import", "hf", "dst", "--tp", "3"], d);
    assert!(
        !out.status.success() && text(&out).contains("--tp 3"),
        "{}",
        text(&out)
    );
    // A destination that holds step 0 already keeps it.
    assert!(marathon(&["ckpt", "import", "hf", "dst"], d)
        .status
        .success());
    let out = marathon(&["ckpt", "import", "misshapen", "dst"], d);
    assert!(!out.status.success());
    let out = marathon(&["ckpt", "import", "hf", "dst"], d);
    assert!(
        !out.status.success() && text(&out).contains("already committed"),
        "{}",
        text(&out)
    );
    let out = marathon(&["ckpt", "diff", "ck", "dst", "--params-only"], d);
    assert!(
        out.status.success(),
        "the first import is intact: {}",
        text(&out)
    );
}

#[test]
fn diff_compares_checkpoints_of_two_layouts() {
    let dir = trained_job(2, 2);
    let d = dir.path();
    let tp2 = std::fs::read_to_string(d.join("c.toml"))
        .unwrap()
        .replace("root = \"ck\"", "root = \"ck-tp2\"");
    std::fs::write(d.join("tp2.toml"), tp2).unwrap();
    let out = marathon(&["train", "--config", "tp2.toml", "--tp", "2"], d);
    assert!(out.status.success(), "{}", text(&out));
    // The same run in two layouts: equal to rounding, not bitwise. Adam turns rounding in
    // near-zero gradients into visible differences in a few elements (which ones depends on the
    // training text, here this repository's README and ARCHITECTURE), so the measure is each
    // family's relative L2 difference, the parallel tests' 1e-5; elementwise they differ.
    let out = marathon(&["ckpt", "diff", "ck", "ck-tp2", "--l2-rtol", "1e-5"], d);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("tp 2 pp 1"), "{}", text(&out));
    let out = marathon(&["ckpt", "diff", "ck", "ck-tp2"], d);
    assert!(
        !out.status.success() && text(&out).contains("DIFFERS"),
        "two layouts are not bitwise equal: {}",
        text(&out)
    );
    let out = marathon(&["ckpt", "diff", "ck", "ck", "--step-a", "2"], d);
    assert!(
        out.status.success(),
        "a checkpoint equals itself: {}",
        text(&out)
    );
    // Another model is refused, naming both.
    let other = std::fs::read_to_string(d.join("c.toml"))
        .unwrap()
        .replace("n_embd = 32", "n_embd = 64")
        .replace("root = \"ck\"", "root = \"ck-wide\"");
    std::fs::write(d.join("wide.toml"), other).unwrap();
    assert!(marathon(&["train", "--config", "wide.toml"], d)
        .status
        .success());
    let out = marathon(&["ckpt", "diff", "ck", "ck-wide"], d);
    assert!(
        !out.status.success() && text(&out).contains("different models"),
        "{}",
        text(&out)
    );
}

#[test]
fn sample_continues_a_prompt_reproducibly() {
    let dir = trained_job(2, 2);
    let d = dir.path();
    let run = |args: &[&str]| {
        let mut all = vec![
            "sample",
            "ck",
            "--prompt",
            "Checkpoints are",
            "--tokens",
            "8",
        ];
        all.extend_from_slice(args);
        let out = marathon(&all, d);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let greedy = run(&["--temperature", "0"]);
    assert!(greedy.starts_with("Checkpoints are"), "{greedy}");
    assert!(greedy.len() > "Checkpoints are".len(), "{greedy}");
    assert_eq!(greedy, run(&["--temperature", "0"]));
    assert_eq!(run(&["--seed", "5"]), run(&["--seed", "5"]));
    let out = marathon(&["sample", "ck", "--prompt", ""], d);
    assert!(
        !out.status.success() && text(&out).contains("--prompt"),
        "{}",
        text(&out)
    );
}

/// Rewrites `c.toml` in `dir` into `name` through `edit`.
fn variant(dir: &Path, name: &str, edit: impl FnOnce(String) -> String) {
    let config = std::fs::read_to_string(dir.join("c.toml")).unwrap();
    std::fs::write(dir.join(name), edit(config)).unwrap();
}

fn run_ok(args: &[&str], dir: &Path) -> Output {
    let out = marathon(args, dir);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

#[test]
fn reshard_round_trips_bitwise_and_training_continues_as_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_job_with_checkpoints(d, 4, 4);
    // Four layers and four heads, so tp 4 and pp 4 fit; the distributed optimizer on.
    variant(d, "c.toml", |c| {
        c.replace("n_layer = 2\nn_head = 2", "n_layer = 4\nn_head = 4")
            + "[parallel]\ndistributed_optimizer = true\n"
    });
    let layout = ["--tp", "2", "--pp", "2", "--dp", "2"];
    run_ok(&[&["train", "--config", "c.toml"][..], &layout].concat(), d);
    // dp2 x tp2 x pp2 (ZeRO) -> tp1 -> tp4 -> pp4 -> dp2 x tp2 x pp2 (ZeRO).
    for (src, dst, args) in [
        ("ck", "tp1", vec![]),
        ("tp1", "tp4", vec!["--tp", "4"]),
        ("tp4", "pp4", vec!["--pp", "4"]),
        (
            "pp4",
            "back",
            vec!["--tp", "2", "--pp", "2", "--dp", "2", "--zero"],
        ),
    ] {
        let out = run_ok(&[&["ckpt", "reshard", src, dst][..], &args].concat(), d);
        assert!(text(&out).contains("peak memory"), "{}", text(&out));
        run_ok(&["ckpt", "verify", dst], d);
    }
    for other in ["tp1", "tp4", "pp4", "back"] {
        let out = run_ok(&["ckpt", "diff", "ck", other], d);
        assert!(!text(&out).contains("DIFFERS"), "{}", text(&out));
    }
    // Ten more steps in the original layout, and ten more in one process after resharding.
    variant(d, "more.toml", |c| c.replace("steps = 4", "steps = 14"));
    let stayed = run_ok(
        &[&["train", "--config", "more.toml"][..], &layout].concat(),
        d,
    );
    variant(d, "moved.toml", |c| {
        c.replace("steps = 4", "steps = 14")
            .replace("root = \"ck\"", "root = \"tp1\"")
            .replace(
                "distributed_optimizer = true",
                "distributed_optimizer = false",
            )
    });
    let moved = run_ok(&["train", "--config", "moved.toml"], d);
    assert!(
        text(&moved).contains("resumed from the checkpoint of step 4"),
        "{}",
        text(&moved)
    );
    let (a, b) = (summary(&stayed), summary(&moved));
    let (la, lb) = (
        a["final_loss"].as_f64().unwrap(),
        b["final_loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() <= 1e-5 * la, "stayed {la}, resharded {lb}");
    run_ok(
        &[
            "ckpt",
            "diff",
            "ck",
            "tp1",
            "--params-only",
            "--l2-rtol",
            "1e-5",
        ],
        d,
    );
}

#[test]
fn reshard_refuses_bad_targets_and_taken_destinations() {
    let dir = trained_job(2, 2);
    let d = dir.path();
    let out = marathon(&["ckpt", "reshard", "ck", "bad", "--tp", "3"], d);
    assert!(
        !out.status.success() && text(&out).contains("--tp 3") && text(&out).contains("n_head"),
        "{}",
        text(&out)
    );
    assert!(!d.join("bad").exists(), "nothing is written");
    run_ok(&["ckpt", "reshard", "ck", "once"], d);
    let out = marathon(&["ckpt", "reshard", "ck", "once", "--tp", "2"], d);
    assert!(
        !out.status.success() && text(&out).contains("already holds"),
        "{}",
        text(&out)
    );
    // The first reshard is intact.
    run_ok(&["ckpt", "diff", "ck", "once"], d);
}

#[test]
fn reshard_memory_stays_near_two_of_the_largest_box() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny_job_with_checkpoints(d, 1, 1);
    // 64 layers of width 256: the checkpoint is several times the memory bound.
    variant(d, "c.toml", |c| {
        c.replace("n_layer = 2", "n_layer = 64")
            .replace("n_embd = 32", "n_embd = 256")
    });
    run_ok(&["train", "--config", "c.toml"], d);
    let out = run_ok(&["ckpt", "reshard", "ck", "tp2", "--tp", "2"], d);
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let (bytes, bound, peak) = (
        report["bytes"].as_u64().unwrap(),
        report["bound_bytes"].as_u64().unwrap(),
        report["peak_rss_bytes"].as_u64().unwrap(),
    );
    // Two batches of staging, plus the writers' upload and encode buffers, the allocator's
    // two arenas and the process itself.
    let limit = 2 * bound + (192 << 20);
    assert!(
        bytes > 3 * limit,
        "the checkpoint ({bytes} B) must dwarf the limit ({limit} B)"
    );
    assert!(
        peak < limit,
        "peak memory {peak} B for a bound of {bound} B and {bytes} B resharded"
    );
    run_ok(&["ckpt", "diff", "ck", "tp2"], d);
}

#[test]
fn reshard_reads_one_store_and_writes_another() {
    let dir = trained_job(2, 2);
    let d = dir.path();
    let server = Garage::start();
    let options: Vec<String> = server
        .options()
        .into_iter()
        .flat_map(|(k, v)| ["--option".to_string(), format!("{k}={v}")])
        .collect();
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| a.to_string())
            .chain(options.iter().cloned())
            .collect()
    };
    let dst = "s3://ckpt/jobs/resharded";
    let args = with(&[
        "ckpt", "reshard", "ck", dst, "--tp", "2", "--dp", "2", "--zero",
    ]);
    // Garage does not refuse a second create-only write: a reshard must be told that it
    // alone writes there, and writes nothing until it is.
    let out = marathon(&args.iter().map(String::as_str).collect::<Vec<_>>(), d);
    assert!(
        !out.status.success() && text(&out).contains(dst) && text(&out).contains("--single-writer"),
        "{}",
        text(&out)
    );
    let listed = with(&["ckpt", "ls", dst]);
    let out = run_ok(&listed.iter().map(String::as_str).collect::<Vec<_>>(), d);
    assert!(!text(&out).contains("step "), "{}", text(&out));
    let mut args = args;
    args.push("--single-writer".into());
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), d);
    for cmd in [vec!["ckpt", "verify", dst], vec!["ckpt", "diff", "ck", dst]] {
        let args = with(&cmd);
        run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), d);
    }
}

/// A run of two worker processes with validation and checkpoints writes its report beside its
/// metrics; `marathon report` draws it again; and a real headless Chromium loads the page with
/// no console message, every plot drawing data points, and a screenshot that is not blank.
#[test]
fn a_run_writes_its_report_and_a_browser_loads_it_cleanly() {
    use marathon_chaos::browser;
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 12);
    let cfg = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    let cfg = cfg.replace(
        "[train]\n",
        "[train]\neval_every_steps = 4\neval_batches = 1\nmetrics = \"run/metrics.jsonl\"\n",
    ) + "[checkpoint]\nroot = \"ckpt\"\nevery_steps = 4\n";
    let cfg = cfg.replace("[data]\n", "[data]\nval = \"corpus/val.bin\"\n");
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    let out = marathon(&["train", "--config", "c.toml", "--dp", "2"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let written = dir.path().join("run/report.html");
    let html = std::fs::read_to_string(&written).unwrap();
    for section in [
        "Loss against step",
        "Tokens per second",
        "Step time, broken down",
        "Where the run's time went",
        "Checkpoint stall and persist",
        "data-parallel wait",
    ] {
        assert!(html.contains(section), "the report lacks {section:?}");
    }
    let out = marathon(&["report", "run", "--out", "again.html"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("again.html: report with 6 plots"),
        "{}",
        text(&out)
    );
    for page in [written, dir.path().join("again.html")] {
        let loaded = browser::load(&page).unwrap();
        let wrong = browser::check_report(&loaded, 6);
        assert!(wrong.is_empty(), "{}: {wrong:#?}", page.display());
    }
}

/// Each check of a report in the browser fires on a page that breaks it: a console error, a
/// plot with no data, a blank page, fewer plots than expected.
#[test]
fn the_browser_checks_of_a_report_fire_on_bad_pages() {
    use marathon_chaos::browser;
    use marathon_runtime::report::{Chart, Page, Series, Style};
    let dir = tempfile::tempdir().unwrap();
    let mut page = Page::new("a page");
    let chart = Chart::new("line", "x", "y").series(Series::new(
        "s",
        Style::Line,
        vec![(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)],
    ));
    page.chart(&chart, "none").unwrap();
    let good = page.html();
    let write = |name: &str, html: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, html).unwrap();
        browser::check_report(&browser::load(&p).unwrap(), 1)
    };
    assert_eq!(write("good.html", &good), Vec::<String>::new());
    let scripted = good.replace("</body>", "<script>console.error('broken')</script></body>");
    let v = write("console.html", &scripted);
    assert!(
        v.iter()
            .any(|m| m.contains("console") && m.contains("broken")),
        "{v:?}"
    );
    let thrown = good.replace("</body>", "<script>undefinedFunction()</script></body>");
    let v = write("thrown.html", &thrown);
    assert!(v.iter().any(|m| m.contains("undefinedFunction")), "{v:?}");
    // The data line taken out of the plot: axes and legend only.
    let empty: String = good
        .split('\n')
        .filter(|l| !(l.contains("<polyline") && l.contains("#1F77B4")))
        .collect::<Vec<_>>()
        .join("\n");
    let v = write("empty.html", &empty);
    assert!(
        v.iter().any(|m| m.contains("draws no data points")),
        "{v:?}"
    );
    let v = write("blank.html", "<!DOCTYPE html><html><body></body></html>");
    assert!(v.iter().any(|m| m.contains("fewer than 1")), "{v:?}");
    assert!(v.iter().any(|m| m.contains("is blank")), "{v:?}");
}

/// `marathon report` on what is not a run's metrics names the file, the line and what to do,
/// and writes nothing.
#[test]
fn report_refuses_what_is_not_a_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = marathon(&["report", "."], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no metrics.jsonl in this directory"),
        "{}",
        text(&out)
    );
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        "{\"kind\":\"step\",\"data\":{\"step\":1,\"loss\":2.0}}\n",
    )
    .unwrap();
    let out = marathon(&["report", "."], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("metrics.jsonl: line 1: missing field"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("report.html").exists());
}

/// `--log-format json` makes every log line of a launched job a JSON object, a step's carrying
/// its step; `RUST_LOG` filters lines by level.
#[test]
fn logs_are_json_lines_with_their_fields_and_rust_log_filters_them() {
    let dir = tempfile::tempdir().unwrap();
    tiny_job(dir.path(), 4);
    let cfg = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    let cfg = cfg
        .replace(
            "[train]\n",
            "[train]\neval_every_steps = 2\neval_batches = 1\n",
        )
        .replace("[data]\n", "[data]\nval = \"corpus/val.bin\"\n");
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    let args = [
        "train",
        "--config",
        "c.toml",
        "--dp",
        "2",
        "--log-format",
        "json",
    ];
    let out = marathon(&args, dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&stderr);
    assert!(lines
        .iter()
        .all(|l| l["ts"].is_string() && l["level"] == "info"));
    let eval = line_with(
        &lines,
        "message",
        |m| m.starts_with("validation loss"),
        &stderr,
    );
    assert_eq!(eval["step"], 2, "{eval}");
    // Human lines by default; RUST_LOG=warn leaves none of these.
    let out = marathon(&["train", "--config", "c.toml"], dir.path());
    assert!(
        text(&out).contains("step 4: validation loss"),
        "{}",
        text(&out)
    );
    let quiet = Command::new(env!("CARGO_BIN_EXE_marathon"))
        .args(["train", "--config", "c.toml"])
        .env("RUST_LOG", "warn")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(quiet.status.success(), "{}", text(&quiet));
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "", "RUST_LOG=warn");
}

#[test]
fn chaos_sim_runs_the_agents_themselves_or_their_cores() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["--agents"][..]] {
        let mut args = vec!["chaos", "sim", "--seeds", "50"];
        args.extend_from_slice(extra);
        let out = marathon(&args, dir.path());
        assert!(out.status.success(), "{extra:?}: {}", text(&out));
        let t = text(&out);
        assert!(
            t.contains("50 seeds in") && t.contains(" 0 failed"),
            "{extra:?}: {t}"
        );
    }
}
