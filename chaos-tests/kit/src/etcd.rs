//! A private etcd for tests: one member, a cluster of several, or one behind TLS with users
//! and roles, each on free loopback ports with its own directory and killed on drop. The
//! processes are the chaos harness's ([`marathon_chaos::servers::EtcdCluster`]); a missing
//! binary fails the test, saying how to install etcd.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use marathon_chaos::servers::{ClientTls, EtcdCluster as Members};
use marathon_elastic::{EtcdAccess, EtcdCoordinator};

/// A private etcd of one member.
#[derive(Debug)]
pub struct Etcd {
    members: Members,
    _dir: tempfile::TempDir,
    /// Its client URL.
    pub url: String,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    fn start_with(tls: Option<&ClientTls>) -> Etcd {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let members = Members::start_with(dir.path(), 1, "127.0.0.1", tls)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let url = members.urls().remove(0);
        Etcd {
            members,
            _dir: dir,
            url,
        }
    }

    /// A client, once it answers.
    pub fn connect(&self) -> EtcdCoordinator {
        self.connect_with(&EtcdAccess::default())
    }

    /// A client of this etcd as `access` says, once it answers.
    pub fn connect_with(&self, access: &EtcdAccess) -> EtcdCoordinator {
        connect(std::slice::from_ref(&self.url), access)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.members.kill(0);
    }

    /// A private etcd that serves only TLS with the server certificate of `certs`, asks every
    /// client for a certificate of its CA, and has authentication on: user `root` with its
    /// role, each of `users` (with password `<user>-password`) given role `job`, which may read
    /// and write the keys under `prefix` and nothing else, and each of `others` with no role.
    pub fn start_secure(certs: &Certs, users: &[&str], others: &[&str], prefix: &str) -> Etcd {
        let tls = ClientTls {
            cert: certs.path("server"),
            key: certs.key_path("server"),
            ca: certs.path("ca"),
        };
        let etcd = Etcd::start_with(Some(&tls));
        let root = etcd.connect_with(&certs.access("root", None));
        drop(root);
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        rt.block_on(async {
            use etcd_client::{Client, ConnectOptions, Permission, TlsOptions};
            let read = |n: &str| std::fs::read(certs.path(n)).expect("read a certificate");
            let tls = TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca")))
                .identity(etcd_client::Identity::from_pem(
                    read("root"),
                    read("root-key"),
                ));
            let mut c = Client::connect(
                [etcd.url.as_str()],
                Some(ConnectOptions::new().with_tls(tls)),
            )
            .await
            .expect("connect as root");
            c.user_add("root", "root-password", None)
                .await
                .expect("add root");
            c.user_grant_role("root", "root")
                .await
                .expect("root's role");
            c.role_add("job").await.expect("add a role");
            c.role_grant_permission("job", Permission::read_write(prefix).with_prefix())
                .await
                .expect("grant the prefix");
            for user in users {
                c.user_add(*user, format!("{user}-password"), None)
                    .await
                    .expect("add a user");
                c.user_grant_role(*user, "job")
                    .await
                    .expect("grant the role");
            }
            for user in others {
                c.user_add(*user, format!("{user}-password"), None)
                    .await
                    .expect("add a user");
            }
            c.auth_enable().await.expect("enable authentication");
        });
        etcd
    }
}

/// Connects to `urls` within 20 s; etcd takes a moment to start answering.
fn connect(urls: &[String], access: &EtcdAccess) -> EtcdCoordinator {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match EtcdCoordinator::connect_with(urls, Duration::from_secs(2), access) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("etcd at {} never answered: {e}", urls.join(",")),
        }
    }
}

/// A private etcd cluster of several members on loopback, each with its own data directory,
/// killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Members,
    _dir: tempfile::TempDir,
    /// Each member's client URL.
    pub urls: Vec<String>,
}

impl EtcdCluster {
    pub fn start(size: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let members =
            Members::start(dir.path(), size, "127.0.0.1").unwrap_or_else(|e| panic!("{e:#}"));
        let urls = members.urls();
        EtcdCluster {
            members,
            _dir: dir,
            urls,
        }
    }

    /// Waits until every member answers, then connects to them all.
    pub fn connect(&self) -> EtcdCoordinator {
        for url in &self.urls {
            drop(connect(std::slice::from_ref(url), &EtcdAccess::default()));
        }
        connect(&self.urls, &EtcdAccess::default())
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        self.members.kill(i);
    }
}

/// Certificates for an etcd behind TLS, made fresh for a test in their own directory: a CA;
/// the server's, for 127.0.0.1; one client certificate per user, whose common name is the user
/// (etcd's `--client-cert-auth` takes it as the user name); and `rogue`, a client certificate
/// from another CA.
#[derive(Debug)]
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    pub fn new(users: &[&str]) -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("a directory for certificates");
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("a key")).expect("a CA")
        };
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write a certificate");
        };
        let leaf = |name: &str, issuer: &CertifiedIssuer<'_, KeyPair>| {
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .expect("parameters");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().expect("a key");
            let cert = p.signed_by(&key, issuer).expect("a certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        };
        let (ours, theirs) = (ca("marathon test CA"), ca("another CA"));
        write("ca.pem", ours.pem());
        leaf("server", &ours);
        for user in users {
            leaf(user, &ours);
        }
        leaf("rogue", &theirs);
        Certs { dir }
    }

    /// `<name>.pem` (`ca`, `server`, a user, `rogue`), or with `-key` its key.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    /// `<name>-key.pem`, the key of certificate `name`.
    pub fn key_path(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}-key"))
    }

    /// What a client presenting `user`'s certificate, and the user's `password` if given,
    /// needs.
    pub fn access(&self, user: &str, password: Option<&str>) -> marathon_elastic::EtcdAccess {
        let read = |name: &str| std::fs::read(self.path(name)).expect("read a certificate");
        marathon_elastic::EtcdAccess {
            ca_pem: Some(read("ca")),
            identity: Some((read(user), read(&format!("{user}-key")))),
            user: password.map(|p| (user.to_string(), p.to_string())),
        }
    }
}
