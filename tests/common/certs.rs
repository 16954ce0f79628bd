//! TLS material for the tests: a CA and a server certificate it signs, made with `openssl`, and
//! a Redis connection that trusts that CA.

use std::process::Command;

use redis::aio::MultiplexedConnection;

use super::run_checked;

/// A test CA and a server certificate it signs for `localhost` and `127.0.0.1` (made with the
/// `openssl` command, valid for two days).
pub struct TestCerts {
    pub dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        run_checked(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "2"])
                .args(ec)
                .args(["-keyout", &path("ca.key"), "-out", &path("ca.pem")])
                .args(["-subj", "/CN=cache-invalidator test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
            "openssl: CA",
        );
        run_checked(
            Command::new("openssl")
                .args(["req", "-new", "-nodes"])
                .args(ec)
                .args(["-keyout", &path("server.key"), "-out", &path("server.csr")])
                .args(["-subj", "/CN=localhost"]),
            "openssl: server key",
        );
        std::fs::write(
            path("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        run_checked(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-in", &path("server.csr")])
                .args(["-CA", &path("ca.pem"), "-CAkey", &path("ca.key")])
                .args(["-CAcreateserial", "-out", &path("server.pem")])
                .args(["-extfile", &path("server.ext")]),
            "openssl: server certificate",
        );
        TestCerts { dir }
    }

    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_file()).expect("read CA")
    }

    pub fn cert_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.key")
    }
}

/// A connection to a TLS Redis whose certificate `ca_pem` signed.
pub async fn tls_redis_connection(url: &str, ca_pem: &[u8]) -> MultiplexedConnection {
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.to_vec()),
        },
    )
    .expect("redis TLS client")
    .get_multiplexed_async_connection()
    .await
    .unwrap_or_else(|e| panic!("connect to redis {url}: {e}"))
}
