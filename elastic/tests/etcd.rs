//! The etcd coordinator against a real etcd: the coordinator conformance suite, leases that
//! expire when their holder stops keeping them alive, and a holder that learns it lost its lease
//! when etcd goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use marathon_elastic::coordinator::conformance;
use marathon_elastic::Coordinator;
use marathon_testkit::etcd::{Certs, Etcd};

#[test]
fn etcd_coordinator_passes_the_conformance_suite() {
    let etcd = Etcd::start();
    conformance::run(Arc::new(etcd.connect()), "/marathon/conformance");
}

#[test]
fn etcd_coordinator_passes_the_cluster_conformance_suite() {
    let etcd = Etcd::start();
    marathon_elastic::cluster::conformance::run(Arc::new(etcd.connect()), "/marathon/cluster");
}

#[test]
fn a_registration_expires_after_its_holder_stops_and_is_revoked_when_dropped() {
    let etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(2);
    // Kept alive well past its TTL.
    let kept = c
        .register("/marathon/job/nodes/a", b"8 slots", ttl)
        .expect("register a");
    std::thread::sleep(ttl * 2);
    assert_eq!(
        c.get("/marathon/job/nodes/a").expect("get"),
        Some(b"8 slots".to_vec())
    );
    assert!(!kept.lost());
    // Dropped: revoked at once.
    drop(kept);
    assert_eq!(c.get("/marathon/job/nodes/a").expect("get"), None);
    // Abandoned, as by a crashed holder: gone once the TTL runs out, and a watcher sees it.
    let b = c
        .register("/marathon/job/nodes/b", b"8 slots", ttl)
        .expect("register b");
    let started = Instant::now();
    b.abandon();
    while c.get("/marathon/job/nodes/b").expect("get").is_some() {
        assert!(
            started.elapsed() < ttl + Duration::from_secs(2),
            "the lease outlived its TTL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "expired too early"
    );
}

/// A lease that etcd no longer has (revoked by an operator, or expired while its holder was
/// stopped) is lost at the holder's next keep-alive, not a whole TTL later.
#[test]
fn a_holder_whose_lease_is_revoked_learns_it_is_dead_at_once() {
    let etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(15);
    let reg = c
        .register("/marathon/job/nodes/d", b"8 slots", ttl)
        .expect("register");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.url.as_str()], None)
            .await
            .expect("a second client");
        let leases = client.leases().await.expect("list leases");
        for l in leases.leases() {
            client.lease_revoke(l.id()).await.expect("revoke");
        }
    });
    // A write under it, before the keep-alive notices, is refused as final, not retried.
    let started = Instant::now();
    let refused = reg
        .update(b"7 slots")
        .expect_err("a write under a revoked lease");
    assert!(
        matches!(refused, marathon_elastic::ElasticError::LeaseLost { .. }),
        "{refused:?}"
    );
    assert!(!refused.is_retryable(), "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    while !reg.lost() {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "a revoked lease was not noticed within 12 s (its TTL is 15 s; keep-alives go every 5 s)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_holder_whose_lease_cannot_be_kept_alive_learns_it_is_dead() {
    let mut etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(2);
    let reg = c
        .register("/marathon/job/nodes/c", b"8 slots", ttl)
        .expect("register");
    etcd.kill();
    let started = Instant::now();
    while !reg.lost() {
        assert!(
            started.elapsed() < ttl + Duration::from_secs(5),
            "the loss was never noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= ttl - Duration::from_millis(500),
        "declared lost too early"
    );
    // Calls to a dead cluster fail with the key and the reason, within their timeouts.
    let err = c.get("/marathon/job/nodes/c").expect_err("etcd is gone");
    assert!(err.to_string().contains("/marathon/job/nodes/c"), "{err}");
}

#[test]
fn a_prefix_watch_sees_registrations_and_their_expiry_without_polling() {
    let etcd = Etcd::start();
    let c = etcd.connect();
    let watch = c.watch_prefix("/marathon/job/nodes/").expect("watch");
    let ttl = Duration::from_secs(2);
    let reg = c
        .register("/marathon/job/nodes/d", b"8", ttl)
        .expect("register");
    c.put("/marathon/job/elsewhere", b"x")
        .expect("put outside the prefix");
    let first = watch
        .next(Duration::from_secs(5))
        .expect("watch")
        .expect("a change");
    assert_eq!(
        (first.key.as_str(), first.value.as_deref()),
        ("/marathon/job/nodes/d", Some(&b"8"[..]))
    );
    // The holder stops keeping its lease alive: the watch sees the key go when the TTL runs out.
    let stopped = Instant::now();
    reg.abandon();
    let gone = watch
        .next(ttl + Duration::from_secs(3))
        .expect("watch")
        .expect("the expiry");
    let seen_after = stopped.elapsed();
    assert_eq!(
        (gone.key.as_str(), gone.value),
        ("/marathon/job/nodes/d", None)
    );
    assert!(
        seen_after >= Duration::from_millis(500) && seen_after <= ttl + Duration::from_secs(2),
        "{seen_after:?}"
    );
    println!("lease of TTL {ttl:?} seen expiring by the watch {seen_after:?} after its keep-alive stopped");
}

#[test]
fn one_campaigner_leads_until_its_lease_goes_then_another_takes_over() {
    let etcd = Etcd::start();
    let c = etcd.connect();
    let ttl = Duration::from_secs(2);
    let key = "/marathon/job/leader";
    let a = c.register("/marathon/job/nodes/a", b"1", ttl).expect("a");
    let b = c.register("/marathon/job/nodes/b", b"1", ttl).expect("b");
    assert_eq!(c.campaign(key, b"a", &a).expect("a campaigns"), b"a");
    // b learns who leads instead of taking over.
    assert_eq!(c.campaign(key, b"b", &b).expect("b campaigns"), b"a");
    assert_eq!(c.get(key).expect("get"), Some(b"a".to_vec()));
    // The leader's lease goes (revoked here; expiry works the same): so does the leadership,
    // and a watcher of the job sees it and campaigns.
    let watch = c.watch_prefix("/marathon/job/").expect("watch");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let change = watch
            .next(deadline.saturating_duration_since(Instant::now()))
            .expect("watch")
            .expect("the leader's key is deleted before the deadline");
        if change.key == key && change.value.is_none() {
            break;
        }
    }
    assert_eq!(c.campaign(key, b"b", &b).expect("b campaigns again"), b"b");
}

#[test]
fn a_watch_goes_on_after_the_coordinator_that_started_it_is_dropped() {
    let etcd = Etcd::start();
    let watch = etcd
        .connect()
        .watch_prefix("/marathon/job/")
        .expect("watch");
    etcd.connect()
        .put("/marathon/job/generation", b"1")
        .expect("put");
    let change = watch
        .next(Duration::from_secs(5))
        .expect("watch")
        .expect("the put arrives");
    assert_eq!(change.key, "/marathon/job/generation");
    assert_eq!(change.value, Some(b"1".to_vec()));
}

/// etcd over TLS, asking for client certificates, with authentication on: the job's user, whose
/// role covers the job's prefix, works there (by password, or by its certificate alone); a
/// wrong password, a certificate from another CA, a user without the role and a key outside it
/// are refused at once, with errors that name the user and the endpoint, and never retried.
#[test]
fn etcd_over_tls_with_authentication_admits_the_job_and_refuses_the_rest() {
    use marathon_elastic::ElasticError;
    let certs = Certs::new(&["root", "trainer", "other"]);
    let etcd = Etcd::start_secure(&certs, &["trainer"], &["other"], "/marathon/secure/");
    let prefix = "/marathon/secure";
    for (i, (access, who)) in [
        (
            certs.access("trainer", Some("trainer-password")),
            "user \"trainer\"",
        ),
        (certs.access("trainer", None), "client certificate"),
    ]
    .into_iter()
    .enumerate()
    {
        let c = etcd.connect_with(&access);
        c.put(&format!("{prefix}/a"), b"1")
            .expect("put under the prefix");
        assert_eq!(
            c.get(&format!("{prefix}/a")).expect("get"),
            Some(b"1".to_vec())
        );
        assert!(c
            .transact(
                &[(&format!("{prefix}/b{i}"), None)],
                &[(&format!("{prefix}/b{i}"), b"2")]
            )
            .expect("a transaction under the prefix"));
        let e = c
            .put("/marathon/another-job/a", b"1")
            .expect_err("outside the role");
        assert!(
            matches!(e, ElasticError::Denied { .. })
                && !e.is_retryable()
                && e.to_string().contains(who)
                && e.to_string().contains(&etcd.url),
            "{e}"
        );
    }
    let denied = |access: marathon_elastic::EtcdAccess, what: &str| {
        let e = marathon_elastic::EtcdCoordinator::connect_with(
            std::slice::from_ref(&etcd.url),
            Duration::from_secs(5),
            &access,
        )
        .and_then(|c| c.put(&format!("{prefix}/c"), b"1"))
        .expect_err(what);
        assert!(
            matches!(e, ElasticError::Denied { .. }) && e.to_string().contains(&etcd.url),
            "{what}: {e}"
        );
        e.to_string()
    };
    let e = denied(certs.access("trainer", Some("a guess")), "a wrong password");
    assert!(e.contains("\"trainer\""), "{e}");
    let e = denied(certs.access("rogue", None), "a certificate of another CA");
    assert!(e.contains("TLS"), "{e}");
    let e = denied(
        certs.access("other", Some("other-password")),
        "a user without the role",
    );
    assert!(e.contains("\"other\""), "{e}");
}
