//! A private etcd behind TLS with authentication, and the certificates it and its clients use,
//! made fresh by the test. Beside [`super::etcd`], which it extends.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use marathon_elastic::EtcdCoordinator;

use super::etcd::{free_port, spawn_member, Etcd};

/// Certificates for an etcd behind TLS, made fresh for a test in their own directory: a CA;
/// the server's, for 127.0.0.1; one client certificate per user, whose common name is the user
/// (etcd's `--client-cert-auth` takes it as the user name); and `rogue`, a client certificate
/// from another CA.
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

impl Etcd {
    /// A private etcd that serves only TLS with the server certificate of `certs`, asks every
    /// client for a certificate of its CA, and has authentication on: user `root` with its
    /// role, each of `users` (with password `<user>-password`) given role `job`, which may read
    /// and write the keys under `prefix` and nothing else, and each of `others` with no role.
    pub fn start_secure(certs: &Certs, users: &[&str], others: &[&str], prefix: &str) -> Etcd {
        let dir = tempfile::tempdir().expect("etcd data directory");
        let (client, peer) = (free_port(), free_port());
        let url = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let initial = format!("test={peer_url}");
        let path = |n: &str| certs.path(n).display().to_string();
        let tls = [
            "--cert-file".to_string(),
            path("server"),
            "--key-file".into(),
            path("server-key"),
            "--trusted-ca-file".into(),
            path("ca"),
            "--client-cert-auth".into(),
        ];
        let child = spawn_member(dir.path(), "test", &url, &peer_url, &initial, &tls);
        let etcd = Etcd { child, dir, url };
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

    /// A client of this etcd as `access` says, once it answers.
    pub fn connect_with(&self, access: &marathon_elastic::EtcdAccess) -> EtcdCoordinator {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match EtcdCoordinator::connect_with(
                std::slice::from_ref(&self.url),
                Duration::from_secs(2),
                access,
            ) {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("etcd at {} never answered: {e}", self.url),
            }
        }
    }
}
